"""focal_det2: the focal-loss family for Detectron2."""
