"""
Checks of training data, so that bad input stops training at once with an
error that names the data set, its json file, the image and what is allowed,
instead of failing later or being dropped silently.

When the train loader is built (:func:`load_checked_dataset_dicts`):

- an annotation whose category id is not among the json's categories, or
  whose class is outside the model's ``NUM_CLASSES``, raises ``ValueError``;
- a box with non-positive (or NaN) width or height raises ``ValueError``, or
  is dropped with a log line when ``DATALOADER.DEGENERATE_BOXES`` is "drop";
- an image file that does not exist raises ``FileNotFoundError``.

When an image is loaded (:class:`CheckedDatasetMapper`): an image file that
cannot be read raises ``ValueError`` (``FileNotFoundError`` if it
disappeared) naming the image id and file.

Images without annotations and crowd annotations are valid: Detectron2
drops the former when ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` is on and
ignores crowd boxes in training.
"""

import json
import logging
from typing import List, Optional

from detectron2.data import DatasetMapper, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.data.detection_utils import check_metadata_consistency
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

__all__ = [
    "has_area",
    "load_checked_dataset_dicts",
    "load_checked_datasets",
    "check_dataset_dicts",
    "check_degenerate_boxes_option",
    "check_same_classes",
    "CheckedDatasetMapper",
]

_XYXY_MODES = (BoxMode.XYXY_ABS, BoxMode.XYXY_REL)
DEGENERATE_BOXES = ("error", "drop")

logger = logging.getLogger(__name__)


def _source(dataset_name):
    """'data set NAME (json FILE)', or without the json if the data set has none."""
    json_file = MetadataCatalog.get(dataset_name).get("json_file")
    return f"data set {dataset_name!r}" + (f" (json {json_file})" if json_file else "")


def _image(record):
    return f"image id {record.get('image_id')} ({record['file_name']})"


def _box_size(bbox, mode):
    """(width, height) of a box given in ``mode``."""
    if BoxMode(mode) in _XYXY_MODES:
        return bbox[2] - bbox[0], bbox[3] - bbox[1]
    return bbox[2], bbox[3]


def has_area(bbox, mode) -> bool:
    """Whether a box's width and height are both > 0 (False for NaN)."""
    width, height = _box_size(bbox, mode)
    return width > 0 and height > 0


def check_degenerate_boxes_option(value: str, key: str = "DATALOADER.DEGENERATE_BOXES"):
    """Raise, naming ``key``, if ``value`` is not an allowed DATALOADER.DEGENERATE_BOXES."""
    if value not in DEGENERATE_BOXES:
        raise ValueError(f"{key}={value!r}; allowed: {list(DEGENERATE_BOXES)}.")


def _setting(key: str, value: str) -> str:
    """How a config sets ``key`` to ``value``: ``KEY value`` for yacs (upper case), else ``key=value``."""
    return f"{key} {value}" if key.isupper() else f"{key}={value}"


