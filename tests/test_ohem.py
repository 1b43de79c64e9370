"""
``MODEL.FOCAL.LOSS ohem``: the per-anchor losses it ranks by, its
minibatch (hardest first, NMS over the predicted boxes, the positive
fraction, per image) and its loss on the minibatch, against values written
out here.
"""

import math

import pytest
import torch
from conftest import build_loss

from focal_det2.losses.ohem import anchor_losses

F64 = torch.float64
K = 3


def ohem(batch=128, nms=1.0, pos_fraction=0.0, alpha=0.25, class_alpha=()):
    opts = [
        "MODEL.FOCAL.OHEM.BATCH_PER_IMAGE",
        batch,
        "MODEL.FOCAL.OHEM.NMS_THRESH",
        nms,
        "MODEL.FOCAL.OHEM.POS_FRACTION",
        pos_fraction,
    ]
    return build_loss("ohem", K, alpha=alpha, class_alpha=class_alpha, opts=opts)


def softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def written_out_losses(logits, labels, alpha):
    """sum_k alpha_t * softplus(-y x): the anchor's alpha-balanced sigmoid CE, one element at a time."""
    out = []
    for row, label in zip(logits.tolist(), labels.tolist()):
        if label < 0:
            out.append(-math.inf)
            continue
        total = 0.0
        for k, x in enumerate(row):
            total += alpha * softplus(-x) if k == label else (1 - alpha) * softplus(x)
        out.append(total)
    return torch.tensor(out, dtype=F64)


def random_problem(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, K, generator=g, dtype=F64) * 3
    labels = torch.randint(-1, K + 1, (n,), generator=g)
    return logits, labels


@pytest.mark.parametrize("class_alpha", [(), (0.1, 0.5, 0.9)])
def test_anchor_losses_are_alpha_balanced_ce_summed_over_classes(class_alpha):
    logits, labels = random_problem()
    got = anchor_losses(
        logits, labels, 0.25, torch.tensor(class_alpha, dtype=F64) if class_alpha else None
    )
    if class_alpha:
        want = []
        for row, label in zip(logits.tolist(), labels.tolist()):
            want.append(
                -math.inf
                if label < 0
                else sum(
                    a * softplus(-x) if k == label else (1 - a) * softplus(x)
                    for k, (x, a) in enumerate(zip(row, class_alpha))
                )
            )
        want = torch.tensor(want, dtype=F64)
    else:
        want = written_out_losses(logits, labels, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_an_easier_anchor_is_never_kept_over_a_harder_one():
    logits, labels = random_problem(n=60, seed=1)
    kept = ohem(batch=10).select(logits, labels, boxes=None, num_images=1) >= 0
    losses = written_out_losses(logits, labels, 0.25)
    assert kept.sum() == 10
    assert losses[kept].min() >= losses[~kept & (labels >= 0)].max()
    assert torch.all(labels[kept] >= 0)  # ignored anchors never enter


def test_the_loss_is_ce_on_the_minibatch_only():
    logits, labels = random_problem(n=30, seed=2)
    loss = ohem(batch=5)
    x = logits.clone().requires_grad_(True)
    value = loss(x, labels)
    value.backward()
    losses = written_out_losses(logits, labels, 0.25)
    top = torch.topk(losses, 5).indices
    assert value.item() == pytest.approx(losses[top].sum().item(), rel=1e-12)
    outside = torch.ones(30, dtype=torch.bool)
    outside[top] = False
    assert torch.all(x.grad[outside] == 0) and torch.all(x.grad[top].abs().sum(1) > 0)
    assert value.item() == pytest.approx(loss.reference_loss(logits, labels).item(), rel=1e-12)


def test_nms_drops_the_easier_of_two_overlapping_anchors():
    # Anchors 0 and 1 predict the same box; 1 is harder. Anchor 2 is apart and easiest.
    logits = torch.tensor([[1.0, -3, -3], [3.0, -3, -3], [0.5, -3, -3]], dtype=F64)
    labels = torch.full((3,), K)  # background: a higher logit is a harder negative
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10], [50.0, 50, 60, 60]])
    kept = ohem(batch=2, nms=0.5).select(logits, labels, boxes=boxes, num_images=1)
    assert kept.tolist() == [-1, K, K]
    kept = ohem(batch=2, nms=1.0).select(logits, labels, boxes=boxes, num_images=1)
    assert kept.tolist() == [K, K, -1]  # without NMS: the two hardest


def test_positive_fraction_keeps_one_positive_per_three_negatives():
    logits, labels = random_problem(n=200, seed=3)
    kept = ohem(batch=16, pos_fraction=0.25).select(logits, labels, boxes=None, num_images=1)
    pos, neg = (kept >= 0) & (kept < K), kept == K
    assert pos.sum() == 4 and neg.sum() == 12  # 0.25 * 16 positives, 3 negatives each
    losses = written_out_losses(logits, labels, 0.25)
    is_pos, is_neg = (labels >= 0) & (labels < K), labels == K
    assert losses[pos].min() >= losses[is_pos & ~pos].max()  # the hardest of each kind
    assert losses[neg].min() >= losses[is_neg & ~neg].max()


def test_positive_fraction_with_few_positives_keeps_the_ratio():
    logits, labels = random_problem(n=50, seed=4)
    labels[labels < K] = K  # background only, then 2 positives
    labels[:2] = torch.tensor([0, 1])
    kept = ohem(batch=64, pos_fraction=0.25).select(logits, labels, boxes=None, num_images=1)
    assert int(((kept >= 0) & (kept < K)).sum()) == 2 and int((kept == K).sum()) == 6


def test_each_image_gets_its_own_minibatch():
    logits, labels = random_problem(n=40, seed=5)
    labels[20:] = K
    logits[20:] -= 10  # the second image's anchors are all easy: a global top-8 would skip it
    kept = ohem(batch=4).select(logits, labels, boxes=None, num_images=2) >= 0
    assert kept[:20].sum() == 4 and kept[20:].sum() == 4


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("BATCH_PER_IMAGE", 0, "MODEL.FOCAL.OHEM.BATCH_PER_IMAGE=0 must be an integer >= 1"),
        ("NMS_THRESH", 0.0, "MODEL.FOCAL.OHEM.NMS_THRESH=0.0 must be in (0, 1]"),
        ("NMS_THRESH", 1.5, "MODEL.FOCAL.OHEM.NMS_THRESH=1.5 must be in (0, 1]"),
        ("POS_FRACTION", 1.0, "MODEL.FOCAL.OHEM.POS_FRACTION=1.0 must be in [0, 1)"),
    ],
)
def test_bad_ohem_keys_are_named(key, value, message):
    with pytest.raises(
        ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        build_loss("ohem", K, opts=[f"MODEL.FOCAL.OHEM.{key}", value])


def test_nms_without_boxes_is_named():
    logits, labels = random_problem(n=6)
    with pytest.raises(
        ValueError, match=r"ohem with NMS_THRESH=0.5 needs boxes of shape \(6, 4\), got None"
    ):
        ohem(nms=0.5)(logits, labels)
    with pytest.raises(ValueError, match="do not split into num_images=4"):
        ohem()(logits, labels, num_images=4)
