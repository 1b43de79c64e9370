"""
MODEL.FOCAL.CLASS_WEIGHTING effective_number (Cui et al., CVPR 2019): the weights, the
counts, the weighted loss of every registered loss, and the weights stored in the
checkpoint and used by --resume and evaluation without counting again.
"""

import re

import pytest
import torch
from conftest import LOSSES, UNIT_OPTS, build_loss, digits_cfg, logged, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage

from focal_det2 import build_focal_loss
from focal_det2.checkpoint import load_for_evaluation
from focal_det2.class_balance import ClassWeights, count_instances, effective_number_weights
from focal_det2.engine import FocalTrainer
from focal_det2.losses import SigmoidFocalLoss

# ----------------------------------------------------------------------------- the weights


def test_weights_match_the_closed_form():
    counts, beta = [1, 10, 100, 1000], 0.99
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    mean = sum(raw) / len(raw)
    expected = torch.tensor([w / mean for w in raw], dtype=torch.float64)
    torch.testing.assert_close(effective_number_weights(counts, beta), expected)


@pytest.mark.parametrize("beta", [0.9, 0.999, 0.9999])
def test_weights_have_mean_one_and_rare_classes_weigh_more(beta):
    w = effective_number_weights([3, 50, 7, 2000], beta)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-12)
    assert w[0] > w[2] > w[1] > w[3]


def test_beta_0_gives_equal_weights():
    assert torch.equal(
        effective_number_weights([1, 5, 5000], 0.0), torch.ones(3, dtype=torch.float64)
    )


@pytest.mark.parametrize(
    "counts, beta, message",
    [
        ([1, 5], 1.0, r"MODEL.FOCAL.CB_BETA=1.0 must be in \[0, 1\)"),
        ([1, 5], -0.1, r"MODEL.FOCAL.CB_BETA=-0.1 must be in \[0, 1\)"),
        ([0, 5], 0.99, r"class counts \[0, 5\] must be >= 1 each"),
        ([], 0.99, r"class counts \[\] must be >= 1 each"),
    ],
)
def test_weights_reject_beta_outside_0_1_and_counts_below_1(counts, beta, message):
    """
    effective_number_weights itself raises (beta 1 or a count 0 would divide 0 by 0 or by 0);
    the config check and ClassWeights.count's own check shadow these in the tests above.
    """
    with pytest.raises(ValueError, match=message):
        effective_number_weights(counts, beta)


@pytest.mark.parametrize(
    "key, value",
    # CB_BETA False: a bool, refused though it equals 0 (guards dropping the bool check)
    [("CLASS_WEIGHTING", "inverse"), ("CB_BETA", 1.0), ("CB_BETA", -0.1), ("CB_BETA", False)],
)
def test_bad_keys_raise_naming_them(key, value):
    """Under the weighting that reads CB_BETA: the range check's own message (with
    CLASS_WEIGHTING none, any CB_BETA moved from its default is refused as unread)."""
    cfg = tiny_cfg()
    if key == "CB_BETA":
        cfg.MODEL.FOCAL.CLASS_WEIGHTING = "effective_number"
    cfg.MODEL.FOCAL[key] = value
    with pytest.raises(ValueError, match=f"MODEL.FOCAL.{key}") as info:
        build_model(cfg)
    if key == "CLASS_WEIGHTING":
        assert "effective_number" in str(info.value)
    else:
        assert str(info.value) == f"MODEL.FOCAL.CB_BETA={value!r} must be a number in [0, 1)."


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9999])
def test_cb_beta_in_0_1_is_accepted(beta):
    """CB_BETA's range is [0, 1): 0 (equal weights) builds, as do values inside."""
    loss = build_loss(
        "sigmoid_focal",
        opts=[
            *UNIT_OPTS,
            "MODEL.FOCAL.CLASS_WEIGHTING",
            "effective_number",
            "MODEL.FOCAL.CB_BETA",
            beta,
        ],
    )
    assert loss.cb_beta == beta and ClassWeights(loss, ["digits_train_tiny"]).beta == beta