def check_dataset_dicts(
    dataset_dicts,
    *,
    dataset_name: str,
    num_classes: int,
    degenerate_boxes: str = "error",
    num_classes_key: str = "MODEL.RETINANET.NUM_CLASSES",
    degenerate_key: str = "DATALOADER.DEGENERATE_BOXES",
):
    """
    Raise for the first bad record of a data set in Detectron2's standard
    format: a category outside ``[0, num_classes)``, a box with non-positive
    width or height (crowd boxes included), or an image file that does not
    exist. One pass over the records; images are not opened.

    Args:
        dataset_dicts (list[dict]): the records of ``dataset_name``; with
            ``degenerate_boxes="drop"`` their degenerate annotations are removed in place.
        dataset_name (str): its name in the DatasetCatalog, for the messages.
        num_classes (int): K; contiguous category ids must be in [0, K).
        degenerate_boxes (str): "error" or "drop" (DATALOADER.DEGENERATE_BOXES).
        num_classes_key (str): the config key of ``num_classes``, for the messages.
        degenerate_key (str): the config key of ``degenerate_boxes``, for the messages.
    """
    check_degenerate_boxes_option(degenerate_boxes, degenerate_key)
    dropped = 0
    meta = MetadataCatalog.get(dataset_name)
    to_json_id = {v: k for k, v in meta.get("thing_dataset_id_to_contiguous_id", {}).items()}
    for record in dataset_dicts:
        if not PathManager.isfile(record["file_name"]):
            raise FileNotFoundError(
                f"{_source(dataset_name)}: {_image(record)}: the image file does not exist."
            )
        for index, ann in enumerate(record.get("annotations", ())):
            category = ann["category_id"]
            if not 0 <= category < num_classes:
                json_id = (
                    f" (category_id {to_json_id[category]} in the json)"
                    if category in to_json_id
                    else ""
                )
                raise ValueError(
                    f"{_source(dataset_name)}: {_image(record)}, annotation {index}: class {category}"
                    f"{json_id} is outside the model's classes 0..{num_classes - 1} "
                    f"({num_classes_key}={num_classes}; the data set has "
                    f"{len(meta.get('thing_classes', []))} thing_classes)."
                )
            if degenerate_boxes == "error" and not has_area(ann["bbox"], ann["bbox_mode"]):
                width, height = _box_size(ann["bbox"], ann["bbox_mode"])
                raise ValueError(
                    f"{_source(dataset_name)}: {_image(record)}, annotation {index}: bbox {list(ann['bbox'])} "
                    f"({BoxMode(ann['bbox_mode']).name}) has width {width} and height {height}; "
                    f"both must be > 0 (or set {_setting(degenerate_key, 'drop')})."
                )
        if degenerate_boxes == "drop" and "annotations" in record:
            kept = [a for a in record["annotations"] if has_area(a["bbox"], a["bbox_mode"])]
            dropped += len(record["annotations"]) - len(kept)
            record["annotations"] = kept
    if dropped:
        logger.warning(
            f"{_source(dataset_name)}: dropped {dropped} boxes with width or height <= 0 or NaN "
            f"({_setting(degenerate_key, 'drop')})."
        )


def _unknown_category(json_file):
    """The first annotation of a COCO json whose category_id is not among its categories, described."""
    with PathManager.open(json_file) as f:
        coco = json.load(f)
    known = sorted(c["id"] for c in coco.get("categories", []))
    files = {im["id"]: im.get("file_name") for im in coco.get("images", [])}
    for ann in coco.get("annotations", []):
        if ann.get("category_id") not in known:
            return (
                f"annotation id {ann.get('id')} of image id {ann.get('image_id')} "
                f"({files.get(ann.get('image_id'))}) has category_id {ann.get('category_id')}; "
                f"the json's categories have ids {known}."
            )
    return None


