"""FocalRetinaNet against Detectron2's RetinaNet, and every loss through the model."""

import inspect

import numpy as np
import pytest
import torch
from conftest import LOSSES, build_loss, head_logits, reference_loss_cls, tiny_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import RetinaNet, build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from focal_det2.losses import SigmoidFocalLoss
from focal_det2.modeling.head import FocalRetinaNetHead
from focal_det2.modeling.meta_arch import FocalRetinaNet

NUM_CLASSES = 10


def batch(with_empty=False):
    """Two 96x128 images with boxes of classes 3 and 7; the second one empty if asked."""
    g = torch.Generator().manual_seed(1)
    inputs = []
    for i in range(2):
        inst = Instances((96, 128))
        if with_empty and i == 1:
            inst.gt_boxes, inst.gt_classes = (
                Boxes(torch.zeros(0, 4)),
                torch.zeros(0, dtype=torch.long),
            )
        else:
            inst.gt_boxes = Boxes(torch.tensor([[10.0, 10, 40, 50], [60, 30, 90, 70]]))
            inst.gt_classes = torch.tensor([3, 7])
        image = torch.randint(0, 255, (3, 96, 128), generator=g).float()
        inputs.append({"image": image, "instances": inst, "height": 96, "width": 128})
    return inputs


def build(meta_arch="FocalRetinaNet", **focal):
    """The tiny model; keyword arguments set MODEL.FOCAL keys (``gamma_schedule__name`` for nested)."""
    cfg = tiny_cfg()
    cfg.MODEL.META_ARCHITECTURE = meta_arch
    for key, value in focal.items():
        cfg.merge_from_list([f"MODEL.FOCAL.{key.upper().replace('__', '.')}", value])
    torch.manual_seed(0)
    return build_model(cfg)


def train_losses(model, inputs, start_iter=0):
    model.train()
    with EventStorage(start_iter) as storage:
        losses = model(inputs)
    return losses, storage


def make_pair():
    """Detectron2's RetinaNet and FocalRetinaNet (sigmoid loss) with the same weights."""
    ref = build("RetinaNet")
    ours = build()
    incompatible = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    return ref, ours


@pytest.fixture(scope="module")
def pair():
    """:func:`make_pair`, shared by the tests of this module."""
    return make_pair()


def test_state_dict_keys_and_shapes_equal_retinanet(pair):
    ref, ours = pair
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == ref_shapes


def test_initial_classifier_bias_equals_retinanet():
    ref, ours = build("RetinaNet"), build()
    assert torch.equal(ref.head.cls_score.bias, ours.head.cls_score.bias)


def test_training_losses_equal_retinanet(pair):
    ref, ours = pair
    ref_losses, _ = train_losses(ref, batch(with_empty=True))
    our_losses, _ = train_losses(ours, batch(with_empty=True))
    assert ref_losses.keys() == our_losses.keys()
    for key in ref_losses:
        torch.testing.assert_close(our_losses[key], ref_losses[key], rtol=1e-6, atol=0)


def batch_of_classes(classes):
    """Two 96x128 images, each with one box per class in ``classes`` (none if empty)."""
    g = torch.Generator().manual_seed(2)
    inputs = []
    for _ in range(2):
        inst = Instances((96, 128))
        boxes = [[10.0 + 40 * i, 10, 40 + 40 * i, 50] for i in range(len(classes))]
        inst.gt_boxes = Boxes(torch.tensor(boxes).reshape(-1, 4))
        inst.gt_classes = torch.tensor(classes, dtype=torch.long)
        image = torch.randint(0, 255, (3, 96, 128), generator=g).float()
        inputs.append({"image": image, "instances": inst, "height": 96, "width": 128})
    return inputs


@pytest.mark.parametrize("classes", [[], [0, 9]], ids=["no boxes", "classes 0 and 9"])
def test_training_losses_equal_retinanet_without_boxes_and_for_class_0(classes):
    """
    RetinaNet's normaliser counts at least 1 foreground anchor (a batch
    without boxes divides by 0.9 ema + 0.1, not 0.9 ema), and class 0's
    anchors are foreground (counted, and their boxes regressed). A fresh
    pair: the shared one's moving averages stay those the other tests expect.
    """
    ref, ours = make_pair()
    ref_losses, _ = train_losses(ref, batch_of_classes(classes))
    our_losses, _ = train_losses(ours, batch_of_classes(classes))
    assert ref_losses.keys() == our_losses.keys()
    for key in ref_losses:
        torch.testing.assert_close(our_losses[key], ref_losses[key], rtol=1e-6, atol=0)