def test_cb_beta_set_to_an_int_in_python_is_a_number():
    """A config edited in Python (``cfg.MODEL.FOCAL.CB_BETA = 0``, no yacs type check) builds."""
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.CLASS_WEIGHTING = "effective_number"
    cfg.MODEL.FOCAL.CB_BETA = 0
    assert build_focal_loss(cfg).class_weighting == "effective_number"


# ----------------------------------------------------------------------------- counting


def weighted_loss(num_classes: int, beta: float):
    """A sigmoid focal loss with effective-number class weights of ``beta`` (no weights yet)."""
    return SigmoidFocalLoss(
        num_classes=num_classes, class_weighting="effective_number", cb_beta=beta
    )


def _register(name, records, classes=None):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    if classes:
        MetadataCatalog.get(name).thing_classes = classes


def _tiny_records():
    return DatasetCatalog.get("digits_train_tiny")


def test_counting_the_tiny_digits_set():
    records = _tiny_records()
    expected = [0] * 10
    for r in records:
        for a in r["annotations"]:
            expected[a["category_id"]] += 1
    assert sum(expected) > 0
    assert count_instances(["digits_train_tiny"], 10) == expected
    assert count_instances(["digits_train_tiny", "digits_train_tiny"], 10) == [
        2 * n for n in expected
    ]


def test_crowd_annotations_are_not_counted():
    """Training ignores crowd boxes, so the weights do not count them."""
    records = _tiny_records()
    expected = count_instances(["digits_train_tiny"], 10)
    crowd = [
        {**r, "annotations": [*r["annotations"], {**r["annotations"][0], "iscrowd": 1}]}
        for r in records
    ]
    _register("cb_with_crowd", crowd, MetadataCatalog.get("digits_train_tiny").thing_classes)
    assert count_instances(["cb_with_crowd"], 10) == expected


def test_records_without_annotations_or_iscrowd_keys_are_counted():
    """A custom loader's records may omit "annotations" (an image without boxes) or an
    annotation's "iscrowd" (not crowd), as Detectron2's own loading allows."""
    records = _tiny_records()
    expected = count_instances(["digits_train_tiny"], 10)
    plain = [
        {
            **r,
            "annotations": [
                {k: v for k, v in a.items() if k != "iscrowd"} for a in r["annotations"]
            ],
        }
        for r in records
    ]
    empty = {k: v for k, v in records[0].items() if k != "annotations"}
    _register(
        "cb_without_keys", [*plain, empty], MetadataCatalog.get("digits_train_tiny").thing_classes
    )
    assert count_instances(["cb_without_keys"], 10) == expected


def test_boxes_without_area_are_not_counted():
    """DATALOADER.DEGENERATE_BOXES drop trains without boxes of zero width, so the weights do not count them."""
    records = _tiny_records()
    expected = count_instances(["digits_train_tiny"], 10)
    flat = [
        {**r, "annotations": [*r["annotations"], {**r["annotations"][0], "bbox": [5, 5, 0, 3]}]}
        for r in records
    ]
    assert flat[0]["annotations"][0]["bbox_mode"] == BoxMode.XYWH_ABS
    _register("cb_with_flat_boxes", flat, MetadataCatalog.get("digits_train_tiny").thing_classes)
    assert count_instances(["cb_with_flat_boxes"], 10) == expected


@pytest.mark.parametrize("category_id", [10, -1])
def test_a_category_id_outside_the_classes_is_an_error_naming_it(category_id):
    """count_instances raises for category_id K (one past the last class) or a negative one
    (which would index the last class's count), naming the data set."""
    records = [
        {**r, "annotations": [{**a, "category_id": category_id} for a in r["annotations"]]}
        for r in _tiny_records()
    ]
    name = f"cb_class_{category_id}"
    _register(name, records)
    with pytest.raises(
        ValueError,
        match=rf"data set '{name}', image \d+: category_id {category_id} outside \[0, 10\)",
    ):
        count_instances([name], 10)


def test_a_class_without_instances_is_an_error_naming_it():
    records = [
        {**r, "annotations": [a for a in r["annotations"] if a["category_id"] != 3]}
        for r in _tiny_records()
    ]
    _register("cb_no_three", records, MetadataCatalog.get("digits_train_tiny").thing_classes)
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = ("cb_no_three",)
    loss = build_loss("sigmoid_focal", 10)
    name = MetadataCatalog.get("digits_train_tiny").thing_classes[3]
    with pytest.raises(ValueError, match=re.escape(f"class 3 ({name!r})")) as info:
        ClassWeights(loss, cfg.DATASETS.TRAIN).count()
    assert "cb_no_three" in str(info.value) and "CLASS_WEIGHTING" in str(info.value)
    assert loss.class_weights is None


