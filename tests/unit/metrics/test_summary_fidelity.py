"""The summary says what happened: across resumed attempts, and on imbalanced data."""

from __future__ import annotations

import logging

import pytest
import torch

import downpour as dp
from downpour.metrics import summarize


def attempt(start: float, *, interrupted: bool, seconds: float, samples: int, evals=()):
    events = [{"time": start, "role": "coordinator", "event": "start"}]
    events += [{"time": start + t, "role": "coordinator", "eval/accuracy": a} for t, a in evals]
    events.append({"time": start + seconds, "role": "coordinator",
                   "event": "interrupted" if interrupted else "end", "run/steps": samples // 32,
                   "run/samples": samples, "run/seconds": seconds, "run/train_seconds": seconds})
    return events


def test_a_resumed_runs_summary_covers_every_attempt():
    # Interrupted after 14 s (workers had done 28,000 samples), resumed for 6.74 s to 60,000 samples.
    events = attempt(0.0, interrupted=True, seconds=14.0, samples=28000, evals=[(10.0, 0.90)])
    events += [{"time": 12.0, "role": "coordinator", "fault/restarted": "server:1", "fault/lost_updates": 43}]
    events += attempt(0.5, interrupted=False, seconds=6.74, samples=60000, evals=[(3.0, 0.96), (6.7, 0.97)])
    summary = summarize(events, {"target_accuracy": 0.95})
    assert summary["attempts"] == 2
    assert summary["samples"] == 60000
    assert summary["seconds"] == pytest.approx(20.74)
    assert summary["samples_per_second"] == pytest.approx(60000 / 20.74)
    assert summary["restarts"] == 1 and summary["lost_updates"] == 43
    assert summary["time_to_target"] == pytest.approx(14.0 + 3.0)


def imbalanced() -> dp.data.Dataset:
    generator = torch.Generator().manual_seed(0)

    def split(n):
        y = (torch.rand(n, generator=generator) < 0.05).long()  # 5% positives
        x = torch.randn(n, 8, generator=generator) + y[:, None].float() * 3.0
        return x, y

    (xa, ya), (xb, yb) = split(2000), split(1000)
    return dp.data.Dataset("imbalanced", xa, ya, xb, yb, num_classes=2)


@pytest.mark.integration
def test_a_model_that_learnt_only_the_class_shares_is_called_degenerate(caplog):
    data = imbalanced()
    share = float((data.y_test == 0).float().mean())
    with caplog.at_level(logging.WARNING, logger="downpour.run"):
        # A tiny learning rate from a start that predicts one class: nothing is learnt.
        stuck = dp.train(model=_zeroed, data=data, optimizer=dp.optim("sgd", lr=1e-9), epochs=1, save=False)
    assert stuck.summary["majority_share"] == pytest.approx(share)
    assert stuck.summary["degenerate"] is True
    assert stuck.summary["balanced_accuracy"] == pytest.approx(0.5)
    assert "majority class" in caplog.text
    learnt = dp.train(model="logistic", data=data, optimizer=dp.optim("sgd", lr=0.5), epochs=3, save=False)
    assert learnt.summary["degenerate"] is False
    assert learnt.summary["balanced_accuracy"] > 0.9


def _zeroed() -> torch.nn.Module:
    model = torch.nn.Linear(8, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, 0.0]))  # always class 0
    return model
