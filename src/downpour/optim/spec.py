"""Optimizers by name, as frozen specs that build ``torch.optim`` optimizers and schedules.

A spec is a value, not an optimizer: it travels to every parameter-server
shard or worker, each of which builds its own optimizer over its own
parameters. That is why strings are resolved and every setting is checked
when the spec is made, not when a remote role first steps.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from downpour.errors import choose
from downpour.optim.cg import ConjugateGradient
from downpour.optim.schedules import build_scheduler, check_schedule


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A ``torch.optim`` class, its default learning rate and the defaults that name implies.

    Example:
        >>> Recipe(torch.optim.SGD, 0.01, {"momentum": 0.9}).options()[:3]
        ('dampening', 'differentiable', 'foreach')
    """

    cls: type[Optimizer]
    lr: float
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def options(self) -> tuple[str, ...]:
        """Keyword arguments of ``cls`` a spec may set, besides ``lr``."""
        parameters = inspect.signature(self.cls.__init__).parameters
        return tuple(sorted(set(parameters) - {"self", "params", "lr"}))


OPTIMIZERS: dict[str, Recipe] = {
    "sgd": Recipe(torch.optim.SGD, 0.01),
    "momentum": Recipe(torch.optim.SGD, 0.01, {"momentum": 0.9}),
    "nesterov": Recipe(torch.optim.SGD, 0.01, {"momentum": 0.9, "nesterov": True}),
    "adagrad": Recipe(torch.optim.Adagrad, 0.01),
    "rmsprop": Recipe(torch.optim.RMSprop, 0.01),
    "adadelta": Recipe(torch.optim.Adadelta, 1.0),
    "adam": Recipe(torch.optim.Adam, 1e-3),
    "cg": Recipe(ConjugateGradient, 1.0),
}
"""Optimizer recipes by name; "cg" needs ``step(closure)`` like ``torch.optim.LBFGS``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimSpec:
    """What optimizer to build, with which learning rate and schedule; validated on creation.

    Make one with :func:`optim`. ``options`` holds the optimizer keyword
    arguments that differ from the recipe's defaults, as sorted pairs so the
    spec stays hashable and comparable.

    Example:
        >>> spec = OptimSpec(name="adam", lr=1e-3, options=(("betas", (0.9, 0.99)),))
        >>> spec.kwargs["betas"]
        (0.9, 0.99)
    """

    name: str
    lr: float
    schedule: str = "constant"
    warmup_steps: int = 0
    step_size: int | None = None
    gamma: float = 0.1
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        recipe = OPTIMIZERS[choose("optimizer", self.name, OPTIMIZERS)]
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)):
            raise TypeError(f"lr must be a number, got {self.lr!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        allowed = recipe.options()
        unknown = sorted(key for key, _ in self.options if key not in allowed)
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for optimizer {self.name!r}; "
                f"it accepts: {', '.join(allowed)}"
            )
        check_schedule(
            self.schedule,
            warmup_steps=self.warmup_steps,
            step_size=self.step_size,
            gamma=self.gamma,
        )
        # The optimizer checks its own values (negative momentum, betas out of
        # range, nesterov without momentum, ...); a dry run on one scalar makes
        # those errors happen here rather than on a remote shard mid-run.
        try:
            self.build([torch.zeros(1, requires_grad=True)])
        except (ValueError, TypeError, RuntimeError) as error:
            raise ValueError(f"invalid options for optimizer {self.name!r}: {error}") from error

    @property
    def kwargs(self) -> dict[str, Any]:
        """All keyword arguments of the optimizer class except ``lr``: recipe defaults, then options."""
        return {**OPTIMIZERS[self.name].defaults, **dict(self.options)}

    def build(
        self, params: Iterable[torch.Tensor] | Iterable[dict], *, fused: bool = False
    ) -> Optimizer:
        """Build the optimizer over ``params`` (tensors or parameter groups).

        With ``fused``, torch's fused kernel (one pass over each tensor for the
        whole update) where the optimizer has one, the spec leaves ``fused`` and
        ``foreach`` unset, and every tensor is a dense floating-point tensor on
        one CPU or CUDA device; else the same optimizer unfused. Fused Adam
        steps a 535k-element vector in a fifth of the single-tensor loop's time,
        momentum SGD in three fifths. It cannot take sparse gradients, so pass it
        only for parameters that never get one (see :func:`fusable`).

        Example:
            >>> optim("momentum", lr=0.1).build([torch.zeros(2, requires_grad=True)]).defaults["momentum"]
            0.9
            >>> optim("adam").build([torch.zeros(2, requires_grad=True)], fused=True).defaults["fused"]
            True
        """
        kwargs = self.kwargs
        if fused:
            params = [dict(p, params=list(p["params"])) if isinstance(p, dict) else p
                      for p in params]
            if self._fuses(params):
                kwargs["fused"] = True
        return OPTIMIZERS[self.name].cls(params, lr=self.lr, **kwargs)

    def build_for(self, model: torch.nn.Module) -> Optimizer:
        """Build the optimizer over ``model``'s parameters, fused when the model allows it."""
        return self.build(model.parameters(), fused=fusable(model))

    def _fuses(self, params: list) -> bool:
        cls = OPTIMIZERS[self.name].cls
        if "fused" not in inspect.signature(cls.__init__).parameters:
            return False
        if any(self.kwargs.get(key) is not None for key in ("fused", "foreach")):
            return False
        tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
        devices = {t.device for t in tensors}
        return (
            len(devices) == 1
            and next(iter(devices)).type in ("cpu", "cuda")
            and all(t.is_floating_point() and t.layout == torch.strided for t in tensors)
        )

    def build_scheduler(self, optimizer: Optimizer, total_steps: int) -> LRScheduler:
        """Build this spec's schedule for a run of ``total_steps`` optimizer steps.

        Step it once after every optimizer step; "constant" gives a scheduler
        too, so callers never special-case it.

        Example:
            >>> spec = optim("sgd", lr=1.0, schedule="cosine")
            >>> opt = spec.build([torch.zeros(1, requires_grad=True)])
            >>> spec.build_scheduler(opt, total_steps=100).get_last_lr()
            [1.0]
        """
        return build_scheduler(
            optimizer,
            self.schedule,
            total_steps,
            warmup_steps=self.warmup_steps,
            step_size=self.step_size,
            gamma=self.gamma,
        )


