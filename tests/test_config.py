"""MODEL.FOCAL config nodes and the build-time checks that name a bad key."""

import ast
import re

import pytest
from conftest import LOSSES, REPO, cfg_value, logged, tiny_cfg
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import focal_det2
from focal_det2.config import load_config

DEFAULTS = {
    "LOSS": "sigmoid_focal",
    "GAMMA": 2.0,
    "ALPHA": 0.25,
    "CLASS_ALPHA": [],
    "PRIOR_PROB": 0.01,
    "STAR_BETA": 1.0,
    "HEAD_NAME": "FocalRetinaNetHead",
    "CLASS_WEIGHTING": "none",
    "CB_BETA": 0.999,
}
SCHEDULE_DEFAULTS = {"NAME": "constant", "START": 0.0, "ITERS": 0, "STEPS": []}


# ----------------------------------------------------------------------------- add_focal_config


@pytest.mark.parametrize("key, default", DEFAULTS.items())
def test_add_focal_config_adds_key_with_default(key, default):
    cfg = get_cfg()
    focal_det2.add_focal_config(cfg)
    value = cfg.MODEL.FOCAL[key]
    assert value == default
    assert type(value) is type(default)


@pytest.mark.parametrize("key, default", SCHEDULE_DEFAULTS.items())
def test_add_focal_config_adds_schedule_key_with_default(key, default):
    cfg = get_cfg()
    focal_det2.add_focal_config(cfg)
    value = cfg.MODEL.FOCAL.GAMMA_SCHEDULE[key]
    assert value == default
    assert type(value) is type(default)


def _readme_defaults():
    """(key, default) of each row of the README's "Config keys" table."""
    text = (REPO / "README.md").read_text()
    table = text.split("## Config keys", 1)[1].split("\n\n")[2]
    rows = re.findall(r"^\| `([A-Z0-9_.]+)` \| `([^`]*)` \|", table, flags=re.M)
    assert len(rows) >= 19, table  # a broken parse must not leave the test with no cases
    return [(key, ast.literal_eval(default)) for key, default in rows]


@pytest.mark.parametrize("key, default", _readme_defaults())
def test_add_focal_config_default_is_the_readme_tables(key, default):
    """
    Each key of the README's "Config keys" table (LABEL_SMOOTHING, OHEM's,
    SYNC_NORMALIZER and DATALOADER.DEGENERATE_BOXES included, which DEFAULTS
    leaves out) has the default written there, of the same type.
    """
    cfg = get_cfg()
    focal_det2.add_focal_config(cfg)
    value = cfg_value(cfg, key)
    assert value == default
    assert type(value) is type(default)


def test_add_focal_config_leaves_detectron2_defaults_alone():
    cfg = get_cfg()
    focal_det2.add_focal_config(cfg)
    assert "FOCAL" in cfg.MODEL
    fresh = get_cfg()
    assert "FOCAL" not in fresh.MODEL
    assert fresh.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"


def test_importing_focal_det2_leaves_detectron2_defaults_alone():
    assert "FOCAL" not in get_cfg().MODEL


def test_focal_keys_take_command_line_overrides():
    cfg = get_cfg()
    focal_det2.add_focal_config(cfg)
    cfg.merge_from_list(
        [
            "MODEL.FOCAL.LOSS",
            "softmax_focal",
            "MODEL.FOCAL.GAMMA",
            "1.5",
            "MODEL.FOCAL.GAMMA_SCHEDULE.STEPS",
            "[10, 20]",
        ]
    )
    assert cfg.MODEL.FOCAL.LOSS == "softmax_focal"
    assert cfg.MODEL.FOCAL.GAMMA == 1.5
    assert list(cfg.MODEL.FOCAL.GAMMA_SCHEDULE.STEPS) == [10, 20]


# ----------------------------------------------------------------------------- valid builds