def test_gradients_equal_retinanet(pair):
    grads = []
    for model in pair:
        model.zero_grad()
        losses, _ = train_losses(model, batch())
        sum(losses.values()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_detections_equal_retinanet(pair):
    """Of a batch of two sizes, the second image asked for at twice its size: each image's
    boxes are clipped and scaled by its own size."""
    inputs = batch()
    inputs[1] = dict(inputs[1], image=inputs[1]["image"][:, :64, :96], height=128, width=192)
    results = []
    for model in pair:
        model.test_score_thresh = 0.005  # untrained scores sit at the 0.01 prior
        model.eval()
        with torch.no_grad():
            results.append([r["instances"] for r in model(inputs)])
    for ref, ours, image in zip(*results, inputs):
        assert len(ours) > 0 and ours.image_size == (image["height"], image["width"])
        assert torch.equal(ours.pred_classes, ref.pred_classes)
        torch.testing.assert_close(ours.scores, ref.scores)
        torch.testing.assert_close(ours.pred_boxes.tensor, ref.pred_boxes.tensor)


@pytest.mark.parametrize("prior", [0.01, 0.2])
@pytest.mark.parametrize("loss", LOSSES)
def test_classifier_width_and_prior(loss, prior):
    """The bias gives every class MODEL.FOCAL.PRIOR_PROB, the default 0.01 or another value."""
    model = build(loss=loss, prior_prob=prior)
    num_anchors = model.anchor_generator.num_cell_anchors[0]
    num_logits = NUM_CLASSES + 1 if loss == "softmax_focal" else NUM_CLASSES
    assert model.head.cls_score.out_channels == num_anchors * num_logits
    # The bias alone gives every class the prior; softmax classes share it.
    prior = prior / NUM_CLASSES if loss == "softmax_focal" else prior
    with torch.no_grad():
        scores = model.focal_loss.scores(model.head.cls_score.bias.view(num_anchors, num_logits))
    torch.testing.assert_close(scores, torch.full_like(scores, prior))


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_with_an_empty_image(loss):
    """loss_cls is the reference formula at gamma 2 on the model's own anchor labels, over the fresh normaliser."""
    model = build(loss=loss)
    inputs = batch(with_empty=True)
    expected = reference_loss_cls(model, inputs, loss, gamma=2.0, alpha=0.25, beta=1.0)
    losses, storage = train_losses(model, inputs)
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=1e-5)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grad = model.head.cls_score.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert storage.latest()["focal_gamma"][0] == 2.0
    # logged as the value of each iteration, not smoothed by a median over a ramp
    assert storage.smoothing_hints()["focal_gamma"] is False


@pytest.mark.parametrize("loss", LOSSES)
def test_a_training_step_under_autocast_computes_the_loss_in_float32(loss):
    """
    SOLVER.AMP.ENABLED: the head's logits come in bfloat16 (autocast on the CPU), and
    loss_cls is the reference formula on those rounded logits, in float32.
    """
    model = build(loss=loss)
    inputs = batch(with_empty=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = head_logits(model, inputs)
        expected = reference_loss_cls(model, inputs, loss, gamma=2.0, alpha=0.25, beta=1.0)
        losses, _ = train_losses(model, inputs)
    assert logits.dtype == torch.bfloat16
    assert losses["loss_cls"].dtype == torch.float32
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=1e-5)
    losses["loss_cls"].backward()
    assert model.head.cls_score.weight.grad.dtype == torch.float32


def test_ohem_without_nms_takes_a_minibatch_per_image():
    """
    OHEM with NMS off (NMS_THRESH 1, no boxes needed) keeps BATCH_PER_IMAGE anchors in each
    image of the batch, as with NMS: the model passes the number of images either way (it
    passed it with the boxes only, and the two images then shared one minibatch).
    """
    opts = ["MODEL.FOCAL.OHEM.NMS_THRESH", 1.0, "MODEL.FOCAL.OHEM.BATCH_PER_IMAGE", 16]
    model = build(loss="ohem", ohem__nms_thresh=1.0, ohem__batch_per_image=16)
    inputs = batch()
    expected = reference_loss_cls(model, inputs, "ohem", gamma=0.0, opts=opts)
    losses, _ = train_losses(model, inputs)
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=1e-5)
    logits, labels = head_logits(model, inputs)
    kept = model.focal_loss.select(logits.flatten(0, 1), labels.flatten(), boxes=None, num_images=2)
    assert [int((image >= 0).sum()) for image in kept.view(2, -1)] == [16, 16]


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_yields_standard_instances(loss):
    model = build(loss=loss)
    model.eval()
    with torch.no_grad():
        outputs = model(batch())
    for out in outputs:
        inst = out["instances"]
        assert inst.image_size == (96, 128)
        assert inst.has("pred_boxes") and inst.has("scores") and inst.has("pred_classes")
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < NUM_CLASSES)).all()


