"""One forward and backward pass, the same for torch modules and function models."""

from __future__ import annotations

import torch
from torch import nn

from downpour.models.function import FunctionModel
from downpour.models.registry import LossFn


def backward(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accumulate the gradient of the loss on ``(x, y)`` into each ``p.grad``; return the loss.

    Gradients are *added* in place to existing ``.grad`` tensors, never
    rebound, because they may be views into a flat gradient buffer
    (:class:`downpour.flat.FlatParams`); zero them first for a fresh gradient.
    A model with a ``regularization()`` method has it added to the loss. A
    :class:`FunctionModel` calls the user's gradient function instead of autograd.

    Args:
        model: a module from :func:`downpour.models.build` or a :class:`FunctionModel`.
        loss_fn: ``loss_fn(outputs, y) -> scalar``, e.g. :func:`downpour.models.default_loss`.
        x: a batch of inputs, dense or sparse CSR for linear models.
        y: int64 class labels.

    Returns:
        The detached scalar loss, regularization included.

    Example:
        >>> from downpour.models import build, default_loss
        >>> model = build("svm", (4,), 3)
        >>> loss = backward(model, default_loss("svm"), torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
        >>> model.linear.weight.grad.shape
        torch.Size([3, 4])
    """
    if isinstance(model, FunctionModel):
        return model.accumulate_grad_(loss_fn, x, y)
    loss = loss_fn(model(x), y)
    regularization = getattr(model, "regularization", None)
    if regularization is not None:
        loss = loss + regularization()
    loss.backward()
    return loss.detach()
