"""Data sets of focal_det2. Importing this package registers the digits splits."""
from .digits import (
    DIGIT_CLASSES,
    SPLITS,
    digits_root,
    ensure_generated,
    generate_digits,
    register_all_digits,
    register_digits,
    source_indices,
)

register_all_digits()  # registers digits_train, digits_val and their _tiny versions