def _closed_form_scores(loss, logits):
    """Per-class scores (..., K) from logits (..., C), written out: sigmoid, softmax without background, FL*'s p*."""
    x = logits.double()
    if loss == "softmax_focal":
        return (x.exp() / x.exp().sum(-1, keepdim=True))[..., :NUM_CLASSES]
    if loss == "focal_star":
        return 1 / (
            1 + torch.exp(-(2.0 * x + 1.0))
        )  # p* = sigmoid(gamma x + beta), gamma 2, beta 1
    return 1 / (1 + torch.exp(-x))


@pytest.mark.parametrize("loss", LOSSES)
def test_detection_scores_are_the_loss_scores(loss):
    """
    Guards the mutant: inference scores with ``x.sigmoid()[:, :K]`` instead of
    ``self.class_scores(x)``, the loss's scores (softmax and FL* detections scored wrongly).

    With every candidate kept, the best detection of an image is its best
    (anchor, class) pair, whose score is written out here from the head's logits.
    """
    model = build(loss=loss).eval()
    model.test_score_thresh = 0.0
    inputs = [{k: v for k, v in x.items() if k != "instances"} for x in batch()]
    logits, _ = head_logits(model, inputs)
    scores = _closed_form_scores(loss, logits)  # (N, R, K)
    with torch.no_grad():
        outputs = model(inputs)
    for out, image_scores in zip(outputs, scores):
        inst = out["instances"]
        best = int(inst.scores.argmax())
        expected = image_scores.max()
        assert inst.scores[best].item() == pytest.approx(expected.item(), rel=1e-5)
        assert inst.pred_classes[best].item() == int(image_scores.argmax()) % NUM_CLASSES


@pytest.mark.parametrize("iteration", [25, 50, 100, 300])
def test_scheduled_gamma_is_logged_and_used(iteration):
    """
    Guards the mutant: ``FocalRetinaNet.losses`` calls the loss with
    ``gamma=self.gamma_schedule(0)`` instead of the scheduled value (the
    logged focal_gamma stays right).

    On a 0 -> 2 ramp over 100 iterations, gamma(t) = 2 min(t / 100, 1): the
    logged gamma and the loss both follow it, the loss by the reference formula.
    """
    model = build(gamma_schedule__name="linear", gamma_schedule__iters=100)
    gamma = 2.0 * min(iteration / 100, 1.0)
    expected = reference_loss_cls(model, batch(), "sigmoid_focal", gamma=gamma, alpha=0.25)
    losses, storage = train_losses(model, batch(), start_iter=iteration)
    assert storage.latest()["focal_gamma"][0] == pytest.approx(gamma, abs=1e-12)
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "iteration, constant",
    [(0, dict(loss="cross_entropy")), (50, dict(gamma=1.0)), (100, dict(gamma=2.0))],
    ids=["CE at 0", "gamma 1 at 50", "gamma 2 at 100"],
)
def test_a_ramp_is_the_constant_gamma_model_of_its_iteration(iteration, constant):
    """A 0 -> 2 ramp over 100 iterations trains as CE at 0, FL gamma 1 at 50 and gamma 2 from 100."""
    ramp = build(gamma_schedule__name="linear", gamma_schedule__iters=100, alpha=0.5)
    fixed = build(alpha=0.5, **constant)
    fixed.load_state_dict(ramp.state_dict())
    torch.testing.assert_close(
        train_losses(ramp, batch(), start_iter=iteration)[0]["loss_cls"],
        train_losses(fixed, batch(), start_iter=iteration)[0]["loss_cls"],
    )


def test_focal_star_under_a_schedule_starts_at_the_prior():
    # FL* scores are sigmoid(gamma * x + beta): the bias gives the prior at the schedule's start gamma.
    model = build(
        loss="focal_star",
        gamma=2.0,
        star_beta=1.0,
        gamma_schedule__name="linear",
        gamma_schedule__start=0.5,
        gamma_schedule__iters=100,
    )
    bias = model.head.cls_score.bias.detach().double()
    torch.testing.assert_close(
        (0.5 * bias + 1.0).sigmoid(), torch.full_like(bias, 0.01), rtol=1e-6, atol=0
    )