def test_tiny_config_builds_focal_retinanet():
    model = build_model(tiny_cfg())
    assert type(model).__name__ == "FocalRetinaNet"
    assert model.num_classes == 10


@pytest.mark.parametrize("alpha", [-1.0, 0.0, 1.0])
def test_alpha_minus_1_and_bounds_are_accepted(alpha):
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.ALPHA = alpha
    assert build_model(cfg).focal_loss.alpha == alpha


def test_class_alpha_bounds_0_and_1_are_accepted():
    """
    CLASS_ALPHA's range is [0, 1], both ends included (a class weighed only on its
    negatives, or only on its positives). Guards the mutants ``0 < a`` and ``a < 1``.
    """
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.CLASS_ALPHA = [0.0, 1.0] + [0.25] * 8
    assert build_model(cfg).focal_loss.class_alpha == (0.0, 1.0) + (0.25,) * 8


def test_retinanet_keys_may_change_for_detectron2_retinanet():
    # the check is about keys FocalRetinaNet ignores; Detectron2's RetinaNet reads them
    cfg = tiny_cfg()
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA = 3.0
    assert type(build_model(cfg)).__name__ == "RetinaNet"


# ----------------------------------------------------------------------------- invalid builds


def _set(cfg, key, value):
    parent, leaf = key.rsplit(".", 1)
    cfg_value(cfg, parent)[leaf] = value