def test_a_lazy_configs_count_names_its_nodes():
    """The errors of a count for a LazyConfig run name its nodes, not the yacs keys."""
    from focal_det2.class_balance import LAZY_WEIGHT_KEYS

    with pytest.raises(ValueError, match=r"category_id 5 outside \[0, 5\) \(model.num_classes\)"):
        ClassWeights(weighted_loss(5, 0.9), ["digits_train_tiny"], keys=LAZY_WEIGHT_KEYS).count()
    records = [
        {**r, "annotations": [a for a in r["annotations"] if a["category_id"] != 3]}
        for r in _tiny_records()
    ]
    _register("cb_lazy_no_three", records)
    weights = ClassWeights(weighted_loss(10, 0.9), ["cb_lazy_no_three"], keys=LAZY_WEIGHT_KEYS)
    with pytest.raises(ValueError) as info:
        weights.count()
    assert str(info.value) == (
        "model.focal_loss.class_weighting effective_number: class 3 has no instance in "
        "dataloader.train.dataset.names=['cb_lazy_no_three']; every class needs at least one (or "
        "set model.focal_loss.class_weighting none)."
    )


def test_count_reads_every_training_data_set():
    """
    ``ClassWeights.count`` counts every data set of DATASETS.TRAIN: the tiny digits set
    listed twice counts each instance twice, and the weights are the effective-number
    weights of those counts. Guards the mutant that counts the first data set only.
    """
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = ("digits_train_tiny", "digits_train_tiny")
    loss = weighted_loss(10, beta=0.9)
    weights = ClassWeights(loss, cfg.DATASETS.TRAIN)
    weights.count()
    once = count_instances(["digits_train_tiny"], 10)
    assert weights.counts == [2 * n for n in once]
    expected = effective_number_weights([2 * n for n in once], 0.9).tolist()
    assert list(loss.class_weights) == pytest.approx(expected, rel=1e-12)
    assert weights.state_dict()["datasets"] == ["digits_train_tiny", "digits_train_tiny"]


def test_thing_classes_of_another_length_are_not_used_as_names():
    """
    Metadata whose thing_classes do not have K names (here 3 for K = 10) give no class
    names: the error for a class without instances says ``class 3 has no instance``
    with no name. Guards the mutant that drops ``len(names) == num_classes``
    (an IndexError for class 3, or the wrong names).
    """
    records = [
        {**r, "annotations": [a for a in r["annotations"] if a["category_id"] != 3]}
        for r in _tiny_records()
    ]
    _register("cb_three_names", records, ["zero", "one", "two"])
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = ("cb_three_names",)
    with pytest.raises(ValueError, match=re.escape("class 3 has no instance")):
        ClassWeights(build_loss("sigmoid_focal", 10), cfg.DATASETS.TRAIN).count()


def test_class_names_are_the_first_training_sets_and_must_fit_num_classes():
    """The table names classes by the first data set's thing_classes; metadata with another
    number of classes than NUM_CLASSES names none."""
    from focal_det2.class_balance import _class_names

    MetadataCatalog.get("cb_names_three").set(thing_classes=["a", "b", "c"])
    MetadataCatalog.get("cb_names_four").set(thing_classes=["w", "x", "y", "z"])
    try:
        assert _class_names(["cb_names_three", "cb_names_four"], 3) == ["a", "b", "c"]
        assert _class_names(["cb_names_four", "cb_names_three"], 3) == ["", "", ""]
        assert _class_names([], 2) == ["", ""]
    finally:
        MetadataCatalog.remove("cb_names_three")
        MetadataCatalog.remove("cb_names_four")


