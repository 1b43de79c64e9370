from .head import FOCAL_HEAD_REGISTRY, FocalRetinaNetHead, build_focal_head  # registers the head
from .meta_arch import FocalRetinaNet  # registers the meta-architecture

__all__ = ["FOCAL_HEAD_REGISTRY", "FocalRetinaNet", "FocalRetinaNetHead", "build_focal_head"]
