"""Evaluation for every task: classification (top-k), regression, multi-label, a user's metric."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import downpour as dp
from downpour.errors import DataError
from downpour.metrics import summarize
from downpour.models.evaluate import Target, Task, evaluate, evaluate_data, mse_loss
from downpour.run import RunConfig


class Fixed(nn.Module):
    """A model that outputs given rows, one per input index."""

    def __init__(self, outputs: torch.Tensor) -> None:
        super().__init__()
        self.outputs = nn.Parameter(outputs.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs[x[:, 0].long()]


def _index(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32)[:, None]


def test_classification_top_k():
    outputs = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    labels = torch.tensor([0, 2, 1, 1])
    result = evaluate(Fixed(outputs), nn.functional.cross_entropy, _index(4), labels,
                      task=Task(top_k=2))
    assert result["eval/accuracy"] == 0.25
    assert result["eval/top2_accuracy"] == 0.75  # row 3's label 1 is its third choice


def test_regression_scores():
    outputs = torch.tensor([[1.0], [2.0], [4.0], [3.0]])
    targets = torch.tensor([1.0, 2.0, 3.0, 5.0])
    result = evaluate(Fixed(outputs), mse_loss, _index(4), targets, task=Task(kind="regression"))
    assert result["eval/mse"] == pytest.approx((0 + 0 + 1 + 4) / 4)
    assert result["eval/mae"] == pytest.approx((0 + 0 + 1 + 2) / 4)
    sst = float(((targets - targets.mean()) ** 2).sum())
    assert result["eval/r2"] == pytest.approx(1 - 5 / sst)
    assert result["eval/loss"] == pytest.approx(result["eval/mse"])


def test_multilabel_per_label_f1():
    logits = torch.tensor([[1.0, -1.0, 1.0], [1.0, 1.0, -1.0], [-1.0, -1.0, -1.0]])
    truth = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    result = evaluate(Fixed(logits), nn.functional.binary_cross_entropy_with_logits, _index(3),
                      truth, task=Task(kind="multilabel"))
    # label 0: tp 2 -> F1 1; label 1: tp 1, fn 1 -> 2/3; label 2: fp 1 -> 0.
    assert result["eval/f1_per_label"] == pytest.approx([1.0, 2 / 3, 0.0], abs=1e-6)
    assert result["eval/f1_macro"] == pytest.approx((1 + 2 / 3) / 3)
    assert result["eval/f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))


def test_user_metric_sees_every_output_at_once():
    seen = []

    def spread(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        seen.append(len(targets))
        return {"spread": float(outputs.std()), "count": len(targets)}

    outputs = torch.randn(10, 2)
    labels = torch.randint(0, 2, (10,))
    result = evaluate(Fixed(outputs), nn.functional.cross_entropy, _index(10), labels,
                      batch_size=3, task=Task(metric=spread))
    assert seen == [10]
    assert result["eval/user/spread"] == pytest.approx(float(outputs.std()))
    assert result["eval/user/count"] == 10.0 and "eval/accuracy" in result
    assert Task(metric=spread).primary(result) == "user/spread"
    with pytest.raises(TypeError, match="must return a non-empty dict"):
        evaluate(Fixed(outputs), nn.functional.cross_entropy, _index(10), labels,
                 task=Task(metric=lambda o, t: 3.0))


def test_eval_samples_is_one_seeded_subset():
    x, y = torch.randn(200, 2), torch.randint(0, 2, (200,))
    data = dp.data.Dataset("d", x, y, x, y, 2)
    model = nn.Linear(2, 2)
    a = evaluate_data(model, nn.functional.cross_entropy, data, samples=50, seed=3)
    b = evaluate_data(model, nn.functional.cross_entropy, data, samples=50, seed=3)
    whole = evaluate_data(model, nn.functional.cross_entropy, data)
    assert a == b and a != whole


def test_target_rules():
    assert Target.parse("mse<=0.01") == Target("mse", "<=", 0.01)
    assert Target.parse(" accuracy >= 0.9 ").met({"eval/accuracy": 0.95})
    assert Target.parse("spread>1").met({"eval/user/spread": 2.0})  # a user's metric, no prefix
    for bad in ("mse", "mse=0.1", "<=0.1", "mse<=abc"):
        with pytest.raises(ValueError, match="target_metric must be NAME<=VALUE"):
            Target.parse(bad)
    with pytest.raises(ValueError, match="names 'r3', which the evaluation does not report"):
        Target.parse("r3>=0.5").met({"eval/loss": 1.0, "eval/r2": 0.3})


def test_run_options_for_tasks():
    config = RunConfig.of(task="regression", target_metric="mse<=0.05", eval_samples=100)
    scoring = config.evaluation.scoring()
    assert scoring.task.kind == "regression" and scoring.target == Target("mse", "<=", 0.05)
    assert scoring.samples == 100
    with pytest.raises(ValueError, match="unknown task 'regresion'"):
        RunConfig.of(task="regresion")
    with pytest.raises(ValueError, match="target_accuracy is for classification"):
        RunConfig.of(task="regression", target_accuracy=0.9)
    with pytest.raises(ValueError, match="top_k is for classification"):
        RunConfig.of(task="multilabel", top_k=3)
    with pytest.raises(ValueError, match="target_metric must be"):
        RunConfig.of(target_metric="fast")


def test_a_classification_test_label_outside_the_outputs():
    model = nn.Linear(2, 3)
    with pytest.raises(DataError, match=r"a test label 5 is outside \[0, 3\)"):
        evaluate(model, nn.functional.cross_entropy, torch.randn(4, 2), torch.tensor([0, 1, 5, 2]))


def test_summary_metric_keys():
    events = [
        {"event": "start", "time": 0.0, "role": "coordinator"},
        {"eval/loss": 0.5, "eval/mse": 0.5, "eval/metric": 0.5, "eval/metric_name": "mse",
         "eval/user/spread": 1.5, "role": "coordinator", "time": 1.0},
        {"eval/loss": 0.2, "eval/mse": 0.2, "eval/metric": 0.2, "eval/metric_name": "mse",
         "eval/user/spread": 1.2, "eval/target_reached": True, "role": "coordinator", "time": 2.0},
        {"eval/loss": 0.3, "eval/mse": 0.3, "eval/metric": 0.3, "eval/metric_name": "mse",
         "eval/user/spread": 1.1, "role": "coordinator", "time": 3.0},
        {"event": "end", "run/steps": 10, "run/samples": 100, "run/seconds": 3.0,
         "role": "coordinator", "time": 3.0},
    ]
    summary = summarize(events, {"task": "regression", "target_metric": "mse<=0.25"})
    assert summary["accuracy"] is None and summary["loss"] == 0.3
    assert summary["metric"] == 0.3 and summary["metric_name"] == "mse"
    assert summary["best_metric"] == 0.2  # an error: the smallest is the best
    assert summary["user_metrics"] == {"spread": 1.1}
    assert summary["time_to_target"] == 2.0 and summary["task"] == "regression"