def fusable(model: torch.nn.Module) -> bool:
    """Whether no module of ``model`` makes sparse gradients (``sparse=True`` embeddings),
    which fused optimizers refuse.

    Example:
        >>> fusable(torch.nn.Linear(2, 2)), fusable(torch.nn.Embedding(4, 2, sparse=True))
        (True, False)
    """
    return not any(getattr(module, "sparse", False) is True for module in model.modules())


def optim(
    name: str,
    lr: float | None = None,
    *,
    schedule: str = "constant",
    warmup_steps: int = 0,
    step_size: int | None = None,
    gamma: float = 0.1,
    **optimizer_kwargs: Any,
) -> OptimSpec:
    """Return a validated :class:`OptimSpec` for optimizer ``name``.

    Args:
        name: one of :data:`OPTIMIZERS`: sgd, momentum, nesterov, adagrad,
            rmsprop, adadelta, adam, cg.
        lr: learning rate, > 0; None takes the recipe's default (e.g. 1e-3 for adam).
        schedule: one of :data:`downpour.optim.SCHEDULES`.
        warmup_steps: steps of linear warm-up before the schedule.
        step_size: steps between decays of the "step" schedule.
        gamma: decay factor of the "step" schedule.
        **optimizer_kwargs: keyword arguments of the ``torch.optim`` class, e.g.
            ``momentum=0.5`` or ``betas=(0.9, 0.99)``.

    Raises:
        ValueError: unknown name, schedule or option, or a bad value.

    Example:
        >>> spec = optim("adagrad", lr=0.05, schedule="cosine", warmup_steps=100)
        >>> spec.name, spec.lr
        ('adagrad', 0.05)
    """
    recipe = OPTIMIZERS[choose("optimizer", name, OPTIMIZERS)]
    return OptimSpec(
        name=name,
        lr=recipe.lr if lr is None else lr,
        schedule=schedule,
        warmup_steps=warmup_steps,
        step_size=step_size,
        gamma=gamma,
        options=tuple(sorted(optimizer_kwargs.items())),
    )