def test_checkpoint_weights_of_another_beta_are_used_with_a_warning():
    """
    Loading class weights counted with another CB_BETA sets them on the loss and warns,
    naming both betas; the same beta loads without a warning. Guards the mutant that
    inverts ``state["beta"] != self.beta`` (a warning on every matching resume, none
    on a mismatch).
    """
    from focal_det2 import class_balance

    datasets = list(tiny_cfg().DATASETS.TRAIN)
    state = {"weights": [0.5, 2.0, 0.5], "counts": [9, 1, 9], "beta": 0.9, "datasets": datasets}
    loss = weighted_loss(3, beta=0.99)
    with logged(class_balance.logger) as records:
        ClassWeights(loss, datasets).load_state_dict(state)
    assert loss.class_weights == (0.5, 2.0, 0.5)
    assert len(records) == 1
    message = records[0].getMessage()
    assert "MODEL.FOCAL.CB_BETA=0.99" in message and "beta 0.9;" in message
    with logged(class_balance.logger) as records:
        ClassWeights(weighted_loss(3, beta=0.99), datasets).load_state_dict({**state, "beta": 0.99})
    assert records == []
    with logged(class_balance.logger) as records:  # a close beta is another beta
        ClassWeights(weighted_loss(3, beta=0.99), datasets).load_state_dict(
            {**state, "beta": 0.991}
        )
    assert len(records) == 1


def test_checkpoint_weights_of_other_training_sets_are_used_with_a_warning():
    from focal_det2 import class_balance

    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = ("digits_train_tiny",)
    state = {"weights": [0.5, 2.0, 0.5], "counts": [9, 1, 9], "beta": cfg.MODEL.FOCAL.CB_BETA}
    loss = build_loss("sigmoid_focal", 3)
    with logged(class_balance.logger) as records:
        ClassWeights(loss, cfg.DATASETS.TRAIN).load_state_dict(
            {**state, "datasets": ["other_train"]}
        )
    assert loss.class_weights == (0.5, 2.0, 0.5) and len(records) == 1
    assert f"DATASETS.TRAIN={list(cfg.DATASETS.TRAIN)}, but" in records[0].getMessage()
    assert "counted on ['other_train']" in records[0].getMessage()
    with logged(class_balance.logger) as records:
        ClassWeights(loss, cfg.DATASETS.TRAIN).load_state_dict(
            {**state, "datasets": list(cfg.DATASETS.TRAIN)}
        )
    assert records == []
    for counted_on in (["digits_train_tiny"] * 2, ["digits_val_tiny", "digits_train_tiny"]):
        cfg.DATASETS.TRAIN = ("digits_train_tiny", "digits_val_tiny")[: len(set(counted_on))]
        with logged(class_balance.logger) as records:  # repeated or reordered sets differ
            ClassWeights(loss, cfg.DATASETS.TRAIN).load_state_dict(
                {**state, "datasets": counted_on}
            )
        assert len(records) == 1
    cfg.DATASETS.TRAIN = ("digits_train_tiny",)
    with logged(class_balance.logger) as records:  # a state that does not name its sets
        ClassWeights(loss, cfg.DATASETS.TRAIN).load_state_dict(state)
    assert records == []
    with logged(class_balance.logger) as records:  # an evaluation reads neither
        other = {**state, "datasets": ["other_train"], "beta": 0.5}
        ClassWeights(loss, cfg.DATASETS.TRAIN, training=False).load_state_dict(other)
    assert records == [] and loss.class_weights == (0.5, 2.0, 0.5)


# ----------------------------------------------------------------------------- the loss


