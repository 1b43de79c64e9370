"""
A new loss takes one file: registered with ``@register_loss``, it is picked
up by ``add_focal_config``, ``build_focal_loss`` and every suite that
iterates the registry, with no edit to the tests. Shown with a throwaway
loss written to a temporary file, in a pytest run of its own.
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO
from detectron2.utils.registry import Registry

from focal_det2.registry import lookup, register_as

TOY_LOSS = '''
"""A throwaway loss: twice alpha-balanced sigmoid CE, with a config key of its own."""
from detectron2.config import CfgNode as CN

from focal_det2.losses import DenseClassificationLoss, functional, register_loss
from focal_det2.losses import fused


@register_loss("toy_double_ce")
class ToyDoubleCE(DenseClassificationLoss):
    uses_gamma = False

    @classmethod
    def add_config(cls, cfg):
        cfg.MODEL.FOCAL.TOY = CN()
        cfg.MODEL.FOCAL.TOY.FACTOR = 2.0

    def loss(self, logits, labels, *, gamma, class_alpha):
        return FAST_FACTOR * fused.sigmoid_cross_entropy(logits, labels, alpha=self.alpha, class_alpha=class_alpha)

    def reference(self, logits, labels, *, gamma, class_alpha):
        return 2.0 * functional.sigmoid_cross_entropy(logits, labels, alpha=self.alpha, class_alpha=class_alpha)
'''
SUITES = [
    "tests/test_losses.py",
    "tests/test_properties.py",
    "tests/test_bad_input.py",
    "tests/test_modeling.py",
    "tests/test_export.py",
]


def toy_loss(name, fast_factor):
    """TOY_LOSS registered as ``name``, its fast path ``fast_factor`` x CE (2.0: the reference)."""
    toy = textwrap.dedent(TOY_LOSS).replace("FAST_FACTOR", repr(fast_factor))
    return toy.replace('"toy_double_ce"', f'"{name}"').replace("ToyDoubleCE", f"Toy_{name}")


def outcomes(stdout):
    """``{test id: "PASSED" | "FAILED" | "ERROR"}`` from pytest's ``-rA`` summary."""
    found = re.findall(r"^(PASSED|FAILED|ERROR) (.+?)(?: - .*)?$", stdout, re.M)
    return {test: outcome for outcome, test in found}


def test_a_registered_loss_file_is_tested_by_the_suites_which_catch_a_wrong_one(tmp_path):
    """
    One pytest run of the suites with two loss files, each named in FOCAL_DET2_EXTRA_LOSSES:
    ``toy_double_ce`` passes every test of every suite (reference equality, gradients, bad
    input, training), and ``toy_departing``, whose fast path is 2.001 x CE against a reference
    of 2 x CE (5e-4 off), fails the reference checks of test_losses and test_properties.
    """
    files = []
    for name, factor in (("toy_double_ce", 2.0), ("toy_departing", 2.001)):
        files.append(tmp_path / f"{name}.py")
        files[-1].write_text(toy_loss(name, factor))
    env = {**os.environ, "FOCAL_DET2_EXTRA_LOSSES": os.pathsep.join(map(str, files))}
    keywords = "toy_double_ce or (toy_departing and (test_losses or test_properties))"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-k", keywords]
    proc = subprocess.run([*cmd, *SUITES], cwd=REPO, env=env, capture_output=True, text=True)
    found = outcomes(proc.stdout)
    right = {t: o for t, o in found.items() if "toy_double_ce" in t}
    wrong = {t: o for t, o in found.items() if "toy_departing" in t}
    assert set(right.values()) == {"PASSED"}, proc.stdout[-3000:]
    assert len(right) >= 30, proc.stdout[-2000:]
    assert {t.split("::")[0] for t in right} == set(SUITES), proc.stdout[-2000:]
    failed = [t for t, outcome in wrong.items() if outcome == "FAILED"]
    assert len(failed) >= 4, proc.stdout[-3000:]
    assert {t.split("::")[0] for t in failed} == {
        "tests/test_losses.py",
        "tests/test_properties.py",
    }, proc.stdout[-3000:]


