"""Flat views over a module's parameters and gradients."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one new contiguous float32 vector."""
    parts = [t.detach().reshape(-1).to(torch.float32) for t in tensors]
    if not parts:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat(parts)


def unflatten_into_(vector: torch.Tensor, tensors: Iterable[torch.Tensor]) -> None:
    """Copy consecutive slices of ``vector`` into ``tensors`` in place."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.data.copy_(vector[offset : offset + n].view_as(t))
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} elements, parameters need {offset}")


class FlatParams:
    """Rebinds a module's parameters (and their gradients) as views of two flat buffers.

    After construction ``flat.params`` is one contiguous float32 vector and each
    ``p.data`` is a view into it, so writing the vector writes the model and
    vice versa; no copy is made per step. Gradients are views into
    ``flat.grads`` in the same way, which is why ``zero_grad_`` zeroes in
    place instead of setting gradients to ``None`` (that would break the views).

    Example:
        >>> model = nn.Linear(3, 2)
        >>> flat = FlatParams(model)
        >>> flat.params.numel()
        8
        >>> flat.params.zero_(); float(model.weight.abs().sum())
        0.0
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.parameters = [p for p in module.parameters() if p.requires_grad]
        for p in self.parameters:
            if p.dtype != torch.float32:
                raise TypeError(f"flat parameters must be float32, found {p.dtype} in {tuple(p.shape)}")
        device = self.parameters[0].device if self.parameters else torch.device("cpu")
        self.numel = sum(p.numel() for p in self.parameters)
        self.params = torch.empty(self.numel, dtype=torch.float32, device=device)
        self.grads = torch.zeros(self.numel, dtype=torch.float32, device=device)
        self.shapes = [tuple(p.shape) for p in self.parameters]
        offset = 0
        for p in self.parameters:
            n = p.numel()
            self.params[offset : offset + n].copy_(p.detach().reshape(-1))
            p.data = self.params[offset : offset + n].view_as(p)
            p.grad = self.grads[offset : offset + n].view_as(p)
            offset += n

    def __len__(self) -> int:
        return self.numel

    def zero_grad_(self) -> None:
        """Zero every gradient in place (keeps the gradient views alive)."""
        self.grads.zero_()
        for p, view in zip(self.parameters, self._grad_views()):
            # An optimizer or user code may have replaced p.grad; rebind it.
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                p.grad = view

    def _grad_views(self):
        offset = 0
        for p in self.parameters:
            n = p.numel()
            yield self.grads[offset : offset + n].view_as(p)
            offset += n

    def sync_grads_(self) -> torch.Tensor:
        """Make sure ``self.grads`` holds every parameter's gradient; return it.

        Autograd accumulates in place into an existing ``.grad``, so this is a
        no-op in the common case; it copies only where a gradient was replaced.
        """
        for p, view in zip(self.parameters, self._grad_views()):
            if p.grad is None:
                view.zero_()
                p.grad = view
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
                p.grad = view
        return self.grads

    def load_(self, vector: torch.Tensor) -> None:
        """Overwrite the parameters with ``vector`` (same length)."""
        if vector.numel() != self.numel:
            raise ValueError(f"expected a vector of {self.numel} elements, got {vector.numel()}")
        self.params.copy_(vector.reshape(-1))
