"""Data sets of focal_det2. Importing this package registers the digits splits."""

from .digits import (
    CANVAS_SIZES,
    DIGIT_CLASSES,
    LONGTAIL_FACTORS,
    SPLITS,
    canvas_dataset_name,
    digits_root,
    ensure_generated,
    generate_digits,
    longtail_shares,
    register_all_digits,
    register_digits,
    source_indices,
)

__all__ = [
    "CANVAS_SIZES",
    "DIGIT_CLASSES",
    "LONGTAIL_FACTORS",
    "SPLITS",
    "canvas_dataset_name",
    "digits_root",
    "ensure_generated",
    "generate_digits",
    "longtail_shares",
    "register_all_digits",
    "register_digits",
    "source_indices",
]

# Registers digits_train, digits_val, their _tiny versions, digits_{train,val}_s<side>,
# digits_train_lt{100,10} and digits_val_lt.
register_all_digits()
