"""Evaluation of a model on held-out data."""

from __future__ import annotations

import torch
from torch import nn

from downpour.data import batches


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 2048) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on ``(x, y)``, in eval mode.

    Returns ``eval/loss``, ``eval/accuracy``, ``eval/balanced_accuracy`` (the
    mean of the per-class recalls, over the classes the test set holds),
    ``eval/majority_share`` (the largest class's share of the test set: what
    predicting that class alone scores) and ``eval/predicted_classes`` (how
    many classes the model predicts at all); the model's train/eval mode is
    restored afterwards.
    """
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    confusion: dict[tuple[int, int], int] = {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        for xb, yb in batches(x, y, batch_size, shuffle=False):
            xb, yb = xb.to(device), yb.to(device)
            out = model(xb)
            total_loss += float(loss_fn(out, yb)) * len(yb)
            predicted = out.argmax(dim=1)
            correct += int((predicted == yb).sum())
            count += len(yb)
            pairs, counts = torch.stack([yb, predicted]).unique(dim=1, return_counts=True)
            for (truth, guess), n in zip(pairs.t().tolist(), counts.tolist()):
                confusion[truth, guess] = confusion.get((truth, guess), 0) + n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("cannot evaluate on an empty test set")
    support: dict[int, int] = {}
    hits: dict[int, int] = {}
    for (truth, guess), n in confusion.items():
        support[truth] = support.get(truth, 0) + n
        hits[truth] = hits.get(truth, 0) + (n if truth == guess else 0)
    return {
        "eval/loss": total_loss / count,
        "eval/accuracy": correct / count,
        "eval/balanced_accuracy": sum(hits[c] / support[c] for c in support) / len(support),
        "eval/majority_share": max(support.values()) / count,
        "eval/predicted_classes": len({guess for _, guess in confusion}),
    }
