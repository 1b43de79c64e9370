#!/usr/bin/env bash
# Create or reuse .venv with torch, torchvision, Detectron2 and focal_det2[dev].
# Idempotent: a stamp records what was installed; a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")
DETECTRON2_GIT="git+https://github.com/facebookresearch/detectron2.git"
DETECTRON2_PYPI="sal-detectron2==0.7.2"   # upstream commit a59f0563, wheel tagged cp310
# Runtime requirements of Detectron2 (its setup.py), installed when the wheel comes with --no-deps.
DETECTRON2_DEPS=("Pillow>=7.1" matplotlib "pycocotools>=2.0.2" "termcolor>=1.1" "yacs>=0.1.8"
                 tabulate cloudpickle "tqdm>4.29.0" tensorboard "numpy<2" "omegaconf>=2.1,<2.4"
                 "hydra-core>=1.1" black packaging fvcore iopath)
STAMP="$VENV/.focal_det2-stamp"
want=$(cat setup.py scripts/bootstrap.sh | sha1sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    pip install -q "${TORCH_PINS[@]}" "setuptools<81" wheel
fi
pip install -q "setuptools<81" wheel

if "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
    echo "bootstrap: Detectron2 already installed in $VENV"
elif pip install -q --no-build-isolation "$DETECTRON2_GIT" 2>/dev/null; then
    echo "bootstrap: Detectron2 installed from upstream git"
else
    site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    pip install -q "${DETECTRON2_DEPS[@]}"
    pip install -q --no-deps --only-binary=:all: --python-version 3.10 --upgrade \
        --target "$site" "$DETECTRON2_PYPI"
    echo "bootstrap: upstream git unreachable; Detectron2 installed from PyPI ($DETECTRON2_PYPI)"
fi

pip install -q -e ".[dev]" "numpy<2"
"$VENV/bin/python" -c "import detectron2, focal_det2"
echo "$want" > "$STAMP"
