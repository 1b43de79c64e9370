"""
Gamma schedules ("soft gamma"): gamma as a function of the training iteration.

The model reads the iteration from Detectron2's EventStorage, so the stock
trainer needs no hook and a resumed run continues from the right gamma.
"""

import math
from typing import Optional, Sequence

from detectron2.config import configurable
from detectron2.utils.registry import Registry

from .registry import lookup, register_as

__all__ = ["GAMMA_SCHEDULE_REGISTRY", "build_gamma_schedule", "initial_gamma", "GammaSchedule"]

GAMMA_SCHEDULE_REGISTRY = Registry("GAMMA_SCHEDULE")
GAMMA_SCHEDULE_REGISTRY.__doc__ = """
Registry for gamma schedules, chosen by ``MODEL.FOCAL.GAMMA_SCHEDULE.NAME``.

The registered object is called with ``(cfg)`` and returns a callable
``schedule(iteration: int) -> float``.
"""

_KEY = "MODEL.FOCAL.GAMMA_SCHEDULE"


def build_gamma_schedule(cfg):
    """
    The :class:`GammaSchedule` named by ``MODEL.FOCAL.GAMMA_SCHEDULE.NAME``, from
    ``MODEL.FOCAL.GAMMA`` and the ``GAMMA_SCHEDULE`` keys; a name that is not registered, or
    a key the schedule does not read, is an error naming the key.
    """
    name = cfg.MODEL.FOCAL.GAMMA_SCHEDULE.NAME
    return lookup(GAMMA_SCHEDULE_REGISTRY, name, f"{_KEY}.NAME")(cfg)


class GammaSchedule:
    """
    gamma(it) = START + (GAMMA - START) * f(it), with f rising from 0 to 1;
    subclasses define f as :meth:`progress`.
    """

    @configurable
    def __init__(
        self, *, end: float, start: float = 0.0, iters: int = 0, steps: Sequence[int] = ()
    ):
        """
        Args:
            end (float): gamma at the end of the ramp (MODEL.FOCAL.GAMMA).
            start (float): gamma at iteration 0 (GAMMA_SCHEDULE.START).
            iters (int): ramp length (GAMMA_SCHEDULE.ITERS).
            steps (sequence[int]): iterations at which gamma rises (GAMMA_SCHEDULE.STEPS).
        """
        self.end, self.start, self.iters, self.steps = end, start, iters, tuple(steps)
        self._check()  # first: a schedule that does not read START says so
        if start < 0:
            raise ValueError(f"{_KEY}.START={start} must be >= 0.")

    @classmethod
    def from_config(cls, cfg):
        node = cfg.MODEL.FOCAL.GAMMA_SCHEDULE
        return {
            "end": cfg.MODEL.FOCAL.GAMMA,
            "start": node.START,
            "iters": node.ITERS,
            "steps": node.STEPS,
        }

    def _check(self):
        """Raise for keys this schedule needs or would silently ignore."""
        raise NotImplementedError

    def _require_unset(self, **values):
        for key, (value, default) in values.items():
            if value != default:
                raise ValueError(
                    f"{_KEY}.{key}={value} is not read by {type(self).__name__}; leave it at {default}."
                )

    def progress(self, iteration: int) -> float:
        """f(iteration) in [0, 1]."""
        raise NotImplementedError

    @property
    def min_gamma(self) -> float:
        """The smallest gamma the schedule yields (gamma is monotone in the iteration)."""
        return min(self(0), self.end)

    def __call__(self, iteration: int) -> float:
        return self.start + (self.end - self.start) * self.progress(iteration)

    def __repr__(self):
        return f"{type(self).__name__}(start={self.start}, end={self.end}, iters={self.iters}, steps={list(self.steps)})"


@register_as(GAMMA_SCHEDULE_REGISTRY, "constant")
class ConstantGamma(GammaSchedule):
    """gamma(it) = GAMMA."""

    def _check(self):
        self._require_unset(
            START=(self.start, 0.0), ITERS=(self.iters, 0), STEPS=(list(self.steps), [])
        )

    def __call__(self, iteration):
        return self.end


class _RampGamma(GammaSchedule):
    def _check(self):
        if self.iters <= 0:
            raise ValueError(f"{_KEY}.ITERS={self.iters} must be > 0 for a ramp.")
        self._require_unset(STEPS=(list(self.steps), []))


@register_as(GAMMA_SCHEDULE_REGISTRY, "linear")
class LinearGamma(_RampGamma):
    """f(it) = min(it / ITERS, 1)."""

    def progress(self, iteration):
        return min(iteration / self.iters, 1.0)


@register_as(GAMMA_SCHEDULE_REGISTRY, "cosine")
class CosineGamma(_RampGamma):
    """f(it) = (1 - cos(pi * min(it / ITERS, 1))) / 2."""

    def progress(self, iteration):
        return (1 - math.cos(math.pi * min(iteration / self.iters, 1.0))) / 2


@register_as(GAMMA_SCHEDULE_REGISTRY, "step")
class StepGamma(GammaSchedule):
    """f(it) = (number of STEPS <= it) / len(STEPS)."""

    def _check(self):
        if not self.steps:
            raise ValueError(f"{_KEY}.STEPS is empty; 'step' needs at least one iteration.")
        if any(s <= 0 for s in self.steps) or any(
            a >= b for a, b in zip(self.steps, self.steps[1:])
        ):
            raise ValueError(
                f"{_KEY}.STEPS={list(self.steps)} must be positive and strictly increasing."
            )
        self._require_unset(ITERS=(self.iters, 0))

    def progress(self, iteration):
        return sum(s <= iteration for s in self.steps) / len(self.steps)


def unfinished_warning(schedule: GammaSchedule, max_iter: int) -> Optional[str]:
    """
    A warning, or None: whether ``schedule`` reaches MODEL.FOCAL.GAMMA by the end of a run
    of ``max_iter`` iterations (SOLVER.MAX_ITER; Detectron2 trains iterations 0 ..
    ``max_iter - 1``). A ramp or steps past the end would train at a gamma below the
    configured one without a word, as a shortened MAX_ITER leaves them. A step at MAX_ITER
    never trains; a ramp that ends with the run (ITERS = MAX_ITER) trains its last
    iteration one step short of GAMMA, and is not warned of.
    """
    last = max_iter if isinstance(schedule, _RampGamma) else max_iter - 1
    if schedule(last) == schedule.end:
        return None
    return (
        f"{_KEY} {schedule!r} does not reach MODEL.FOCAL.GAMMA={schedule.end} by "
        f"SOLVER.MAX_ITER={max_iter}: training ends at gamma {schedule(max_iter - 1):.4g}. "
        f"Shorten its ITERS or STEPS, or train longer."
    )


def initial_gamma(schedule: GammaSchedule) -> float:
    """
    gamma at iteration 0, for which the head derives its prior bias (FL*'s
    depends on it): ``FocalRetinaNetHead``'s ``init_gamma``, which the yacs
    build passes and a LazyConfig sets as
    ``L(initial_gamma)(schedule="${...gamma_schedule}")``.
    """
    return schedule(0)
