"""
A new loss takes one file: registered with ``@register_loss``, it is picked
up by ``add_focal_config``, ``build_focal_loss`` and every suite that
iterates the registry, with no edit to the tests. Shown with a throwaway
loss written to a temporary file, in a pytest run of its own.
"""

import re
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO
from detectron2.utils.registry import Registry

from focal_det2.registry import lookup

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


def run_suites_with(tmp_path, fast_factor, suites):
    path = tmp_path / f"toy_loss_{str(fast_factor).replace('.', '_')}.py"
    path.write_text(textwrap.dedent(TOY_LOSS).replace("FAST_FACTOR", repr(fast_factor)))
    env = {**__import__("os").environ, "FOCAL_DET2_EXTRA_LOSSES": str(path)}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        "toy_double_ce",
        *suites,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)


def counts(stdout):
    found = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) (passed|failed)", stdout))
    return found.get("passed", 0), found.get("failed", 0)


def test_a_registered_loss_file_is_tested_by_the_suites(tmp_path):
    proc = run_suites_with(tmp_path, 2.0, SUITES)
    passed, failed = counts(proc.stdout)
    assert proc.returncode == 0 and failed == 0, proc.stdout[-3000:]
    assert passed >= 30, proc.stdout[-2000:]  # reference equality, gradients, bad input, training


def test_the_suites_catch_a_fast_path_that_departs_from_its_reference(tmp_path):
    proc = run_suites_with(tmp_path, 2.001, SUITES[:2])
    passed, failed = counts(proc.stdout)
    assert proc.returncode != 0 and failed >= 6, proc.stdout[-3000:]  # 2.001 vs 2: 5e-4 off


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