def load_checked_dataset_dicts(
    dataset_name: str,
    *,
    num_classes: int,
    filter_empty: bool = True,
    degenerate_boxes: str = "error",
    num_classes_key: str = "MODEL.RETINANET.NUM_CLASSES",
    min_keypoints: int = 0,
    proposal_file: Optional[str] = None,
    degenerate_key: str = "DATALOADER.DEGENERATE_BOXES",
):
    """
    ``get_detection_dataset_dicts`` of ``dataset_name`` as Detectron2's train
    loader calls it, followed by :func:`check_dataset_dicts`; with
    ``filter_empty``, the images whose boxes were all dropped (``"drop"``) are
    dropped too, as Detectron2 drops the images without boxes. A COCO json
    annotation whose category id is not among the json's categories, which
    Detectron2's loader reports as a bare ``KeyError``, raises a ``ValueError``
    naming the json file, the annotation and image ids and the allowed ids.

    Args:
        dataset_name (str): a name in the DatasetCatalog.
        num_classes (int): K, the model's number of classes.
        filter_empty (bool): DATALOADER.FILTER_EMPTY_ANNOTATIONS.
        degenerate_boxes (str): DATALOADER.DEGENERATE_BOXES, see :func:`check_dataset_dicts`.
        num_classes_key (str): the config key of ``num_classes``, for the messages.
        min_keypoints (int): MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE with
            MODEL.KEYPOINT_ON, else 0.
        proposal_file (str or None): this data set's DATASETS.PROPOSAL_FILES_TRAIN with
            MODEL.LOAD_PROPOSALS, else None.
        degenerate_key (str): the config key of ``degenerate_boxes``, for the messages.

    Returns:
        list[dict]: the records.
    """
    try:
        dataset_dicts = get_detection_dataset_dicts(
            dataset_name,
            filter_empty=filter_empty,
            min_keypoints=min_keypoints,
            proposal_files=[proposal_file] if proposal_file else None,
        )
    except KeyError as e:
        json_file = MetadataCatalog.get(dataset_name).get("json_file")
        detail = _unknown_category(json_file) if json_file else None
        if detail is None:
            raise
        raise ValueError(f"{_source(dataset_name)}: {detail}") from e
    check_dataset_dicts(
        dataset_dicts,
        dataset_name=dataset_name,
        num_classes=num_classes,
        degenerate_boxes=degenerate_boxes,
        num_classes_key=num_classes_key,
        degenerate_key=degenerate_key,
    )
    if filter_empty and degenerate_boxes == "drop" and "annotations" in dataset_dicts[0]:
        dataset_dicts = filter_images_with_only_crowd_annotations(dataset_dicts)
        if not dataset_dicts:
            raise ValueError(
                f"{_source(dataset_name)}: no image is left with a box once the boxes without "
                f"area are dropped ({_setting(degenerate_key, 'drop')})."
            )
    return dataset_dicts


def load_checked_datasets(
    names: List[str],
    *,
    proposal_files: Optional[List[str]] = None,
    check_consistency: bool = True,
    names_key: str = "DATASETS.TRAIN",
    proposals_key: str = "DATASETS.PROPOSAL_FILES_TRAIN",
    **checks,
) -> List[dict]:
    """
    The records of the data sets ``names``, one after the other, each loaded and checked by
    :func:`load_checked_dataset_dicts` (``checks``: its other arguments) with its own
    proposal file where ``proposal_files`` are given (one a data set); with
    ``check_consistency``, their ``thing_classes`` must be the same
    (:func:`check_same_classes`). ``names_key`` and ``proposals_key`` name the config keys
    of ``names`` and ``proposal_files`` in the messages.
    """
    if proposal_files and len(proposal_files) != len(names):
        raise ValueError(
            f"{proposals_key} has {len(proposal_files)} files for the {len(names)} data sets "
            f"of {names_key}: one each."
        )
    records = [
        record
        for i, name in enumerate(names)
        for record in load_checked_dataset_dicts(
            name, proposal_file=proposal_files[i] if proposal_files else None, **checks
        )
    ]
    if check_consistency:
        check_same_classes(names)
    return records


def check_same_classes(names):
    """
    Raise, as Detectron2's ``get_detection_dataset_dicts`` does, if the data sets ``names``
    (list[str]) have different ``thing_classes``; nothing where one has none (Detectron2
    skips the check then).
    """
    try:
        check_metadata_consistency("thing_classes", names)
    except AttributeError:  # a data set registered without class names
        pass


class CheckedDatasetMapper(DatasetMapper):
    """
    Detectron2's :class:`DatasetMapper` whose errors reading an image name
    the image id and file: ``FileNotFoundError`` for a missing file,
    ``ValueError`` for one that cannot be read or decoded.
    """

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{_image(dataset_dict)}: the image file does not exist."
            ) from e
        except OSError as e:
            raise ValueError(f"{_image(dataset_dict)}: cannot read the image file: {e}") from e
