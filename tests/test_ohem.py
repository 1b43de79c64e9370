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
from torchvision.ops import nms

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


def test_anchor_losses_of_logits_that_need_a_gradient_have_none():
    """
    The ranking is taken with no gradient (no graph over the (N, K) logits is built for it),
    and its values are those of detached logits. Guards the mutant that drops
    ``anchor_losses``' ``torch.no_grad()``.
    """
    logits, labels = random_problem()
    got = anchor_losses(logits.clone().requires_grad_(), labels, 0.25, None)
    assert not got.requires_grad and got.grad_fn is None
    torch.testing.assert_close(got, written_out_losses(logits, labels, 0.25), rtol=1e-12, atol=0)


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


@pytest.mark.parametrize("nms, kept_labels", [(0.5, [-1, K, K]), (0.7, [K, K, -1])])
def test_nms_removes_an_overlap_above_nms_thresh_only(nms, kept_labels):
    # Anchors 0 and 1 predict boxes of IoU 0.6 (60 / 100); 1 is harder, 2 is apart and easiest.
    # NMS_THRESH 0.5 removes anchor 0, so the minibatch of 2 takes anchor 2; 0.7 keeps both.
    logits = torch.tensor([[1.0, -3, -3], [3.0, -3, -3], [0.5, -3, -3]], dtype=F64)
    labels = torch.full((3,), K)
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 6], [50.0, 50, 60, 60]])
    kept = ohem(batch=2, nms=nms).select(logits, labels, boxes=boxes, num_images=1)
    assert kept.tolist() == kept_labels


def grid_boxes(n, start=0):
    """n disjoint 10 x 10 boxes (no two overlap), the i-th at row/column ``start + i``."""
    i = torch.arange(start, start + n, dtype=torch.float32)
    x, y = (i % 50) * 20, (i // 50) * 20
    return torch.stack([x, y, x + 10, y + 10], dim=1)


def background_ranked(n):
    """n background anchors, anchor i harder than anchor i + 1 (its loss falls with i)."""
    logits = torch.full((n, K), -10.0, dtype=F64)
    logits[:, 0] = 5.0 - 0.05 * torch.arange(n, dtype=F64)
    return logits, torch.full((n,), K)


@pytest.mark.parametrize("pos_fraction", [0.0, 0.25])
def test_nms_with_fewer_survivors_than_the_minibatch_keeps_them_all(pos_fraction):
    """
    3 anchors, hardest first: negatives 0 and 2 predict one box, positive 1 is apart. NMS
    keeps 0 and 1, fewer than BATCH_PER_IMAGE 128 (and than the ratio's 3 negatives for 1
    positive): the minibatch is both, once NMS has seen every anchor.
    """
    logits, labels = background_ranked(3)
    labels[1] = 0  # logit 4.95 for its class: an easy positive, ranked last
    boxes = torch.cat([grid_boxes(1), grid_boxes(1, start=1), grid_boxes(1)])
    loss = ohem(batch=128, nms=0.5, pos_fraction=pos_fraction)
    kept = loss.select(logits, labels, boxes=boxes, num_images=1)
    assert kept.tolist() == [K, 0, -1]


def test_nms_looks_past_the_hardest_anchors_when_they_overlap():
    # The 20 hardest anchors predict one box: NMS keeps the first of them, then the next 3
    # apart, whatever prefix of the ranking it looks at first.
    logits, labels = background_ranked(100)
    boxes = torch.cat([grid_boxes(1).expand(20, 4), grid_boxes(80, start=1)])
    kept = ohem(batch=4, nms=0.5).select(logits, labels, boxes=boxes, num_images=1) >= 0
    assert kept.nonzero().squeeze(1).tolist() == [0, 20, 21, 22]


def test_nms_looks_further_while_the_minibatch_lacks_one_anchor():
    # The 16 hardest anchors (4 x the batch of 4) predict 3 boxes: 3 survivors, one short;
    # NMS must look further down the ranking for the fourth.
    logits, labels = background_ranked(40)
    boxes = torch.cat(
        [grid_boxes(3).repeat_interleave(torch.tensor([6, 5, 5]), dim=0), grid_boxes(24, 3)]
    )
    kept = ohem(batch=4, nms=0.5).select(logits, labels, boxes=boxes, num_images=1) >= 0
    assert kept.nonzero().squeeze(1).tolist() == [0, 6, 11, 16]


def test_each_image_gets_its_own_nms_over_its_own_boxes():
    """Two images: the minibatch of each is that of the image alone, with its own boxes
    (the first image's 40 anchors predict one box, the second's are apart)."""
    logits, labels = background_ranked(80)
    boxes = torch.cat([grid_boxes(1).expand(40, 4), grid_boxes(40, start=1)])
    loss = ohem(batch=4, nms=0.5)
    both = loss.select(logits, labels, boxes=boxes, num_images=2)
    alone = [
        loss.select(logits[rows], labels[rows], boxes=boxes[rows], num_images=1)
        for rows in (slice(0, 40), slice(40, 80))
    ]
    assert torch.equal(both, torch.cat(alone))
    assert (both[:40] >= 0).sum() == 1 and (both[40:] >= 0).sum() == 4


def test_the_ranking_takes_the_per_class_alpha():
    """With CLASS_ALPHA the hardest anchors are those of the per-class alpha_t, not ALPHA's."""
    from focal_det2.losses.ohem import anchor_losses

    logits, labels = random_problem(n=200, seed=8)
    class_alpha = (0.01, 0.5, 0.99)
    kept = ohem(batch=10, class_alpha=class_alpha).select(logits, labels, boxes=None, num_images=1)
    table = torch.tensor(class_alpha, dtype=F64)

    def hardest(class_alpha):
        losses = anchor_losses(logits, labels, 0.25, class_alpha)
        return sorted(torch.argsort(losses, descending=True)[:10].tolist())

    assert sorted((kept >= 0).nonzero().squeeze(1).tolist()) == hardest(table) != hardest(None)


def test_nms_with_a_ratio_finds_easy_positives_at_the_end_of_the_ranking():
    # 60 hard background anchors, then 3 easy positives; positive 61 predicts the box of
    # background anchor 0, which is harder, so NMS removes it.
    logits, labels = background_ranked(63)
    logits[60:] = torch.tensor([8.0, -8, -8], dtype=F64)
    labels[60:] = 0
    boxes = grid_boxes(63)
    boxes[61] = boxes[0]
    kept = ohem(batch=8, nms=0.5, pos_fraction=0.25).select(
        logits, labels, boxes=boxes, num_images=1
    )
    assert (kept >= 0).nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4, 5, 60, 62]


