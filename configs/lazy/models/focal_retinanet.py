# Detectron2's LazyConfig RetinaNet (common/models/retinanet.py) as FocalRetinaNet: the same
# backbone, anchors and matcher, with our head and a swappable loss and gamma schedule. With the
# defaults below it is RetinaNet (same parameters; a test checks it). Swap the loss or the schedule
# on the command line, e.g. model.focal_loss._target_=focal_det2.losses.SoftmaxFocalLoss.
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from focal_det2.losses import SigmoidFocalLoss
from focal_det2.modeling import FocalRetinaNet, FocalRetinaNetHead
from focal_det2.schedules import ConstantGamma, initial_gamma

model = get_config("common/models/retinanet.py").model
model._target_ = FocalRetinaNet
del model.focal_loss_alpha, model.focal_loss_gamma  # the loss's gamma and alpha replace them
# Every loss's arguments (a loss's own, such as FocalStarLoss's beta, are added as +key=value).
model.focal_loss = L(SigmoidFocalLoss)(
    num_classes="${..num_classes}",
    gamma=2.0,
    alpha=0.25,
    class_alpha=[],
    label_smoothing=0.0,
    class_weighting="none",
    cb_beta=0.999,
)
# Every schedule's arguments: _target_=focal_det2.schedules.LinearGamma and iters=N make a ramp.
model.gamma_schedule = L(ConstantGamma)(end="${..focal_loss.gamma}", start=0.0, iters=0, steps=[])
model.head._target_ = FocalRetinaNetHead
del model.head.num_classes  # the loss says how many logits an anchor has (K, or K + 1)
model.head.loss = "${..focal_loss}"
model.head.init_gamma = L(initial_gamma)(schedule="${...gamma_schedule}")  # the bias's gamma