BAD = [
    # (id, {key: value}, text the message must contain)
    ("gamma<0", {"MODEL.FOCAL.GAMMA": -0.5}, ["MODEL.FOCAL.GAMMA=-0.5 must be >= 0"]),
    ("alpha>1", {"MODEL.FOCAL.ALPHA": 1.5}, ["MODEL.FOCAL.ALPHA"]),
    ("alpha<0", {"MODEL.FOCAL.ALPHA": -0.5}, ["MODEL.FOCAL.ALPHA"]),
    ("alpha=-2", {"MODEL.FOCAL.ALPHA": -2.0}, ["MODEL.FOCAL.ALPHA"]),
    ("prior=0", {"MODEL.FOCAL.PRIOR_PROB": 0.0}, ["MODEL.FOCAL.PRIOR_PROB"]),
    ("prior=1", {"MODEL.FOCAL.PRIOR_PROB": 1.0}, ["MODEL.FOCAL.PRIOR_PROB"]),
    ("prior>1", {"MODEL.FOCAL.PRIOR_PROB": 1.5}, ["MODEL.FOCAL.PRIOR_PROB"]),
    ("prior<0", {"MODEL.FOCAL.PRIOR_PROB": -0.01}, ["MODEL.FOCAL.PRIOR_PROB"]),
    (
        "unknown-loss",
        {"MODEL.FOCAL.LOSS": "focal"},
        ["MODEL.FOCAL.LOSS", *LOSSES],
    ),
    (
        "unknown-head",
        {"MODEL.FOCAL.HEAD_NAME": "RetinaNetHead"},
        ["MODEL.FOCAL.HEAD_NAME", "FocalRetinaNetHead"],
    ),
    (
        "unknown-schedule",
        {"MODEL.FOCAL.GAMMA_SCHEDULE.NAME": "exponential"},
        ["MODEL.FOCAL.GAMMA_SCHEDULE.NAME", "constant", "linear", "cosine", "step"],
    ),
    (
        "class-alpha-short",
        {"MODEL.FOCAL.CLASS_ALPHA": [0.25] * 3},
        ["MODEL.FOCAL.CLASS_ALPHA", "10"],
    ),
    (
        "class-alpha-long",
        {"MODEL.FOCAL.CLASS_ALPHA": [0.25] * 11},
        ["MODEL.FOCAL.CLASS_ALPHA", "10"],
    ),
    ("class-alpha>1", {"MODEL.FOCAL.CLASS_ALPHA": [0.25] * 9 + [1.5]}, ["MODEL.FOCAL.CLASS_ALPHA"]),
    (
        "class-alpha<0",
        {"MODEL.FOCAL.CLASS_ALPHA": [-0.1] + [0.25] * 9},
        ["MODEL.FOCAL.CLASS_ALPHA"],
    ),
    (
        "steps-not-increasing",
        {"MODEL.FOCAL.GAMMA_SCHEDULE.NAME": "step", "MODEL.FOCAL.GAMMA_SCHEDULE.STEPS": [200, 100]},
        ["MODEL.FOCAL.GAMMA_SCHEDULE.STEPS"],
    ),
    (
        "retinanet-gamma",
        {"MODEL.RETINANET.FOCAL_LOSS_GAMMA": 3.0},
        [
            "MODEL.RETINANET.FOCAL_LOSS_GAMMA=3.0",
            "leave it at 2.0 and set MODEL.FOCAL.GAMMA instead",
        ],
    ),
    (
        "retinanet-alpha",
        {"MODEL.RETINANET.FOCAL_LOSS_ALPHA": 0.5},
        [
            "MODEL.RETINANET.FOCAL_LOSS_ALPHA=0.5",
            "leave it at 0.25 and set MODEL.FOCAL.ALPHA instead",
        ],
    ),
    (
        "retinanet-gamma-lowered",
        {"MODEL.RETINANET.FOCAL_LOSS_GAMMA": 1.0},
        [
            "MODEL.RETINANET.FOCAL_LOSS_GAMMA=1.0",
            "leave it at 2.0 and set MODEL.FOCAL.GAMMA instead",
        ],
    ),
    (
        "retinanet-prior",
        {"MODEL.RETINANET.PRIOR_PROB": 0.02},
        [
            "MODEL.RETINANET.PRIOR_PROB=0.02",
            "leave it at 0.01 and set MODEL.FOCAL.PRIOR_PROB instead",
        ],
    ),
    (
        "focal-star-gamma-0",
        {"MODEL.FOCAL.LOSS": "focal_star", "MODEL.FOCAL.GAMMA": 0.0},
        ["MODEL.FOCAL.GAMMA=0.0: focal_star divides by gamma"],
    ),
    (
        # FL* divides by gamma, and a linear ramp from START 0 reaches gamma 0 at iteration 0
        "focal-star-ramp-from-0",
        {
            "MODEL.FOCAL.LOSS": "focal_star",
            "MODEL.FOCAL.GAMMA_SCHEDULE.NAME": "linear",
            "MODEL.FOCAL.GAMMA_SCHEDULE.ITERS": 100,
        },
        ["MODEL.FOCAL.GAMMA_SCHEDULE.START"],
    ),
    (
        "cross-entropy-with-schedule",
        {
            "MODEL.FOCAL.LOSS": "cross_entropy",
            "MODEL.FOCAL.GAMMA_SCHEDULE.NAME": "linear",
            "MODEL.FOCAL.GAMMA_SCHEDULE.ITERS": 100,
        },
        [
            "MODEL.FOCAL.GAMMA_SCHEDULE.NAME=linear: MODEL.FOCAL.LOSS=cross_entropy has no gamma "
            "to schedule; use 'constant'."
        ],
    ),
    # Keys the chosen loss would not read, moved from their defaults.
    (
        "star-beta-for-sigmoid-focal",
        {"MODEL.FOCAL.STAR_BETA": 3.0},
        [
            "MODEL.FOCAL.STAR_BETA=3.0 is read by MODEL.FOCAL.LOSS focal_star, not by sigmoid_focal",
            "leave it at 1.0, or set MODEL.FOCAL.LOSS focal_star.",
        ],
    ),
    (
        "star-beta-0-for-sigmoid-focal",  # a value that is falsy is still a value moved
        {"MODEL.FOCAL.STAR_BETA": 0.0},
        ["MODEL.FOCAL.STAR_BETA=0.0 is read by MODEL.FOCAL.LOSS focal_star, not by sigmoid_focal"],
    ),
    (
        "ohem-key-for-cross-entropy",
        {"MODEL.FOCAL.LOSS": "cross_entropy", "MODEL.FOCAL.OHEM.BATCH_PER_IMAGE": 7},
        ["MODEL.FOCAL.OHEM.BATCH_PER_IMAGE=7 is read by MODEL.FOCAL.LOSS ohem", "leave it at 128"],
    ),
    (
        "gamma-for-cross-entropy",
        {"MODEL.FOCAL.LOSS": "cross_entropy", "MODEL.FOCAL.GAMMA": 5.0},
        ["MODEL.FOCAL.GAMMA=5.0: MODEL.FOCAL.LOSS cross_entropy has no gamma", "2.0 or 0"],
    ),
    (
        "gamma-for-ohem",
        {"MODEL.FOCAL.LOSS": "ohem", "MODEL.FOCAL.GAMMA": 1.0},
        ["MODEL.FOCAL.GAMMA=1.0: MODEL.FOCAL.LOSS ohem has no gamma"],
    ),
    (
        "cb-beta-without-class-weights",
        {"MODEL.FOCAL.CB_BETA": 0.9},
        [
            "MODEL.FOCAL.CB_BETA=0.9 is read only with class weights",
            "MODEL.FOCAL.CLASS_WEIGHTING effective_number",
        ],
    ),
    (
        "alpha-beside-class-alpha",
        {"MODEL.FOCAL.ALPHA": 0.5, "MODEL.FOCAL.CLASS_ALPHA": [0.25] * 10},
        [
            "MODEL.FOCAL.ALPHA=0.5 is not read by MODEL.FOCAL.LOSS sigmoid_focal when "
            "MODEL.FOCAL.CLASS_ALPHA is set",
            "leave it at 0.25",
        ],
    ),
]