def test_same_seed_gives_retinanet_initial_weights():
    """
    FocalRetinaNet builds its backbone and head once, in RetinaNet's order (no
    throwaway RetinaNetHead drawing from the generator first), so with the same
    seed the sigmoid model starts from RetinaNet's weights.
    """
    ref, ours = build("RetinaNet").state_dict(), build().state_dict()
    assert ref.keys() == ours.keys()
    assert all(torch.equal(ref[k], ours[k]) for k in ref)


def test_a_loss_of_another_class_count_is_refused_naming_the_key():
    """Direct construction (from_config takes both from one key) with a 3-class loss in a 2-class model."""
    cfg = tiny_cfg()
    cfg.MODEL.RETINANET.NUM_CLASSES = 2
    args = FocalRetinaNet.from_config(cfg)
    args["focal_loss"] = build_loss("sigmoid_focal", 3)
    with pytest.raises(
        ValueError, match="has 3 classes, the model 2; both must be MODEL.RETINANET"
    ):
        FocalRetinaNet(**args)


def test_from_config_passes_every_argument_of_retinanets_but_its_loss_parameters():
    """Catches a key Detectron2's RetinaNet.from_config adds that ours would not pass on."""
    cfg = tiny_cfg()
    with torch.device("meta"):
        theirs, ours = RetinaNet.from_config(cfg), FocalRetinaNet.from_config(cfg)
    loss_parameters = {"focal_loss_alpha", "focal_loss_gamma"}
    assert set(theirs) - loss_parameters <= set(ours) and not loss_parameters & set(ours)
    shared = set(theirs) - loss_parameters - {"backbone", "head", "anchor_generator"}
    plain = lambda args: {k: getattr(args[k], "__dict__", args[k]) for k in shared}  # noqa: E731
    assert plain(ours) == plain(theirs)  # Box2BoxTransform and Matcher by their attributes


def test_retinanets_loss_parameters_are_refused_and_not_left_on_the_model():
    cfg = tiny_cfg()
    with torch.device("meta"):
        args = FocalRetinaNet.from_config(cfg)
        model = FocalRetinaNet(**args)
        assert not hasattr(model, "focal_loss_gamma") and not hasattr(model, "focal_loss_alpha")
        with pytest.raises(ValueError, match=r"does not read RetinaNet's \['focal_loss_gamma'\]"):
            FocalRetinaNet(**args, focal_loss_gamma=3.0)
        with pytest.raises(ValueError, match=r"does not read RetinaNet's \['focal_loss_alpha'\]"):
            FocalRetinaNet(**args, focal_loss_alpha=0.5)


def test_constructor_defaults_are_the_config_defaults():
    """A model, head or loss built without a config (LazyConfig, a user's code) starts as the
    YAML defaults do: gamma 2, alpha 0.25, no label smoothing, no class weighting, prior 0.01,
    SYNC_NORMALIZER off; a numpy gamma is a number."""
    focal = tiny_cfg().MODEL.FOCAL
    loss = SigmoidFocalLoss(num_classes=3)
    assert (loss.gamma, loss.alpha) == (focal.GAMMA, focal.ALPHA) == (2.0, 0.25)
    assert loss.label_smoothing == focal.LABEL_SMOOTHING == 0.0
    assert loss.class_weighting == focal.CLASS_WEIGHTING == "none"
    head = inspect.signature(FocalRetinaNetHead.__init__).parameters
    assert head["prior_prob"].default == focal.PRIOR_PROB == 0.01
    model = inspect.signature(FocalRetinaNet.__init__).parameters
    assert model["sync_normalizer"].default is focal.SYNC_NORMALIZER is False
    assert SigmoidFocalLoss(num_classes=3, gamma=np.float32(1.5)).gamma == 1.5


