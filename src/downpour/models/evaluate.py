"""Evaluation of a model on held-out data."""

from __future__ import annotations

import torch
from torch import nn

from downpour.data import batches


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 2048) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on ``(x, y)``, in eval mode.

    Returns ``{"eval/loss": ..., "eval/accuracy": ...}``; the model's
    train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        for xb, yb in batches(x, y, batch_size, shuffle=False):
            xb, yb = xb.to(device), yb.to(device)
            out = model(xb)
            total_loss += float(loss_fn(out, yb)) * len(yb)
            correct += int((out.argmax(dim=1) == yb).sum())
            count += len(yb)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("cannot evaluate on an empty test set")
    return {"eval/loss": total_loss / count, "eval/accuracy": correct / count}
