from setuptools import find_packages, setup

setup(
    name="focal_det2",
    version="0.1.0",
    description="The focal-loss family as swappable Detectron2 components",
    packages=find_packages(include=["focal_det2", "focal_det2.*"]),
    python_requires=">=3.8",
    # Detectron2 itself is a prerequisite (it is not on PyPI): see README.
    install_requires=[
        "torch>=2.0",  # torch.device as a context manager (the meta-device build)
        "torchvision",
        "fvcore",
        "iopath",
        "pycocotools>=2.0.2",
        "opencv-python-headless",
        "scikit-learn",
        "matplotlib",
        "setuptools<81",
    ],
    extras_require={"dev": ["pytest", "hypothesis", "ruff==0.17.6"]},
)