@pytest.mark.parametrize("values, expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_raises_naming_the_key(values, expected):
    cfg = tiny_cfg()
    for key, value in values.items():
        _set(cfg, key, value)
    with pytest.raises(ValueError, match=re.escape(expected[0])) as info:
        build_model(cfg)
    for text in expected[1:]:
        assert text in str(info.value)


@pytest.mark.parametrize(
    "values",
    [
        {"MODEL.FOCAL.LOSS": "focal_star", "MODEL.FOCAL.STAR_BETA": 3.0},
        {"MODEL.FOCAL.LOSS": "ohem", "MODEL.FOCAL.OHEM.BATCH_PER_IMAGE": 7},
        {"MODEL.FOCAL.LOSS": "cross_entropy", "MODEL.FOCAL.GAMMA": 0.0},
        {"MODEL.FOCAL.CLASS_WEIGHTING": "effective_number", "MODEL.FOCAL.CB_BETA": 0.9},
        {
            "MODEL.FOCAL.LOSS": "softmax_focal",
            "MODEL.FOCAL.ALPHA": 0.5,
            "MODEL.FOCAL.CLASS_ALPHA": [0.25] * 10,
        },
    ],
    ids=["star-beta", "ohem-batch", "cross-entropy-gamma-0", "cb-beta", "softmax-alpha"],
)
def test_keys_the_loss_reads_may_change(values):
    # the other side of the unread-key checks above: the same keys where the loss reads them
    cfg = tiny_cfg()
    for key, value in values.items():
        _set(cfg, key, value)
    assert type(build_model(cfg)).__name__ == "FocalRetinaNet"


# ----------------------------------------------------------------------------- load_config

DIGITS_CONFIG = str(REPO / "configs" / "digits" / "sigmoid_focal_R18_FPN_1x.yaml")


def test_load_config_applies_the_overrides_after_the_file():
    """
    ``load_config(file, opts)`` is the file's config with the key, value pairs of ``opts``
    on top, as train_net.py's command line. Guards the mutant that drops
    ``cfg.merge_from_list(opts)`` (the file's own values would stay).
    """
    plain = load_config(DIGITS_CONFIG)
    assert plain.MODEL.FOCAL.GAMMA == 2.0 and plain.SOLVER.MAX_ITER != 7
    cfg = load_config(DIGITS_CONFIG, ["MODEL.FOCAL.GAMMA", "1.5", "SOLVER.MAX_ITER", "7"])
    assert cfg.MODEL.FOCAL.GAMMA == 1.5 and cfg.SOLVER.MAX_ITER == 7
    assert cfg.MODEL.META_ARCHITECTURE == plain.MODEL.META_ARCHITECTURE == "FocalRetinaNet"


def test_load_config_needing_weights_refuses_an_empty_model_weights():
    """
    ``need_weights=True`` (the tools that run a trained model) raises, naming MODEL.WEIGHTS,
    when it is empty, and accepts it once set; without it an empty MODEL.WEIGHTS loads.
    Guards the mutant that drops the ``need_weights`` check.
    """
    assert load_config(DIGITS_CONFIG).MODEL.WEIGHTS == ""
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        load_config(DIGITS_CONFIG, need_weights=True)
    cfg = load_config(DIGITS_CONFIG, ["MODEL.WEIGHTS", "model.pth"], need_weights=True)
    assert cfg.MODEL.WEIGHTS == "model.pth"


def test_a_missing_config_file_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^no config file: pass --config-file FILE"):
        load_config("")
    with pytest.raises(FileNotFoundError, match=r"^--config-file '.*none.yaml': no such file$"):
        load_config(str(tmp_path / "none.yaml"))


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "MODEL.FOCAL.ALPHA",
            "-1",
            "MODEL.FOCAL.ALPHA=-1 on the command line is an int, but MODEL.FOCAL.ALPHA holds a "
            "float (the config has 0.25): write -1.0.",
        ),
        (
            "MODEL.FOCAL.GAMMA",
            "abc",
            "MODEL.FOCAL.GAMMA=abc on the command line is a str, but MODEL.FOCAL.GAMMA holds a "
            "float (the config has 2.0): write a float such as 2.0.",
        ),
        (  # YAML's .nan is text on the command line (literal_eval): not "not finite"
            "MODEL.FOCAL.GAMMA",
            ".nan",
            "MODEL.FOCAL.GAMMA=.nan on the command line is a str, but MODEL.FOCAL.GAMMA holds a "
            "float (the config has 2.0): write a float such as 2.0.",
        ),
        (
            "SOLVER.MAX_ITER",
            "1.5",
            "SOLVER.MAX_ITER=1.5 on the command line is a float, but SOLVER.MAX_ITER holds an int "
            "(the config has 1000).",
        ),
        (
            "MODEL.FOCAL.SYNC_NORMALIZER",
            "1",
            "MODEL.FOCAL.SYNC_NORMALIZER=1 on the command line is an int, but "
            "MODEL.FOCAL.SYNC_NORMALIZER holds a bool (the config has False).",
        ),
    ],
    ids=["int-for-float", "str-for-float", "nan-for-float", "float-for-int", "int-for-bool"],
)
def test_a_value_of_the_wrong_type_names_the_key_and_how_to_write_it(key, value, message):
    # yacs keeps each key's type and refuses GAMMA 1 or ALPHA -1 as written in the paper; an int
    # for a float gets ": write <float>", text for a number an example of the key's type
    with pytest.raises(ValueError) as error:
        load_config(DIGITS_CONFIG, [key, value])
    assert str(error.value) == message


