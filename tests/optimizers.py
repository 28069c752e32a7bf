"""Optimizer factories the server and transport tests hand to shards."""

from __future__ import annotations

import torch


def sgd(lr: float = 1.0):
    """A factory of plain ``torch.optim.SGD`` at ``lr``, as a shard takes its optimizer."""
    return lambda params: torch.optim.SGD(params, lr=lr)
