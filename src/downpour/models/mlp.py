"""A fully connected ReLU network."""

from __future__ import annotations

import math

import torch
from torch import nn

from downpour.errors import check_range


class MLP(nn.Module):
    """Multilayer perceptron: flatten, then ``Linear -> ReLU`` per hidden layer, then ``Linear``.

    The default ``hidden=(512, 256)`` reaches about 97.5% MNIST test accuracy
    after one epoch of SGD with momentum 0.9, lr 0.05, batch 64 and a cosine
    schedule (about 96.6% with Adam at a constant lr 1e-3).

    Args:
        input_shape: shape of one example; flattened.
        num_classes: number of outputs.
        hidden: width of each hidden layer (an int means one hidden layer).
        dropout: dropout probability after each hidden ReLU (0 disables it).

    Example:
        >>> MLP((1, 28, 28), 10, hidden=(32,))(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        hidden: int | tuple[int, ...] = (512, 256),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        for width in widths:
            if not isinstance(width, int) or width < 1:
                raise ValueError(f"hidden must be positive layer widths, got {hidden!r}")
        check_range("dropout", dropout, 0.0, 1.0)
        layers: list[nn.Module] = [nn.Flatten()]
        size = math.prod(input_shape)
        for width in widths:
            layers += [nn.Linear(size, width), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            size = width
        layers.append(nn.Linear(size, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
