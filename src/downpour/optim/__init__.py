"""Optimizers and learning-rate schedules by name.

``optim(name, lr=..., schedule=...)`` makes a frozen, validated
:class:`OptimSpec`; every role builds its own ``torch.optim`` optimizer and
scheduler from it. Nonlinear conjugate gradients (:class:`ConjugateGradient`)
joins the torch optimizers for batch methods.

Example:
    >>> import torch
    >>> from downpour.optim import optim
    >>> spec = optim("adagrad", lr=0.05)
    >>> optimizer = spec.build([torch.zeros(3, requires_grad=True)])
    >>> scheduler = spec.build_scheduler(optimizer, total_steps=100)
"""

from downpour.optim.cg import ConjugateGradient as ConjugateGradient
from downpour.optim.schedules import SCHEDULES as SCHEDULES
from downpour.optim.spec import OPTIMIZERS as OPTIMIZERS
from downpour.optim.spec import OptimSpec as OptimSpec
from downpour.optim.spec import Recipe as Recipe
from downpour.optim.spec import optim as optim

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "ConjugateGradient",
    "OptimSpec",
    "Recipe",
    "optim",
]
