"""Reference models by name, and their default losses."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from downpour.errors import check_range, choose
from downpour.models.cnn import CNN
from downpour.models.linear import LinearSVM, LogisticRegression, MulticlassSVM, Perceptron, SquaredHingeSVM
from downpour.models.mlp import MLP
from downpour.models.resnet import ResNet

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

MODELS: dict[str, type[nn.Module]] = {
    "perceptron": Perceptron,
    "svm": LinearSVM,
    "squared-hinge-svm": SquaredHingeSVM,
    "multiclass-svm": MulticlassSVM,
    "logistic": LogisticRegression,
    "mlp": MLP,
    "cnn": CNN,
    "resnet": ResNet,
}
"""Model classes by name. Each takes ``(input_shape, num_classes, *, **options)``."""


def options_of(name: str) -> dict[str, object]:
    """Return the keyword options model ``name`` accepts, with their defaults.

    Example:
        >>> options_of("svm")
        {'l2': 0.0001, 'bias_lr': 1.0}
    """
    cls = MODELS[choose("model", name, MODELS)]
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build(name: str, input_shape: tuple[int, ...], num_classes: int, **options) -> nn.Module:
    """Build model ``name`` for examples of ``input_shape`` and ``num_classes`` outputs.

    Parameters are float32 whatever torch's default dtype is, because the flat
    vector every strategy exchanges is float32. Seed with ``torch.manual_seed``
    beforehand for a reproducible initialization.

    Args:
        name: one of :data:`MODELS`.
        input_shape: shape of one example, without the batch dimension.
        num_classes: number of classes (at least 2).
        **options: model options, e.g. ``hidden=(512,)`` for "mlp" or ``l2=1e-3`` for "svm".

    Raises:
        ValueError: unknown name or option, or a bad shape or value.

    Example:
        >>> model = build("mlp", (1, 28, 28), 10, hidden=(64,))
        >>> model(torch.zeros(3, 1, 28, 28)).shape
        torch.Size([3, 10])
    """
    allowed = options_of(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for model {name!r}; "
            f"it accepts: {', '.join(sorted(allowed)) or 'no options'}"
        )
    input_shape = tuple(input_shape)
    if not input_shape or any(not isinstance(n, int) or n < 1 for n in input_shape):
        raise ValueError(f"input_shape must be positive ints, got {input_shape!r}")
    check_range("num_classes", num_classes, 2)
    return MODELS[name](input_shape, num_classes, **options).to(torch.float32)


def default_loss(name: str) -> LossFn:
    """Return the loss model ``name`` is trained with: its ``criterion``, else cross-entropy.

    Example:
        >>> default_loss("multiclass-svm").__name__
        'multiclass_hinge_loss'
    """
    return getattr(MODELS[choose("model", name, MODELS)], "criterion", F.cross_entropy)