@pytest.mark.parametrize(
    "same_box_until, expected",
    [(34, [0, 1, 2, 34, 35, 36, 37, 38]), (28, [0, 1, 2, 28, 29, 30, 31, 32])],
    ids=["past the first prefix", "one negative short in the first prefix"],
)
def test_nms_with_a_ratio_takes_every_negative_of_its_quota(same_box_until, expected):
    """
    Two hard positives, then background anchors 2 to ``same_box_until`` - 1 predicting one
    box: NMS keeps the first of those, and the ratio's other 5 negatives (3 per positive) come
    from further down the ranking. With 26 such anchors the first NMS prefix (the hardest
    32 = 4 x 8) holds 5 negatives, one short of the ratio's 6, so the search must look past it.
    """
    logits, labels = background_ranked(80)
    logits[:2] = torch.tensor([-20.0, -10, -10], dtype=F64)
    labels[:2] = 0
    boxes = grid_boxes(80)
    boxes[2:same_box_until] = boxes[2]
    kept = ohem(batch=8, nms=0.5, pos_fraction=0.25).select(
        logits, labels, boxes=boxes, num_images=1
    )
    assert (kept >= 0).nonzero().squeeze(1).tolist() == expected


@pytest.mark.parametrize("pos_fraction", [0.0, 0.25])
def test_nms_minibatch_is_that_of_nms_over_every_anchor(pos_fraction):
    g = torch.Generator().manual_seed(6)
    n, batch = 3000, 16
    logits, labels = random_problem(n=n, seed=6)
    labels[labels.clamp_min(0) < K] = K  # mostly background, like a detector's anchors
    labels[torch.randperm(n, generator=g)[:60]] = torch.randint(0, K, (60,), generator=g)
    centres = torch.rand(n, 2, generator=g) * 200  # boxes crowd: NMS keeps about 1 in 20
    boxes = torch.cat([centres, centres + 30], dim=1)
    kept = ohem(batch=batch, nms=0.5, pos_fraction=pos_fraction).select(
        logits, labels, boxes=boxes, num_images=1
    )
    losses = written_out_losses(logits, labels, 0.25)
    valid = (labels >= 0).nonzero().squeeze(1)
    ranked = valid[nms(boxes[valid], losses[valid].float(), 0.5)]  # NMS over every anchor
    if pos_fraction:
        positives, negatives = ranked[labels[ranked] < K], ranked[labels[ranked] == K]
        want = torch.cat([positives[:4], negatives[:12]])  # 16 x 0.25 positives, 3 negatives each
    else:
        want = ranked[:batch]
    assert sorted((kept >= 0).nonzero().squeeze(1).tolist()) == sorted(want.tolist())