def test_register_as_keeps_the_name_as_written():
    """The config value is the registered name exactly: ``FocalV2`` stays ``FocalV2``."""
    registry = Registry("TOY")

    @register_as(registry, "FocalV2")
    class Loss:
        def __init__(self, cfg):
            self.cfg = cfg

    assert [name for name, _ in registry] == ["FocalV2"]
    assert lookup(registry, "FocalV2", "MODEL.TOY.NAME").built_class is Loss


def test_lookup_names_the_key_and_the_valid_names_in_order():
    registry = Registry("TOY")

    @registry.register()
    def zeta():
        pass

    @registry.register()
    def alpha():
        pass

    assert lookup(registry, "zeta", "MODEL.TOY.NAME") is zeta
    with pytest.raises(ValueError) as error:
        lookup(registry, "beta", "MODEL.TOY.NAME")
    assert str(error.value) == (
        "MODEL.TOY.NAME='beta' is not registered; valid names: ['alpha', 'zeta']"
    )
    with pytest.raises(ValueError, match="MODEL.TOY.NAME='Zeta' is not registered"):
        lookup(registry, "Zeta", "MODEL.TOY.NAME")  # names are exact, as in Detectron2


def test_a_loss_file_in_the_losses_folder_and_an_extra_file_register_on_import(tmp_path):
    """
    In a fresh process, ``import focal_det2`` registers a loss that is only a new file of
    ``focal_det2/losses/`` (a copy of the package here) and one named in
    FOCAL_DET2_EXTRA_LOSSES, with no other edit: what train_net.py and every tool see.
    """
    import shutil

    package = tmp_path / "focal_det2"
    shutil.copytree(REPO / "focal_det2", package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "losses" / "toy_double_ce.py").write_text(toy_loss("toy_double_ce", 2.0))
    extra = tmp_path / "elsewhere.py"
    extra.write_text(toy_loss("toy_elsewhere", 2.0))
    code = (
        "import focal_det2; from focal_det2.losses import registered_losses as r; "
        "print(focal_det2.__file__, sorted(r()))"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "FOCAL_DET2_EXTRA_LOSSES": str(extra)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(str(package)), proc.stdout
    assert "'toy_double_ce'" in proc.stdout and "'toy_elsewhere'" in proc.stdout


def test_extra_loss_files_run_once_and_their_errors_name_them(tmp_path, monkeypatch):
    import builtins

    from focal_det2.losses import build

    monkeypatch.setattr(build, "_extra_loaded", set())
    counter = tmp_path / "counter.py"
    counter.write_text("import builtins\nbuiltins.focal_det2_runs += 1\n")
    monkeypatch.setattr(builtins, "focal_det2_runs", 0, raising=False)
    monkeypatch.setenv(build.EXTRA_LOSSES_ENV, str(counter))
    build.load_extra_losses()
    build.load_extra_losses()  # as conftest or a tool importing focal_det2 again would
    assert builtins.focal_det2_runs == 1
    relative = tmp_path / "relative.py"
    relative.write_text("from .base import DenseClassificationLoss\n")  # as inside the package
    monkeypatch.setenv(build.EXTRA_LOSSES_ENV, str(relative))
    with pytest.raises(ImportError) as error:
        build.load_extra_losses()
    note = " ".join(getattr(error.value, "__notes__", []))
    assert f"while running {relative}, named by FOCAL_DET2_EXTRA_LOSSES" in note
    assert "from focal_det2.losses import register_loss" in note
    monkeypatch.setenv(build.EXTRA_LOSSES_ENV, str(tmp_path / "missing.py"))
    with pytest.raises(FileNotFoundError, match=r"FOCAL_DET2_EXTRA_LOSSES names .*missing.py"):
        build.load_extra_losses()
    monkeypatch.setenv(build.EXTRA_LOSSES_ENV, str(REPO / "focal_det2" / "losses" / "ohem.py"))
    with pytest.raises(
        ValueError, match=r"ohem.py, a module of focal_det2/losses/, which the pack"
    ):
        build.load_extra_losses()
    monkeypatch.chdir(REPO / "focal_det2")  # the same module named relative to the working folder
    monkeypatch.setenv(build.EXTRA_LOSSES_ENV, os.path.join("losses", "ohem.py"))
    with pytest.raises(ValueError, match=r"ohem.py, a module of focal_det2/losses/"):
        build.load_extra_losses()
    monkeypatch.setenv(build.EXTRA_LOSSES_ENV, str(tmp_path))  # a folder
    with pytest.raises(FileNotFoundError, match=r"names .*, which is not a file\."):
        build.load_extra_losses()


def test_an_extra_file_that_fails_halfway_loads_once_fixed(tmp_path, monkeypatch):
    """The losses a failing file registered are unregistered: the fixed file loads in the same process."""
    from focal_det2.losses import build, registered_losses

    monkeypatch.setattr(build, "_extra_loaded", set())
    toy = (
        textwrap.dedent(TOY_LOSS)
        .replace("FAST_FACTOR", "2.0")
        .replace("toy_double_ce", "toy_halfway")
    )
    halfway = tmp_path / "halfway.py"
    halfway.write_text(toy + "\nundefined_name\n")
    monkeypatch.setenv(build.EXTRA_LOSSES_ENV, str(halfway))
    with pytest.raises(NameError) as error:
        build.load_extra_losses()
    assert getattr(error.value, "__notes__", []) == [
        f"while running {halfway}, named by FOCAL_DET2_EXTRA_LOSSES"
    ]
    assert "toy_halfway" not in registered_losses()
    halfway.write_text(toy)
    try:
        build.load_extra_losses()
        assert "toy_halfway" in registered_losses()
    finally:
        build.FOCAL_LOSS_REGISTRY._obj_map.pop("toy_halfway", None)


def test_a_loss_name_registered_twice_names_both_classes():
    from focal_det2.losses import DenseClassificationLoss, register_loss

    with pytest.raises(
        ValueError,
        match=r"'sigmoid_focal' of .*Again is already registered by "
        r"focal_det2.losses.sigmoid_focal.SigmoidFocalLoss",
    ):

        @register_loss("sigmoid_focal")
        class Again(DenseClassificationLoss):
            pass


def test_an_unregistered_loss_name_says_how_a_loss_registers():
    from conftest import tiny_cfg

    from focal_det2 import build_focal_loss

    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.LOSS = "poly_focal"
    with pytest.raises(ValueError, match=r"'poly_focal' is not registered.*focal_det2/losses/"):
        build_focal_loss(cfg)


def test_the_package_imports_and_its_losses_run_without_triton():
    """Triton is optional (not in setup.py): with it unimportable, ``import focal_det2`` works
    and a loss runs on CPU tensors (the eager kernels)."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # import triton raises ImportError
        import torch, focal_det2
        from detectron2.config import get_cfg
        cfg = get_cfg(); focal_det2.add_focal_config(cfg); cfg.MODEL.RETINANET.NUM_CLASSES = 3
        loss = focal_det2.build_focal_loss(cfg)
        value = loss(torch.zeros(4, 3), torch.tensor([0, 1, 3, -1]))
        assert torch.isfinite(value) and value > 0, value
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_registered_losses_are_listed_in_name_order():
    """A loss registered after the built-in ones but named before them is listed first."""
    from focal_det2.losses import SigmoidFocalLoss, build

    @build.register_loss("aaa_listed_first")
    class ListedFirst(SigmoidFocalLoss):
        pass

    try:
        names = list(build.registered_losses())
        assert names[0] == "aaa_listed_first" and names == sorted(names)
    finally:
        build.FOCAL_LOSS_REGISTRY._obj_map.pop("aaa_listed_first", None)
