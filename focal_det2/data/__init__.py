"""Data sets of focal_det2. Importing this package registers the digits splits."""

from .digits import (
    CANVAS_SIZES,
    DIGIT_CLASSES,
    SPLITS,
    canvas_dataset_name,
    digits_root,
    ensure_generated,
    generate_digits,
    register_all_digits,
    register_digits,
    source_indices,
)

__all__ = [
    "CANVAS_SIZES",
    "DIGIT_CLASSES",
    "SPLITS",
    "canvas_dataset_name",
    "digits_root",
    "ensure_generated",
    "generate_digits",
    "register_all_digits",
    "register_digits",
    "source_indices",
]

register_all_digits()  # registers digits_train, digits_val, their _tiny versions and digits_{train,val}_s<side>
