"""
An embedded COCO-format detection data set built from real handwriting.

scikit-learn ships the UCI optical-digits images (1,797 8x8 digits, values
0..16) inside its package. Each image of this data set is a dark, noisy
canvas on which several of those digits are scaled (bilinear) to random
sizes and placed at random positions with limited overlap: many small
objects on a large background, the foreground/background imbalance focal
loss addresses. Generation is deterministic under a seed and draws from no
global random state.

The train and val splits draw their digits from disjoint pools of source
digits (:func:`source_indices`), so no handwritten sample is seen in both.
Each annotation records its source digit under the extra key
``"source_index"`` (an index into ``sklearn.datasets.load_digits()``).

Data sets registered with :func:`register_digits` are generated on first use
and cached under :func:`digits_root`. :data:`CANVAS_SIZES` lists the canvas
sides of the registered ``digits_{train,val}_s<side>`` splits: digits drawn
alike (the same source pools and seed, 12-40 px, 3-8 per image), with only the
canvas growing, so each object sits in more background. The images themselves
differ between canvases (placement draws from the same random stream, which
then advances differently): the objects follow the same distribution, they
are not the same objects.

Long-tailed splits (``imbalance_factor`` f): the class of each digit follows
``n_c = n_0 * f^(-c / (K - 1))``, digit c being the c-th most frequent class
(digit 0 the most frequent, digit 9 the least, n_0 / n_9 = f); f = 1 gives
balanced classes. ``digits_train_lt100`` and ``digits_train_lt10`` train on
such a tail, ``digits_val_lt`` is their balanced val split
(:data:`LONGTAIL_FACTORS`).
"""

import functools
import io
import json
import math
import os
from pathlib import Path

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from PIL import Image

__all__ = [
    "SPLITS",
    "DIGIT_CLASSES",
    "CANVAS_SIZES",
    "LONGTAIL_FACTORS",
    "canvas_dataset_name",
    "longtail_shares",
    "source_indices",
    "digits_root",
    "generate_digits",
    "register_digits",
    "ensure_generated",
    "register_all_digits",
]

SPLITS = ("train", "val")
DIGIT_CLASSES = [str(d) for d in range(10)]

# Bump when the generator changes, so an old cache is never reused.
_FORMAT_VERSION = 1
# The source digits are split once, with this seed, into disjoint pools.
_POOL_SEED = 2017
_NUM_VAL_SOURCES = 300
# A scaled digit's pixels above this fraction of full ink form its box.
_INK_THRESHOLD = 0.125
# Intensities on the 0..255 scale: background level, noise std, and the
# range of a digit's peak ink above the background, as a fraction of 255 - background.
_BACKGROUND = 16.0
_NOISE_STD = 4.0
_BRIGHTNESS = (0.7, 1.0)
# Placement: a new box may overlap a placed one up to this IoU.
_MAX_IOU = 0.3
_MAX_TRIES = 50

# name -> (out_dir, generation parameters) of the data sets registered here.
_REGISTERED = {}

# Canvas sides in pixels of the splits registered as digits_{train,val}_s<side>.
CANVAS_SIZES = (128, 256, 512, 768)
# Images per split of the full-size data sets, at every canvas size.
_NUM_IMAGES = {"train": 2000, "val": 300}

# Imbalance factors of the registered long-tailed train splits digits_train_lt<f>.
LONGTAIL_FACTORS = (100, 10)

_BUILTIN = {
    "digits_train": dict(split="train", num_images=_NUM_IMAGES["train"]),
    "digits_val": dict(split="val", num_images=_NUM_IMAGES["val"]),
    "digits_train_tiny": dict(split="train", num_images=16),
    "digits_val_tiny": dict(split="val", num_images=8),
    **{
        f"digits_train_lt{f}": dict(
            split="train", num_images=_NUM_IMAGES["train"], imbalance_factor=f
        )
        for f in LONGTAIL_FACTORS
    },
    # digits_val draws its sources uniformly from the val pool, whose classes are uneven
    # (22-36 digits a class): the long-tail benchmark evaluates on exactly balanced classes.
    "digits_val_lt": dict(split="val", num_images=_NUM_IMAGES["val"], imbalance_factor=1),
}