def _batch(num_logits, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(12, num_logits, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.tensor([0, 1, 2, 2, 3, 3, 0, 3, 3, -1, 1, 2])  # K = 3: 3 background
    assert num_classes == 3
    return logits, labels


WEIGHTS = (0.5, 2.0, 0.25)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_take_the_weights_unrounded(name, dtype, backend_name):
    """
    float16/bfloat16 logits (AMP) on the eager path and the Triton kernels: CLASS_ALPHA and the
    class weights multiply in float32, as the loss is computed, not rounded to the logits'
    dtype (0.3 is 0.30078125 in bfloat16: the loss moved by 2.6e-4 of itself, 1.7e-5 in
    float16), against the float64 reference on the same rounded logits.
    """
    loss = build_loss(name, 3, alpha=0.3, class_alpha=(0.3, 0.7, 0.55))
    loss.set_class_weights((0.3, 1.7, 0.55))
    logits, labels = _batch(loss.num_logits, 3)
    logits = logits.detach().to(dtype)
    got = loss(logits, labels)
    expected = loss.reference_loss(logits.double(), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("class_alpha", [(), (0.2, 0.5, 0.8)], ids=["ALPHA", "CLASS_ALPHA"])
def test_weighted_loss_is_the_per_anchor_sum(name, class_alpha):
    """
    Every loss: sum_i w_{label_i} loss(anchor i), background and ignored weigh 1, value and
    gradient; with CLASS_ALPHA, and at a scheduled gamma (the call's) for losses with gamma.
    """
    loss = build_loss(name, 3, alpha=0.3, class_alpha=class_alpha)
    gamma = 0.5 if loss.uses_gamma else None  # not the configured 2
    logits, labels = _batch(loss.num_logits, 3)
    loss.set_class_weights(WEIGHTS)
    got = loss(logits, labels, gamma)
    (grad,) = torch.autograd.grad(got, logits)
    loss.set_class_weights(None)
    expected = sum(
        (WEIGHTS[y] if 0 <= y < 3 else 1.0) * loss(logits[i : i + 1], labels[i : i + 1], gamma)
        for i, y in enumerate(labels.tolist())
    )
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert not torch.allclose(got, loss(logits, labels, gamma))  # the weights change it


def test_ohem_weighs_the_anchors_it_keeps():
    """
    OHEM keeping 4 anchors of 12 (NMS off): sum over the kept anchors of w_{label} times the
    anchor's own loss; the anchors it drops, foreground ones included, weigh nothing.
    """
    loss = build_loss(
        "ohem", 3, opts=["MODEL.FOCAL.OHEM.BATCH_PER_IMAGE", 4, "MODEL.FOCAL.OHEM.NMS_THRESH", 1.0]
    )
    logits, labels = _batch(loss.num_logits, 3)
    loss.set_class_weights(WEIGHTS)
    kept = loss.select(logits, labels, boxes=None, num_images=1)
    dropped_fg = ((labels >= 0) & (labels < 3) & (kept < 0)).sum()
    assert (kept >= 0).sum() == 4 and dropped_fg > 0  # the weights of dropped anchors would count
    expected = sum(
        (WEIGHTS[y] if y < 3 else 1.0)
        * loss.reference(logits[i : i + 1], kept[i : i + 1], gamma=0.0, class_alpha=None)
        for i, y in enumerate(kept.tolist())
        if y >= 0
    )
    torch.testing.assert_close(loss(logits, labels), expected)


def test_new_class_weights_replace_the_cached_ones():
    """
    Weights set again (a resume's checkpoint over counted ones) are the ones the next call
    uses: the loss equals a fresh loss with only the new weights, bit for bit. Guards the
    mutant that keeps the per-dtype weight cache in ``set_class_weights``.
    """
    logits, labels = _batch(3, 3)
    logits = logits.detach()
    loss = build_loss("sigmoid_focal", 3)
    loss.set_class_weights(WEIGHTS)
    loss(logits, labels)  # caches WEIGHTS as a float64 tensor
    loss.set_class_weights((4.0, 1.0, 3.0))
    fresh = build_loss("sigmoid_focal", 3)
    fresh.set_class_weights((4.0, 1.0, 3.0))
    torch.testing.assert_close(loss(logits, labels), fresh(logits, labels), rtol=0, atol=0)


def test_weighted_sigmoid_focal_loss_written_out():
    """sum_i w_{y_i} sum_k -alpha_t (1 - p_t)^gamma log p_t, alpha and gamma as without weights."""
    alpha, gamma = 0.3, 2.0
    loss = build_loss("sigmoid_focal", 3, alpha=alpha, gamma=gamma)
    loss.set_class_weights(WEIGHTS)
    logits, labels = _batch(3, 3)
    x = logits.detach()
    total = 0.0
    for i, y in enumerate(labels.tolist()):
        if y < 0:
            continue
        w = WEIGHTS[y] if y < 3 else 1.0
        for k in range(3):
            p = torch.sigmoid(x[i, k])
            p_t, a_t = (p, alpha) if k == y else (1 - p, 1 - alpha)
            total += w * (-a_t * (1 - p_t) ** gamma * torch.log(p_t))
    torch.testing.assert_close(loss(x, labels), total)
    torch.testing.assert_close(loss.reference_loss(x, labels), total)


def test_weighted_softmax_focal_loss_written_out():
    """sum_i w_{y_i} -alpha_t (1 - p_t)^gamma log p_t, p_t = softmax(x_i)[y_i]; background alpha 1 - ALPHA, w 1."""
    alpha, gamma = 0.3, 1.5
    loss = build_loss("softmax_focal", 3, alpha=alpha, gamma=gamma)
    loss.set_class_weights(WEIGHTS)
    logits, labels = _batch(4, 3)
    x = logits.detach()
    total = 0.0
    for i, y in enumerate(labels.tolist()):
        if y < 0:
            continue
        p_t = torch.softmax(x[i], 0)[y]
        w, a_t = (WEIGHTS[y], alpha) if y < 3 else (1.0, 1 - alpha)
        total += w * (-a_t * (1 - p_t) ** gamma * torch.log(p_t))
    torch.testing.assert_close(loss(x, labels), total)


@pytest.mark.parametrize("name", LOSSES)
def test_class_weighting_none_is_bit_identical(name):
    """Without weights (the default), and with all weights 1, the loss is its kernel's value, bit for bit."""
    loss = build_loss(name, 3, opts=UNIT_OPTS)
    assert loss.class_weights is None
    logits, labels = _batch(loss.num_logits, 3)
    kernel = loss.loss(logits, labels, gamma=loss.gamma, class_alpha=None)
    assert torch.equal(loss(logits, labels), kernel)
    loss.set_class_weights([1.0] * 3)
    assert torch.equal(loss(logits, labels), kernel)


def test_default_model_has_no_new_state_and_trains_unweighted():
    cfg = tiny_cfg()
    model = build_model(cfg)
    assert model.focal_loss.class_weighting == "none" and model.focal_loss.class_weights is None
    cfg.MODEL.FOCAL.CLASS_WEIGHTING = "effective_number"
    weighted = build_model(cfg)
    assert weighted.state_dict().keys() == model.state_dict().keys()
    image = {"image": torch.zeros(3, 64, 64), "instances": _instances()}
    with EventStorage(0):
        losses = model([image])  # trains without any weights set
    assert torch.isfinite(losses["loss_cls"]) and model.focal_loss.class_weights is None
    weighted.load_state_dict(model.state_dict())  # the same parameters, every weight 1
    weighted.focal_loss.set_class_weights([1.0] * cfg.MODEL.RETINANET.NUM_CLASSES)
    with EventStorage(0):
        assert torch.equal(weighted([image])["loss_cls"], losses["loss_cls"])


@pytest.mark.parametrize("name", ["sigmoid_focal", "softmax_focal"])
def test_a_loss_built_alone_with_weighting_on_needs_its_weights(name):
    """build_focal_loss used without our model or trainer: never silently unweighted."""
    loss = build_loss(name, 3, opts=["MODEL.FOCAL.CLASS_WEIGHTING", "effective_number"])
    logits, labels = _batch(loss.num_logits, 3)
    with pytest.raises(RuntimeError, match=r"CLASS_WEIGHTING=effective_number: the loss has no"):
        loss(logits, labels)
    loss.set_class_weights([1.0] * 3)
    assert torch.isfinite(loss(logits, labels))


def test_a_loss_built_directly_refuses_an_unknown_weighting():
    """Built in Python, not from a config (as a LazyConfig's loss node is): the unknown name,
    a beta outside [0, 1) and a beta without class weights are refused at construction."""
    with pytest.raises(ValueError, match=r"CLASS_WEIGHTING='inverse' is not one of \['none'"):
        SigmoidFocalLoss(num_classes=3, class_weighting="inverse")
    with pytest.raises(ValueError, match=r"^MODEL.FOCAL.CB_BETA=1.0 must be a number in \[0, 1\)"):
        SigmoidFocalLoss(num_classes=3, class_weighting="effective_number", cb_beta=1.0)
    with pytest.raises(
        ValueError, match=r"^MODEL.FOCAL.CB_BETA=0.9 is read only with class weights"
    ):
        SigmoidFocalLoss(num_classes=3, cb_beta=0.9)
    assert SigmoidFocalLoss(num_classes=3, cb_beta=0.999).cb_beta == 0.999  # the default


def test_training_without_weights_set_is_an_error():
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.CLASS_WEIGHTING = "effective_number"
    model = build_model(cfg)
    image = {"image": torch.zeros(3, 64, 64), "instances": _instances()}
    with EventStorage(0), pytest.raises(RuntimeError, match="CLASS_WEIGHTING"):
        model([image])
    assert not hasattr(model, "loss_normalizer")  # refused before the moving average moved


def _instances():
    from detectron2.structures import Boxes, Instances

    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor([[4.0, 4.0, 30.0, 30.0]]))
    inst.gt_classes = torch.tensor([1])
    return inst


# ----------------------------------------------------------------------------- checkpoint


def test_trainer_counts_the_records_its_loader_holds(tmp_path):
    """
    The training set is loaded once: the count reads the loader's records. Registered
    again without class 0 after the loader loaded it, a second load would raise.
    """
    from focal_det2.class_balance import CountClassWeights

    records = _tiny_records()
    classes = MetadataCatalog.get("digits_train_tiny").thing_classes
    _register("cb_loaded", records, classes)
    opts = [
        "DATASETS.TRAIN", ("cb_loaded",), "DATASETS.TEST", (),
        "MODEL.FOCAL.CLASS_WEIGHTING", "effective_number",
    ]  # fmt: skip
    trainer = FocalTrainer(digits_cfg(output_dir=tmp_path, opts=opts))
    without_zero = [
        {**r, "annotations": [a for a in r["annotations"] if a["category_id"] != 0]}
        for r in records
    ]
    _register("cb_loaded", without_zero, classes)
    hook = next(h for h in trainer._hooks if isinstance(h, CountClassWeights))
    hook.before_train()
    assert trainer.class_weights.counts == count_instances(["cb_loaded"], 10, records)
    assert trainer.class_weights.counts[0] > 0


def test_training_stores_weights_and_resume_and_eval_do_not_recount(tmp_path):
    """
    Train 2 iterations on a registered copy of the tiny digits set, then register it again
    without class 0's instances: a recount would raise, so --resume (1 more iteration) and
    the evaluation load succeed only by reading the checkpoint's weights.
    """
    records = _tiny_records()
    classes = MetadataCatalog.get("digits_train_tiny").thing_classes
    _register("cb_train", records, classes)
    opts = [
        "DATASETS.TRAIN", ("cb_train",), "DATASETS.TEST", (),
        "MODEL.FOCAL.CLASS_WEIGHTING", "effective_number", "MODEL.FOCAL.CB_BETA", 0.99,
        "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 64,
    ]  # fmt: skip
    cfg = digits_cfg(output_dir=tmp_path, opts=opts + ["SOLVER.MAX_ITER", 2])
    trainer = FocalTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    counts = count_instances(["cb_train"], 10)
    expected = effective_number_weights(counts, 0.99).tolist()
    assert trainer.class_weights.source == "counted"
    stored = torch.load(tmp_path / "model_final.pth", weights_only=False)["class_weights"]
    assert stored["counts"] == counts and stored["beta"] == 0.99
    torch.testing.assert_close(stored["weights"], expected)

    without_zero = [
        {**r, "annotations": [a for a in r["annotations"] if a["category_id"] != 0]}
        for r in records
    ]
    _register("cb_train", without_zero, classes)
    with pytest.raises(ValueError, match="class 0"):  # what a recount would do
        ClassWeights(build_loss("sigmoid_focal", 10), cfg.DATASETS.TRAIN).count()

    resumed = FocalTrainer(digits_cfg(output_dir=tmp_path, opts=opts + ["SOLVER.MAX_ITER", 3]))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    resumed.train()
    assert resumed.class_weights.source == "checkpoint"
    assert resumed.class_weights.counts == counts  # the resumed run's log and checkpoint keep them
    assert list(resumed.model.focal_loss.class_weights) == stored["weights"]
    restored = torch.load(tmp_path / "model_final.pth", weights_only=False)["class_weights"]
    assert restored == stored

    eval_cfg_weights = ["MODEL.WEIGHTS", str(tmp_path / "model_final.pth")]
    eval_cfg = digits_cfg(output_dir=tmp_path / "eval", opts=opts + eval_cfg_weights)
    model = FocalTrainer.build_model(eval_cfg)
    load_for_evaluation(eval_cfg, model)
    assert list(model.focal_loss.class_weights) == stored["weights"]
    # evaluated with another training set and beta: inference reads neither, nothing to warn of
    from focal_det2 import class_balance

    other = ["DATASETS.TRAIN", ("digits_train_tiny",), "MODEL.FOCAL.CB_BETA", 0.9]
    other_cfg = digits_cfg(output_dir=tmp_path / "eval", opts=opts + other + eval_cfg_weights)
    with logged(class_balance.logger) as records:
        load_for_evaluation(other_cfg, FocalTrainer.build_model(other_cfg))
    assert records == []


def test_class_weighting_with_detectron2_retinanet_is_refused_naming_the_keys():
    """
    Detectron2's RetinaNet has no ``focal_loss`` to weigh: with CLASS_WEIGHTING on,
    ``load_for_evaluation`` raises naming CLASS_WEIGHTING and META_ARCHITECTURE.
    Guards the mutant that drops the ``loss is None`` check of ``_focal_loss_of``
    (ClassWeights of None, no error until it is used).
    """
    cfg = tiny_cfg()
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.FOCAL.CLASS_WEIGHTING = "effective_number"
    model = build_model(cfg)
    message = (
        "MODEL.FOCAL.CLASS_WEIGHTING needs MODEL.META_ARCHITECTURE FocalRetinaNet, got RetinaNet"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        load_for_evaluation(cfg, model)


def test_evaluating_a_checkpoint_without_weights_leaves_the_loss_unweighted(tmp_path):
    cfg = tiny_cfg()
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("plain")
    cfg.MODEL.FOCAL.CLASS_WEIGHTING = "effective_number"
    cfg.MODEL.WEIGHTS = str(tmp_path / "plain.pth")
    cfg.OUTPUT_DIR = str(tmp_path)
    evaluated = build_model(cfg)
    load_for_evaluation(cfg, evaluated)
    assert evaluated.focal_loss.class_weights is None
    for a, b in zip(model.state_dict().values(), evaluated.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "weights, message",
    [
        ([], "class weights: 0 values, NUM_CLASSES=3 needed."),
        ([1.0, 1.0], "class weights: 2 values, NUM_CLASSES=3 needed."),
        ([1.0] * 4, "class weights: 4 values, NUM_CLASSES=3 needed."),
        ([1.0, 0.0, 1.0], "class weights [1.0, 0.0, 1.0] must be finite and > 0."),
        ([1.0, 1.0, -0.5], "class weights [1.0, 1.0, -0.5] must be finite and > 0."),
        ([1.0, float("inf"), 1.0], "class weights [1.0, inf, 1.0] must be finite and > 0."),
        ([float("nan"), 1.0, 1.0], "class weights [nan, 1.0, 1.0] must be finite and > 0."),
    ],
)
def test_bad_class_weights_raise_and_leave_the_loss_unweighted(weights, message):
    loss = build_loss("sigmoid_focal", 3)
    with pytest.raises(ValueError, match=re.escape(message)):
        loss.set_class_weights(weights)
    assert loss.class_weights is None


def test_class_alpha_and_weights_take_the_logits_dtype_on_every_call():
    """The cached CLASS_ALPHA and class-weight tensors are per dtype: float64, then float32, then float64."""
    logits, labels = _batch(3, 3)
    logits = logits.detach()
    loss = build_loss("sigmoid_focal", 3, class_alpha=(0.2, 0.5, 0.8))
    loss.set_class_weights(WEIGHTS)
    for dtype in (torch.float64, torch.float32, torch.float64):
        fresh = build_loss("sigmoid_focal", 3, class_alpha=(0.2, 0.5, 0.8))
        fresh.set_class_weights(WEIGHTS)
        got = loss(logits.to(dtype), labels)
        assert got.dtype == dtype
        torch.testing.assert_close(got, fresh(logits.to(dtype), labels), rtol=0, atol=0)