def test_positive_fraction_keeps_one_positive_per_three_negatives():
    logits, labels = random_problem(n=200, seed=3)
    kept = ohem(batch=16, pos_fraction=0.25).select(logits, labels, boxes=None, num_images=1)
    pos, neg = (kept >= 0) & (kept < K), kept == K
    assert pos.sum() == 4 and neg.sum() == 12  # 0.25 * 16 positives, 3 negatives each
    losses = written_out_losses(logits, labels, 0.25)
    is_pos, is_neg = (labels >= 0) & (labels < K), labels == K
    assert losses[pos].min() >= losses[is_pos & ~pos].max()  # the hardest of each kind
    assert losses[neg].min() >= losses[is_neg & ~neg].max()


@pytest.mark.parametrize(
    "batch, pos_fraction, num_pos, num_neg",
    [
        (16, 0.25, 4, 12),
        (10, 0.25, 2, 6),
        (12, 0.3, 3, 7),
        (10, 0.3, 3, 7),
        (15, 0.3, 4, 9),
        (100, 0.29, 29, 71),
        (8, 0.4, 3, 5),
        (3, 0.8, 2, 1),
    ],
)
def test_positive_fraction_quota_is_floor_f_b_positives_and_the_rounded_ratio(
    batch, pos_fraction, num_pos, num_neg
):
    """
    Plenty of both kinds: floor(f B) positives (2.5 -> 2, 3.6 -> 3) and
    (1 - f) / f times as many negatives, rounded to the nearest integer, halves up
    (4 x 0.7 / 0.3 = 9.33 -> 9; 3 x 0.7 / 0.3 is 6.999... in floating point
    and must give 7, not 6; 100 x 0.29 is 28.999... and must give 29; the ties
    3 x 0.6 / 0.4 = 4.5 and 2 x 0.2 / 0.8 = 0.5 give 5 and 1, where Python's
    round, halves to even, gives 4 and 0).
    """
    logits, labels = random_problem(n=1000, seed=3)
    kept = ohem(batch=batch, pos_fraction=pos_fraction).select(
        logits, labels, boxes=None, num_images=1
    )
    assert int(((kept >= 0) & (kept < K)).sum()) == num_pos
    assert int((kept == K).sum()) == num_neg


def test_positive_fraction_with_few_positives_keeps_the_ratio():
    """2 positives: 6 negatives; the ignored anchors (label -1 < K) count as neither."""
    logits, labels = random_problem(n=50, seed=4)
    labels[labels >= 0] = K  # background and ignored only, then 2 positives
    labels[:2] = torch.tensor([0, 1])
    assert int((labels == -1).sum()) >= 5
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
        # 0.005 x 128 = 0.64: no positive, and so no negative, would enter a minibatch
        (
            "POS_FRACTION",
            0.005,
            "MODEL.FOCAL.OHEM.POS_FRACTION=0.005 with BATCH_PER_IMAGE=128 lets",
        ),
    ],
)
def test_bad_ohem_keys_are_named(key, value, message):
    with pytest.raises(
        ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        build_loss("ohem", K, opts=[f"MODEL.FOCAL.OHEM.{key}", value])


def test_ohem_built_in_python_has_the_config_defaults_and_checks():
    """Built without a config (a LazyConfig swap): 128 anchors an image, NMS at 0.5, no ratio,
    as the YAML defaults; a bool batch size and a split into no images are refused."""
    from focal_det2.losses.ohem import OHEMLoss

    loss = OHEMLoss(num_classes=K)
    assert (loss.batch_per_image, loss.nms_thresh, loss.pos_fraction) == (128, 0.5, 0.0)
    with pytest.raises(ValueError, match=r"BATCH_PER_IMAGE=True must be an integer >= 1"):
        OHEMLoss(num_classes=K, batch_per_image=True)
    logits, labels = random_problem(n=6)
    for num_images in (0, -2):
        with pytest.raises(ValueError, match=f"do not split into num_images={num_images} images"):
            loss.select(logits, labels, boxes=None, num_images=num_images)


def test_the_smallest_ratio_that_admits_one_positive_is_accepted():
    loss = build_loss("ohem", K, opts=["MODEL.FOCAL.OHEM.POS_FRACTION", 1 / 128])
    assert loss._quota(5) == (1, 127)


def test_nms_without_boxes_is_named():
    logits, labels = random_problem(n=6)
    with pytest.raises(
        ValueError,
        match=r"MODEL.FOCAL.OHEM.NMS_THRESH=0.5 needs boxes of shape \(6, 4\), got None.*NMS_THRESH 1",
    ):
        ohem(nms=0.5)(logits, labels)
    with pytest.raises(ValueError, match=r"needs boxes of shape \(6, 4\), got \(5, 4\)"):
        ohem(nms=0.5)(logits, labels, boxes=torch.zeros(5, 4))
    with pytest.raises(ValueError, match="do not split into num_images=4"):
        ohem()(logits, labels, num_images=4)