def canvas_dataset_name(split, image_size):
    """
    The registered name of a split at one canvas size.

    Args:
        split (str): "train" or "val".
        image_size (int): canvas side in pixels, one of :data:`CANVAS_SIZES`.

    Returns:
        str: ``digits_<split>_s<image_size>``, e.g. ``digits_train_s512``.
    """
    _check_choice("split", split, SPLITS)
    _check_choice("image_size", image_size, CANVAS_SIZES)
    return f"digits_{split}_s{image_size}"


@functools.lru_cache(maxsize=1)
def _source_digits():
    """
    Returns:
        images (ndarray): (1797, 8, 8) float32 in [0, 1].
        labels (ndarray): (1797,) int64 digit labels 0..9.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target


def source_indices(split):
    """
    The pool of source digits a split draws from.

    Args:
        split (str): "train" or "val".

    Returns:
        ndarray: sorted int indices into ``sklearn.datasets.load_digits()``;
            the val pool has 300 digits, the train pool the other 1,497, and
            the two never share an index.
    """
    _check_choice("split", split, SPLITS)
    num_sources = len(_source_digits()[1])
    perm = np.random.default_rng(_POOL_SEED).permutation(num_sources)
    pool = perm[-_NUM_VAL_SOURCES:] if split == "val" else perm[:-_NUM_VAL_SOURCES]
    return np.sort(pool)


def digits_root():
    """
    Returns:
        Path: the cache directory of the generated data sets: the environment
            variable ``FOCAL_DET2_DATASETS`` if set, else ``<repo root>/datasets``
            in a checkout (``pip install -e .``), else ``~/.cache/focal_det2/datasets``
            (an installed package's folder is site-packages, no place for data).
    """
    env = os.environ.get("FOCAL_DET2_DATASETS")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    if (root / "setup.py").is_file():
        return root / "datasets"
    return Path.home() / ".cache" / "focal_det2" / "datasets"


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_int(name, value, low):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_pair(name, value, low, high):
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and low <= value[0] <= value[1] <= high
    )
    if not ok:
        raise ValueError(
            f"{name} must be a pair of integers (min, max) with "
            f"{low} <= min <= max <= {high}, got {value!r}"
        )


def _check_factor(name, value):
    ok = (
        value is None
        or isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 1
    )
    if not ok:
        raise ValueError(f"{name} must be None or a finite number >= 1, got {value!r}")


def _check_args(
    split, num_images, image_size, digits_per_image, digit_size, seed, imbalance_factor
):
    _check_choice("split", split, SPLITS)
    _check_int("num_images", num_images, 1)
    _check_int("image_size", image_size, 8)
    _check_pair("digits_per_image", digits_per_image, 0, 1000)
    _check_pair("digit_size", digit_size, 4, image_size)
    _check_int("seed", seed, 0)
    _check_factor("imbalance_factor", imbalance_factor)


def _cache_name(
    split, num_images, image_size, digits_per_image, digit_size, seed, imbalance_factor
):
    """The sub-folder name of a split; it encodes every generation parameter."""
    tail = "" if imbalance_factor is None else f"_lt{imbalance_factor:g}"
    return (
        f"digits_{split}_n{num_images}_s{image_size}"
        f"_k{digits_per_image[0]}-{digits_per_image[1]}"
        f"_d{digit_size[0]}-{digit_size[1]}{tail}_seed{seed}_v{_FORMAT_VERSION}"
    )


def longtail_shares(imbalance_factor):
    """
    The class shares of a long-tailed split.

    Args:
        imbalance_factor (float): f >= 1, the ratio of the most to the least frequent class.

    Returns:
        ndarray: (K,) float64 shares summing to 1, ``p_c ∝ f^(-c / (K - 1))`` for digit c:
            digit 0 the most frequent, digit K - 1 = 9 the least, p_0 / p_9 = f.
    """
    _check_factor("imbalance_factor", imbalance_factor)
    num_classes = len(DIGIT_CLASSES)
    shares = float(imbalance_factor) ** (-np.arange(num_classes) / (num_classes - 1))
    return shares / shares.sum()


class _LongTailSources:
    """
    Picks source digits whose classes follow :func:`longtail_shares` by quota: after k
    digits, class c has been picked about ``p_c * k`` times. Each digit goes to the class
    whose count lags its quota most, plus a uniform jitter in [0, 1) so that classes close
    to their quota take turns in a random order; the source digit is then drawn uniformly
    from the pool's digits of that class. Counts carry over between the images of a split.
    """

    def __init__(self, pool, labels, imbalance_factor):
        self.shares = longtail_shares(imbalance_factor)
        self.by_class = [pool[labels[pool] == c] for c in range(len(self.shares))]
        self.counts = np.zeros(len(self.shares), np.int64)

    def __call__(self, rng, count):
        jitter = rng.random((count, len(self.shares)))
        classes = []
        for u in jitter:
            lag = self.shares * (self.counts.sum() + 1) - self.counts
            c = int(np.argmax(lag + u))
            self.counts[c] += 1
            classes.append(c)
        sizes = np.array([len(self.by_class[c]) for c in classes], np.int64)
        picks = rng.integers(0, sizes)
        return [int(self.by_class[c][i]) for c, i in zip(classes, picks.tolist())]


def _uniform_sources(pool):
    """Picks source digits uniformly from ``pool``: the class shares are the pool's."""
    return lambda rng, count: rng.choice(pool, size=count).tolist()


def _iou(a, b):
    """
    Args:
        a, b (tuple[int, int, int, int]): XYXY boxes of positive area.

    Returns:
        float: their intersection over union.
    """
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _scaled_digit(image, side):
    """
    Args:
        image (ndarray): (8, 8) float32 digit in [0, 1].
        side (int): output side in pixels.

    Returns:
        patch (ndarray): (side, side) float32 bilinear resize of ``image``.
        box (tuple[int, int, int, int]): XYXY tight box of the ink (pixels
            above ``_INK_THRESHOLD``) inside ``patch``.
    """
    patch = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))
    ink = patch > _INK_THRESHOLD
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    return patch, (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def _render_image(rng, pick_sources, image_size, digits_per_image, digit_size):
    """
    Draws one canvas. The random numbers of its digits (source, side,
    brightness, every candidate position) are drawn up front, one call each;
    ``pick_sources(rng, count)`` returns the ``count`` source indices.

    Returns:
        image (ndarray): (H, W) uint8 grayscale image.
        objects (list[tuple[int, tuple]]): (source index, XYXY ink box) of
            every placed digit.
    """
    count = rng.integers(digits_per_image[0], digits_per_image[1] + 1)
    indices = pick_sources(rng, count)
    sides = np.rint(np.exp(rng.uniform(*np.log(digit_size), size=count))).astype(int)
    peaks = (rng.uniform(*_BRIGHTNESS, size=count) * (255 - _BACKGROUND)).tolist()
    tries = rng.integers(0, image_size - sides[:, None, None] + 1, size=(count, _MAX_TRIES, 2))
    canvas = np.full((image_size, image_size), _BACKGROUND, np.float32)
    objects = []
    for index, side, peak, positions in zip(indices, sides.tolist(), peaks, tries.tolist()):
        patch, (x0, y0, x1, y1) = _scaled_digit(_source_digits()[0][index], side)
        for x, y in positions:
            box = (x + x0, y + y0, x + x1, y + y1)
            if all(_iou(box, placed) <= _MAX_IOU for _, placed in objects):
                region = canvas[y : y + side, x : x + side]
                np.maximum(region, _BACKGROUND + patch * peak, out=region)
                objects.append((index, box))
                break
    canvas += _NOISE_STD * rng.standard_normal(canvas.shape, dtype=np.float32)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects


def _atomic_write(path, data):
    """Writes bytes to ``path`` through a temporary file and ``os.replace``."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _png_bytes(gray):
    buffer = io.BytesIO()
    rgb = np.stack([gray] * 3, axis=-1)
    # Level 1 encodes noisy images faster than the default level, at about the same size.
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def generate_digits(
    out_dir,
    *,
    split,
    num_images,
    image_size=128,
    digits_per_image=(3, 8),
    digit_size=(12, 40),
    seed=0,
    imbalance_factor=None,
):
    """
    Writes a COCO-format detection data set of handwritten digits.

    Images are grayscale-looking RGB PNGs; every annotation is the tight
    XYWH box of a digit's ink, ``category_id`` 1..10 for digits "0".."9",
    and ``source_index``, the digit's index in ``load_digits()``.

    The json file is written last and atomically (images too), so it marks a
    complete data set: if it exists, this returns at once without checking
    that it was made with the same parameters. Give every parameter set its
    own ``out_dir`` (as :func:`register_digits` does).

    Args:
        out_dir (str or PathLike): receives ``images/*.png`` and ``annotations.json``.
        split (str): "train" or "val"; picks the pool of source digits.
        num_images (int): number of images, >= 1.
        image_size (int): side of the square images in pixels.
        digits_per_image (tuple[int, int]): inclusive range of the number of
            digits drawn per image; a digit that finds no place overlapping
            placed ones by IoU <= 0.3 is dropped.
        digit_size (tuple[int, int]): inclusive range of the side in pixels a
            digit is scaled to, drawn log-uniformly; at most ``image_size``.
        seed (int): seed of the generator, >= 0.
        imbalance_factor (float or None): None: each source digit is drawn
            uniformly from the split's pool, so the class shares are the pool's
            (the splits without a tail). A number f >= 1: the classes follow
            :func:`longtail_shares` (digit 0 the most frequent, digit 9 f times
            rarer), by quota over the digits drawn so far (every class within
            about 2 digits of its share, see ``_LongTailSources``); f = 1 gives
            balanced classes. A digit dropped for want of a place is not replaced,
            so the realised counts can fall a little below the quota.

    Returns:
        str: path of ``annotations.json``.
    """
    _check_args(split, num_images, image_size, digits_per_image, digit_size, seed, imbalance_factor)
    json_file = os.path.join(out_dir, "annotations.json")
    if os.path.exists(json_file):
        return json_file
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    labels = _source_digits()[1]
    pool = source_indices(split)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    pick_sources = (
        _uniform_sources(pool)
        if imbalance_factor is None
        else _LongTailSources(pool, labels, imbalance_factor)
    )
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        gray, objects = _render_image(rng, pick_sources, image_size, digits_per_image, digit_size)
        file_name = f"{image_id:06d}.png"
        _atomic_write(os.path.join(out_dir, "images", file_name), _png_bytes(gray))
        images.append(dict(id=image_id, file_name=file_name, width=image_size, height=image_size))
        for index, (x0, y0, x1, y1) in objects:
            w, h = x1 - x0, y1 - y0
            annotations.append(
                dict(
                    id=len(annotations) + 1,  # COCOeval treats id 0 as "unmatched"
                    image_id=image_id,
                    category_id=int(labels[index]) + 1,
                    bbox=[x0, y0, w, h],
                    area=w * h,
                    iscrowd=0,
                    source_index=index,
                )
            )
    dataset = dict(
        info=dict(
            description="focal_det2 digits: sklearn load_digits placed on canvases",
            version=_FORMAT_VERSION,
            parameters=dict(
                split=split,
                num_images=num_images,
                image_size=image_size,
                digits_per_image=list(digits_per_image),
                digit_size=list(digit_size),
                seed=seed,
                imbalance_factor=imbalance_factor,
            ),
        ),
        licenses=[],
        images=images,
        annotations=annotations,
        categories=[dict(id=i + 1, name=name) for i, name in enumerate(DIGIT_CLASSES)],
    )
    _atomic_write(json_file, json.dumps(dataset).encode())
    return json_file


def _load_digits(name, out_dir, params):
    json_file = generate_digits(out_dir, **params)
    return load_coco_json(json_file, os.path.join(out_dir, "images"), name)


def register_digits(
    name,
    *,
    split,
    num_images,
    image_size=128,
    digits_per_image=(3, 8),
    digit_size=(12, 40),
    seed=0,
    imbalance_factor=None,
):
    """
    Registers a digits data set in Detectron2's ``DatasetCatalog`` and
    ``MetadataCatalog``. Registration does no I/O: the data set is generated
    under ``digits_root()/<name encoding the parameters>`` the first time
    ``DatasetCatalog.get(name)`` or :func:`ensure_generated` runs, then cached.

    The metadata carries ``json_file`` and ``image_root``, so ``COCOEvaluator``
    reads the generated json directly; it reads it in its constructor, so call
    ``ensure_generated(name)`` before building one.

    The cache directory is resolved here, at registration. Registering the
    same name again with the same parameters and cache directory does
    nothing; with others it raises ``ValueError``.

    Args:
        name (str): the data set name.
        split, num_images, image_size, digits_per_image, digit_size, seed, imbalance_factor:
            as in :func:`generate_digits`.
    """
    _check_args(split, num_images, image_size, digits_per_image, digit_size, seed, imbalance_factor)
    params = dict(
        split=split,
        num_images=num_images,
        image_size=image_size,
        digits_per_image=tuple(digits_per_image),
        digit_size=tuple(digit_size),
        seed=seed,
        imbalance_factor=imbalance_factor,
    )
    out_dir = str(digits_root() / _cache_name(**params))
    if name in DatasetCatalog.list():
        if _REGISTERED.get(name) == (out_dir, params):
            return
        raise ValueError(
            f"name {name!r} is already registered in DatasetCatalog with other data: "
            f"{_REGISTERED.get(name, 'not a digits data set')}, not {(out_dir, params)}"
        )
    DatasetCatalog.register(name, functools.partial(_load_digits, name, out_dir, params))
    MetadataCatalog.get(name).set(
        thing_classes=list(DIGIT_CLASSES),
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(DIGIT_CLASSES))},
        evaluator_type="coco",
        json_file=os.path.join(out_dir, "annotations.json"),
        image_root=os.path.join(out_dir, "images"),
        generated_on_load=True,  # the files above are written then (checks.check_dataset_files)
    )
    _REGISTERED[name] = (out_dir, params)


def ensure_generated(name):
    """
    Generates a data set registered with :func:`register_digits` unless it
    is cached. Call it before building a ``COCOEvaluator`` for ``name``.

    Args:
        name (str): a name registered with :func:`register_digits`.

    Returns:
        str: path of its ``annotations.json``.
    """
    if name not in _REGISTERED:
        raise ValueError(
            f"name must be one of the digits data sets {sorted(_REGISTERED)}, got {name!r}"
        )
    out_dir, params = _REGISTERED[name]
    return generate_digits(out_dir, **params)


def register_all_digits():
    """
    Registers the built-in splits: ``digits_train`` (2,000 images),
    ``digits_val`` (300), and ``digits_train_tiny`` (16) / ``digits_val_tiny``
    (8) for tests and smoke runs; the long-tailed ``digits_train_lt100`` and
    ``digits_train_lt10`` (2,000 images, imbalance factor 100 and 10) and their
    balanced val split ``digits_val_lt`` (300 images, factor 1); all 128 x 128.
    Then, for every side S in
    :data:`CANVAS_SIZES`, ``digits_train_sS`` (2,000 images) and
    ``digits_val_sS`` (300): the parameters of ``digits_train`` /
    ``digits_val`` with ``image_size=S`` and nothing else changed (same seed,
    source-digit pools, digits per image and digit sizes), so
    ``digits_train_s128`` is ``digits_train`` under another name, with the
    same cache. Safe to call repeatedly.
    """
    for name, params in _BUILTIN.items():
        register_digits(name, **params)
    for split, num_images in _NUM_IMAGES.items():
        for side in CANVAS_SIZES:
            register_digits(
                canvas_dataset_name(split, side),
                split=split,
                num_images=num_images,
                image_size=side,
            )