def test_a_schedule_passed_directly_is_checked_from_its_smallest_gamma():
    """FL* divides by gamma: a ramp from 0 given to the constructor (not through its config) is
    refused naming START, and one falling to 0 (a ramp or steps), or a constant 0, naming GAMMA."""
    from focal_det2.schedules import ConstantGamma, LinearGamma, StepGamma

    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.LOSS = "focal_star"
    with torch.device("meta"):
        args = FocalRetinaNet.from_config(cfg)
        args["gamma_schedule"] = LinearGamma(end=2.0, start=0.0, iters=10)
        with pytest.raises(ValueError, match=r"GAMMA_SCHEDULE.START=0.0: focal_star divides by"):
            FocalRetinaNet(**args)
        for schedule in (
            LinearGamma(end=0.0, start=2.0, iters=10),
            StepGamma(end=0.0, start=2.0, steps=[5]),
            ConstantGamma(end=0.0),
        ):
            args["gamma_schedule"] = schedule
            with pytest.raises(ValueError, match=r"MODEL.FOCAL.GAMMA=0.0: focal_star divides by"):
                FocalRetinaNet(**args)


def test_logged_num_pos_anchors_is_the_foreground_count_per_image():
    """
    Pins the ``num_pos_anchors`` scalar to RetinaNet's meaning: the batch's
    foreground anchors (label in 0..K-1) divided by the number of images.
    Guards the mutant that logs the batch total (``/ len(gt_labels)`` dropped).
    """
    model = build()
    inputs = batch(with_empty=True)
    _, labels = head_logits(model, inputs)
    foreground = int(((labels >= 0) & (labels != NUM_CLASSES)).sum())
    assert foreground > 0
    _, storage = train_losses(model, inputs)
    assert storage.history("num_pos_anchors").latest() == foreground / len(inputs)


@pytest.mark.parametrize("loss", ["sigmoid_focal", "softmax_focal"])  # K and K + 1 logits
def test_anchor_logits_are_the_head_logits_and_anchor_labels(loss):
    """
    Pins ``FocalRetinaNet.anchor_logits`` (what tools/plot_loss_cdf.py reads) to the
    head's (N, R, num_logits) logits and the matcher's labels, for K and K + 1 logits,
    computed without an autograd graph.
    Guards the mutant that splits the head's output into ``num_classes`` columns
    instead of ``num_logits`` (the same for sigmoid losses, wrong for softmax).
    """
    model = build(loss=loss).eval()
    inputs = batch()
    expected_logits, expected_labels = head_logits(model, inputs)
    logits, labels = model.anchor_logits(inputs)
    assert logits.shape == expected_logits.shape == (2, logits.shape[1], model.num_logits)
    assert not logits.requires_grad
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
    assert torch.equal(labels, expected_labels)


def test_sync_normalizer_in_one_process_is_the_plain_normalizer():
    """
    With MODEL.FOCAL.SYNC_NORMALIZER on and no process group (one process), a
    training step needs no all_reduce and reports the plain loss: the reference
    formula over 0.9 * 100 + 0.1 * foreground. Guards the mutant that drops
    ``or comm.get_world_size() == 1`` (an all_reduce without a process group raises).
    """
    model = build(sync_normalizer=True)
    assert model.sync_normalizer
    inputs = batch()
    expected = reference_loss_cls(model, inputs, "sigmoid_focal", gamma=2.0, alpha=0.25)
    losses, _ = train_losses(model, inputs)
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=1e-5)


def test_head_built_alone_takes_the_schedule_start_gamma():
    """
    ``FocalRetinaNetHead(cfg, input_shape)`` without the model builds the loss and the
    gamma schedule from ``cfg``: an FL* head under a ramp from START 0.5 gives the prior
    at gamma 0.5, sigmoid(0.5 b + beta) = 0.01. Guards the mutant in ``from_config``
    that passes ``init_gamma=None`` (the prior at the loss's gamma 2 instead).
    """
    cfg = tiny_cfg()
    for key, value in [
        ("LOSS", "focal_star"),
        ("GAMMA", 2.0),
        ("STAR_BETA", 1.0),
        ("GAMMA_SCHEDULE.NAME", "linear"),
        ("GAMMA_SCHEDULE.START", 0.5),
        ("GAMMA_SCHEDULE.ITERS", 100),
    ]:
        cfg.merge_from_list([f"MODEL.FOCAL.{key}", value])
    shapes = [ShapeSpec(channels=64, stride=s) for s in (8, 16, 32, 64, 128)]
    head = FocalRetinaNetHead(cfg, shapes)
    bias = head.cls_score.bias.detach().double()
    anchors = cfg.MODEL.ANCHOR_GENERATOR  # one size list: every level has the same anchors
    assert bias.numel() == len(anchors.SIZES[0]) * len(anchors.ASPECT_RATIOS[0]) * NUM_CLASSES
    torch.testing.assert_close(
        (0.5 * bias + 1.0).sigmoid(), torch.full_like(bias, 0.01), rtol=1e-6, atol=0
    )