def test_a_value_of_the_wrong_type_in_a_file_names_the_file(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(f'_BASE_: "{DIGITS_CONFIG}"\nMODEL:\n  FOCAL:\n    GAMMA: 1\n')
    with pytest.raises(
        ValueError, match=re.escape(f"MODEL.FOCAL.GAMMA=1 in {config} or its _BASE_ is an int")
    ):
        load_config(str(config))


@pytest.mark.parametrize(
    "key, close",
    [
        ("MODEL.FOCAL.GAMA", "did you mean MODEL.FOCAL.GAMMA?"),
        ("MODEL.FOCL.GAMMA", "did you mean MODEL.FOCAL.GAMMA?"),  # a typo in a node's name
        ("MODEL.FOCAL.TEMPERATURE", "."),  # nothing close
    ],
)
def test_a_key_the_config_lacks_names_where_and_the_keys_it_may_stand_for(tmp_path, key, close):
    with pytest.raises(KeyError) as error:
        load_config(DIGITS_CONFIG, [key, "1.0"])
    assert error.value.args[0] == f"{key} on the command line: the config has no such key" + (
        f"; {close}" if close != "." else "."
    )
    config = tmp_path / "typo.yaml"
    node, _, leaf = key.rpartition(".")
    nested = "".join(f"{'  ' * i}{name}:\n" for i, name in enumerate(node.split(".")))
    config.write_text(
        f'_BASE_: "{DIGITS_CONFIG}"\n{nested}{"  " * (node.count(".") + 1)}{leaf}: 1.0\n'
    )
    with pytest.raises(KeyError) as error:
        load_config(str(config))
    # yacs names the first node the config lacks on the key's path
    missing = "MODEL.FOCL" if key == "MODEL.FOCL.GAMMA" else key
    assert error.value.args[0].startswith(
        f"{missing} in {config} or its _BASE_: the config has no such key"
    )
    if key == "MODEL.FOCL.GAMMA":
        assert error.value.args[0].endswith("; did you mean MODEL.FOCAL?")


def test_overrides_that_are_not_key_value_pairs_are_refused_saying_why():
    """A flag after the overrides (argparse leaves it among them), a LazyConfig's a.b=value
    override and a key without its value."""
    with pytest.raises(ValueError) as error:
        load_config(DIGITS_CONFIG, ["SOLVER.MAX_ITER", "2", "--resume"])
    assert str(error.value) == (
        "--resume among the KEY VALUE overrides: flags go before them, e.g. train_net.py "
        "--config-file FILE --resume KEY VALUE ..."
    )
    with pytest.raises(ValueError) as error:
        load_config(DIGITS_CONFIG, ["SOLVER.MAX_ITER", "2", "MODEL.FOCAL.GAMMA"])
    assert str(error.value) == (
        "the overrides SOLVER.MAX_ITER 2 MODEL.FOCAL.GAMMA are not KEY VALUE pairs: an odd "
        "number of words (3; a key without its value?)."
    )
    for overrides in (["model.focal_loss.gamma=1"], ["SOLVER.MAX_ITER", "2", "a.b=1", "c.d=2"]):
        with pytest.raises(ValueError) as error:  # a LazyConfig's overrides
            load_config(DIGITS_CONFIG, overrides)
        assert str(error.value) == (
            f"{overrides[-2 if len(overrides) > 1 else 0]}: a YAML config takes KEY VALUE "
            "overrides (MODEL.FOCAL.GAMMA 1.0); a.b=value is how a LazyConfig (.py) is overridden."
        )
    assert load_config(DIGITS_CONFIG, ["MODEL.FOCAL.ALPHA", "-1.0"]).MODEL.FOCAL.ALPHA == -1.0
    # "=" in a value is a value's own
    assert load_config(DIGITS_CONFIG, ["OUTPUT_DIR", "out/a=b"]).OUTPUT_DIR == "out/a=b"


def test_focal_keys_under_detectron2s_retinanet_are_refused_naming_them():
    """Detectron2's RetinaNet reads no MODEL.FOCAL key: a moved one would be silently ignored."""
    from focal_det2.checks import check_cfg

    cfg = tiny_cfg()
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    check_cfg(cfg)  # every MODEL.FOCAL key at its default
    cfg.MODEL.FOCAL.LOSS = "softmax_focal"
    cfg.MODEL.FOCAL.OHEM.BATCH_PER_IMAGE = 64
    expected = (
        "MODEL.FOCAL.LOSS=softmax_focal, MODEL.FOCAL.OHEM.BATCH_PER_IMAGE=64: "
        "MODEL.META_ARCHITECTURE=RetinaNet does not read MODEL.FOCAL."
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_cfg(cfg)


def test_an_unknown_meta_architecture_is_named_with_the_registered_ones():
    """fvcore's own error names neither the key nor the names it knows."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from focal_det2.checks import check_cfg

    cfg = tiny_cfg()
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinanet"
    names = sorted(name for name, _ in META_ARCH_REGISTRY)
    assert "FocalRetinaNet" in names and "GeneralizedRCNN" in names
    expected = f"MODEL.META_ARCHITECTURE='FocalRetinanet' is not registered; valid names: {names}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_cfg(cfg)


def test_the_check_builds_a_cuda_config_without_changing_it():
    """check_cfg builds on the meta device, from a copy set to the CPU (a CUDA config is checked
    on a machine without one): the run's config keeps its device and stays frozen."""
    from focal_det2.checks import check_cfg

    cfg = tiny_cfg()
    cfg.MODEL.DEVICE = "cuda"
    cfg.freeze()
    check_cfg(cfg)
    assert cfg.MODEL.DEVICE == "cuda" and cfg.is_frozen()


@pytest.mark.parametrize(
    "error",
    [
        NotImplementedError(
            "Could not run 'aten::_local_scalar_dense' with arguments from the 'Meta' backend."
        ),
        RuntimeError("Tensor.item() cannot be called on meta tensors"),
    ],
    ids=["Meta backend", "meta tensors"],
)
def test_build_on_meta_leaves_a_model_it_cannot_build_to_the_run(error):
    """Either of PyTorch's meta-device errors: None and a warning; any other error is raised."""
    from focal_det2 import checks

    def build():
        raise error

    with logged(checks.logger) as records:
        assert checks.build_on_meta(build) is None
    assert ["cannot be built on the meta device" in r.getMessage() for r in records] == [True]

    def broken():
        raise type(error)("a constructor's own error")

    with pytest.raises(type(error), match="a constructor's own error"):
        checks.build_on_meta(broken)


def test_a_model_of_ones_own_may_read_the_focal_node():
    """A meta-architecture outside Detectron2 (here one that builds our loss itself) is not refused."""
    from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet

    from focal_det2 import build_focal_loss
    from focal_det2.checks import check_cfg

    class OwnDetector(RetinaNet):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.cls_loss = build_focal_loss(cfg)

    META_ARCH_REGISTRY.register(OwnDetector)
    try:
        cfg = tiny_cfg()
        cfg.MODEL.META_ARCHITECTURE = "OwnDetector"
        cfg.MODEL.FOCAL.LOSS = "softmax_focal"
        check_cfg(cfg)
    finally:
        META_ARCH_REGISTRY._obj_map.pop("OwnDetector")


def test_a_lazy_config_is_refused_naming_train_net(tmp_path):
    """The tools that load a YAML config (export, demo, plot_loss_cdf) met a LazyConfig
    with yaml's parser error; a lazy run's saved config.yaml with yacs's unknown key ``model``."""
    saved = tmp_path / "config.yaml"
    saved.write_text("model:\n  num_classes: 10\ntrain:\n  max_iter: 2\n")
    for path in (str(REPO / "configs" / "lazy" / "focal_retinanet_R_50_FPN_1x.py"), str(saved)):
        with pytest.raises(ValueError, match=re.escape(f"--config-file {path} is a LazyConfig")
                           + r".* takes a YAML \(yacs\) config, .* train_net.py trains and "
                           r"evaluates both\.$"):  # fmt: skip
            load_config(path)
    load_config(DIGITS_CONFIG)  # a YAML config loads
