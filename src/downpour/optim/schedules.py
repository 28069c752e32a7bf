"""Learning-rate schedules, built from ``torch.optim.lr_scheduler``.

Every schedule may start with a linear warm-up: during the first
``warmup_steps`` steps the learning rate climbs ``lr / W, 2 lr / W, ..., lr``,
then the named schedule runs over the remaining steps. Warm-up keeps the
first, largest updates of a freshly initialized model (and, with many
asynchronous workers, of many stale gradients at once) from blowing it up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LambdaLR,
    LRScheduler,
    SequentialLR,
    StepLR,
)

from downpour.errors import check_range, choose

ScheduleFactory = Callable[..., LRScheduler]


def _one(step: int) -> float:
    return 1.0


def _warmup_factor(step: int, num_steps: int) -> float:
    return min(1.0, (step + 1) / num_steps)


def constant(optimizer: Optimizer, num_steps: int, **_) -> LRScheduler:
    """Keep the learning rate; a ``LambdaLR`` of 1 so callers always have a scheduler to step.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
        >>> constant(opt, 10).get_last_lr()
        [0.5]
    """
    return LambdaLR(optimizer, _one)


def step_decay(
    optimizer: Optimizer, num_steps: int, *, step_size: int, gamma: float, **_
) -> LRScheduler:
    """Multiply the learning rate by ``gamma`` every ``step_size`` steps (``StepLR``).

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = step_decay(opt, 10, step_size=2, gamma=0.5)
        >>> [opt.step() or sched.step() or sched.get_last_lr()[0] for _ in range(4)]
        [1.0, 0.5, 0.5, 0.25]
    """
    return StepLR(optimizer, step_size=step_size, gamma=gamma)


def cosine(optimizer: Optimizer, num_steps: int, **_) -> LRScheduler:
    """Anneal the learning rate to 0 along a half cosine over ``num_steps`` (``CosineAnnealingLR``).

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = cosine(opt, 2)
        >>> [round(opt.step() or sched.step() or sched.get_last_lr()[0], 6) for _ in range(2)]
        [0.5, 0.0]
    """
    return CosineAnnealingLR(optimizer, T_max=num_steps, eta_min=0.0)


SCHEDULES: dict[str, ScheduleFactory] = {
    "constant": constant,
    "step": step_decay,
    "cosine": cosine,
    "warmup-cosine": cosine,
}
"""Schedule factories by name: ``factory(optimizer, num_steps, *, step_size, gamma)``."""

# Names that are only meaningful with a warm-up in front.
_NEEDS_WARMUP = frozenset({"warmup-cosine"})


def check_schedule(name: str, *, warmup_steps: int, step_size: int | None, gamma: float) -> None:
    """Raise ValueError for a bad schedule name or setting, before any training starts.

    Example:
        >>> check_schedule("step", warmup_steps=0, step_size=None, gamma=0.1)
        Traceback (most recent call last):
        ...
        ValueError: schedule 'step' needs step_size (steps between decays), got None
    """
    choose("schedule", name, SCHEDULES)
    if not isinstance(warmup_steps, int):
        raise TypeError(f"warmup_steps must be an int, got {warmup_steps!r}")
    check_range("warmup_steps", warmup_steps, 0)
    if name in _NEEDS_WARMUP and warmup_steps < 1:
        raise ValueError(
            f"schedule {name!r} needs warmup_steps >= 1, got {warmup_steps}; "
            "set warmup_steps or use schedule='cosine'"
        )
    if name == "step" and (not isinstance(step_size, int) or step_size < 1):
        raise ValueError(
            f"schedule 'step' needs step_size (steps between decays), got {step_size!r}"
        )
    check_range("gamma", gamma, 0.0, 1.0, low_open=True)


def build_scheduler(
    optimizer: Optimizer,
    name: str,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    step_size: int | None = None,
    gamma: float = 0.1,
) -> LRScheduler:
    """Build schedule ``name`` (after ``warmup_steps`` of linear warm-up) for ``total_steps``.

    Step the returned scheduler once after every optimizer step.

    Raises:
        ValueError: a bad name or setting, or a warm-up that leaves no steps for cosine.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = build_scheduler(opt, "constant", 10, warmup_steps=4)
        >>> [opt.step() or sched.step() or sched.get_last_lr()[0] for _ in range(4)]
        [0.5, 0.75, 1.0, 1.0]
    """
    check_schedule(name, warmup_steps=warmup_steps, step_size=step_size, gamma=gamma)
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    factory = SCHEDULES[name]
    if factory is cosine and warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must be below total_steps ({total_steps}) "
            f"for schedule {name!r}, which needs steps left to anneal over"
        )
    main_steps = total_steps - warmup_steps
    if warmup_steps == 0:
        return factory(optimizer, main_steps, step_size=step_size, gamma=gamma)
    warmup = LambdaLR(optimizer, functools.partial(_warmup_factor, num_steps=warmup_steps))
    main = factory(optimizer, main_steps, step_size=step_size, gamma=gamma)
    return SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])
