"""Evaluation of a model on held-out data, for a task: classification, regression, multi-label.

A :class:`Task` says what the targets are and which scores an evaluation
reports (``eval/accuracy``, ``eval/mse``, ``eval/f1_macro``, or a user's
metric function's); a :class:`Target` is a stopping rule over one of them
(``"mse<=0.01"``).

Example:
    >>> model = torch.nn.Linear(2, 1)
    >>> x, y = torch.randn(8, 2), torch.randn(8)
    >>> sorted(evaluate(model, mse_loss, x, y, task=Task(kind="regression")))
    ['eval/loss', 'eval/mae', 'eval/mse', 'eval/r2']
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from downpour.data import batches
from downpour.data.rows import take_rows
from downpour.data.streamed import eval_batches
from downpour.errors import DataError, check_range, choose

TaskKind = Literal["classification", "regression", "multilabel"]
TASKS: tuple[str, ...] = ("classification", "regression", "multilabel")
MetricFn = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]

# The score each task is judged by when no target names another: the ``eval/`` key, no prefix.
PRIMARY = {"classification": "accuracy", "regression": "mse", "multilabel": "f1_macro"}


def mse_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error, an ``(N, 1)`` output taken against ``(N,)`` targets (no broadcast)."""
    if outputs.shape != targets.shape and outputs.numel() == targets.numel():
        outputs = outputs.reshape(targets.shape)
    return F.mse_loss(outputs, targets.to(outputs.dtype))


def multilabel_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits, one independent label per output."""
    return F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype))


@dataclass(frozen=True, kw_only=True)
class Task:
    """What the model predicts, and what an evaluation reports.

    Attributes:
        kind: ``"classification"`` (accuracy, balanced accuracy, top-k), ``"regression"``
            (MSE, MAE, R²) or ``"multilabel"`` (per-label F1 on logits > 0).
        top_k: also report ``eval/top{k}_accuracy`` (classification).
        metric: a function ``(outputs, targets) -> dict[str, float]`` over the whole
            evaluation set; its values are reported as ``eval/<name>`` beside the task's own.

    Example:
        >>> Task(kind="regression").loss.__name__, Task().primary({})
        ('mse_loss', 'accuracy')
    """

    kind: TaskKind = "classification"
    top_k: int | None = None
    metric: MetricFn | None = None

    def __post_init__(self) -> None:
        choose("task", self.kind, TASKS)
        if self.top_k is not None:
            if self.kind != "classification":
                raise ValueError(f"top_k is for classification, not the {self.kind} task")
            check_range("top_k", self.top_k, 1)
        if self.metric is not None and not callable(self.metric):
            raise TypeError("metric must be a function (outputs, targets) -> dict[str, float], got "
                            f"{self.metric!r}")

    @property
    def loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The task's default training loss."""
        return {"classification": F.cross_entropy, "regression": mse_loss,
                "multilabel": multilabel_loss}[self.kind]

    def primary(self, result: dict[str, Any]) -> str:
        """The score that stands for an evaluation: the user's metric's first, else the task's."""
        if self.metric is not None:
            own = [key.removeprefix("eval/") for key in result if key.startswith("eval/user/")]
            if own:
                return own[0]
        return PRIMARY[self.kind]


_TARGET = re.compile(r"^\s*([A-Za-z_][\w/]*)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")
_COMPARE = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


@dataclass(frozen=True)
class Target:
    """A stopping rule over one score: ``name op value`` (``mse<=0.01``, ``accuracy>=0.98``).

    Example:
        >>> rule = Target.parse("mse<=0.01")
        >>> rule.met({"eval/mse": 0.009}), rule.met({"eval/mse": 0.02})
        (True, False)
    """

    name: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Target:
        match = _TARGET.match(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"target_metric must be NAME<=VALUE or NAME>=VALUE (e.g. 'mse<=0.01', "
                             f"'accuracy>=0.9', 'r2>=0.95'), got {text!r}")
        try:
            value = float(match[3])
        except ValueError:
            raise ValueError(f"target_metric {text!r}: {match[3]!r} is not a number") from None
        return cls(match[1].removeprefix("eval/"), match[2], value)

    def met(self, result: dict[str, Any]) -> bool:
        """Whether ``result`` (an evaluation's ``eval/*`` values) meets the rule."""
        key = f"eval/{self.name}"
        if key not in result and f"eval/user/{self.name}" in result:
            key = f"eval/user/{self.name}"  # a user's metric, named without its prefix
        if key not in result:
            known = ", ".join(sorted(k.removeprefix("eval/") for k in result if k != "eval/loss"))
            raise ValueError(f"target_metric names {self.name!r}, which the evaluation does not "
                             f"report; it reports: loss, {known}")
        value = result[key]
        return isinstance(value, (int, float)) and _COMPARE[self.op](value, self.value)

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.value:g}"


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 2048,
             task: Task | None = None) -> dict[str, float]:
    """Mean loss and the task's scores of ``model`` on in-memory ``(x, y)``, in eval mode.

    For classification (the default) it returns ``eval/loss``, ``eval/accuracy``,
    ``eval/balanced_accuracy`` (the mean of the per-class recalls, over the
    classes the test set holds), ``eval/majority_share`` (the largest class's
    share of the test set: what predicting that class alone scores) and
    ``eval/predicted_classes`` (how many classes the model predicts at all);
    see :func:`evaluate_batches` for the other tasks. The model's train/eval
    mode is restored afterwards.
    """
    return evaluate_batches(model, loss_fn, batches(x, y, batch_size, shuffle=False), task=task)


def evaluate_data(model: nn.Module, loss_fn, data: Any, *, task: Task | None = None,
                  samples: int | None = None, seed: int = 0,
                  batch_size: int = 64) -> dict[str, float]:
    """:func:`evaluate_batches` on a dataset's test set, in memory or streamed.

    ``samples`` bounds the cost: a seeded subset of that many test examples,
    the same one at every evaluation of a run (so that its curve compares).
    A streamed test set is read ``batch_size`` examples at a time (its inputs
    may be large images); one in memory in batches of 2048.
    """
    size = data.num_test if data.streamed else int(data.y_test.shape[0])
    subset = None
    if samples is not None and samples < size:
        subset = np.sort(np.random.default_rng(seed).permutation(size)[:samples])
    if data.streamed:
        return evaluate_batches(model, loss_fn, eval_batches(data, batch_size, subset), task=task)
    x, y = data.x_test, data.y_test
    if subset is not None:
        index = torch.from_numpy(subset)
        x, y = take_rows(x, index), y[index]  # dense or sparse CSR
    return evaluate(model, loss_fn, x, y, batch_size=2048, task=task)


@torch.no_grad()
def evaluate_batches(model: nn.Module, loss_fn, test: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     *, task: Task | None = None) -> dict[str, float]:
    """Mean loss and the task's scores over batches of ``(inputs, targets)``, in eval mode.

    Regression reports ``eval/mse``, ``eval/mae`` and ``eval/r2`` (1 - SSE/SST
    over every target value); multi-label ``eval/f1_macro`` (the mean of the
    per-label F1, predicting a label where its logit is > 0), ``eval/f1_micro``
    and ``eval/f1_per_label``; a user's ``metric`` adds ``eval/user/<name>`` per
    value it returns, computed on all outputs and targets at once.
    """
    task = task or Task()
    scores = {"classification": _Classes, "regression": _Regression,
              "multilabel": _Labels}[task.kind](task)
    outputs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    total_loss, count = 0.0, 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        for xb, yb in test:
            xb, yb = xb.to(device), yb.to(device)
            out = model(xb)
            scores.add(out, yb)  # checks the targets first: a bad label is named, not a crash
            total_loss += float(loss_fn(out, yb)) * len(yb)
            count += len(yb)
            if task.metric is not None:
                outputs.append(out.detach().cpu())
                targets.append(yb.detach().cpu())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("cannot evaluate on an empty test set")
    result = {"eval/loss": total_loss / count, **scores.result(count)}
    if task.metric is not None:
        result |= _user_metric(task.metric, torch.cat(outputs), torch.cat(targets))
    return result


def _user_metric(metric: MetricFn, outputs: torch.Tensor,
                 targets: torch.Tensor) -> dict[str, float]:
    values = metric(outputs, targets)
    name = getattr(metric, "__qualname__", repr(metric))
    if not isinstance(values, dict) or not values:
        raise TypeError(f"metric {name} must return a non-empty dict of name -> number, got "
                        f"{values!r}")
    out = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not isinstance(key, str) or not number:
            raise TypeError(f"metric {name} returned {key!r}: {value!r}; it must map names (str) "
                            "to numbers")
        out[f"eval/user/{key}"] = float(value)
    return out


class _Classes:
    def __init__(self, task: Task) -> None:
        self.top_k = task.top_k
        self.correct = self.top_correct = 0
        self.confusion: dict[tuple[int, int], int] = {}

    def add(self, out: torch.Tensor, y: torch.Tensor) -> None:
        if out.dim() != 2 or y.dim() != 1:
            raise DataError(f"classification needs outputs (N, classes) and labels (N,); got "
                            f"{tuple(out.shape)} and {tuple(y.shape)} (another task? set task=)")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= out.shape[1]):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise DataError(f"a test label {bad} is outside [0, {out.shape[1]}) (the model's "
                            "outputs); labels must be class indices")
        predicted = out.argmax(dim=1)
        self.correct += int((predicted == y).sum())
        if self.top_k is not None:
            top = out.topk(min(self.top_k, out.shape[1]), dim=1).indices
            self.top_correct += int((top == y[:, None]).any(dim=1).sum())
        pairs, counts = torch.stack([y, predicted]).unique(dim=1, return_counts=True)
        for (truth, guess), n in zip(pairs.t().tolist(), counts.tolist()):
            self.confusion[truth, guess] = self.confusion.get((truth, guess), 0) + n

    def result(self, count: int) -> dict[str, float]:
        support: dict[int, int] = {}
        hits: dict[int, int] = {}
        for (truth, guess), n in self.confusion.items():
            support[truth] = support.get(truth, 0) + n
            hits[truth] = hits.get(truth, 0) + (n if truth == guess else 0)
        result = {
            "eval/accuracy": self.correct / count,
            "eval/balanced_accuracy": sum(hits[c] / support[c] for c in support) / len(support),
            "eval/majority_share": max(support.values()) / count,
            "eval/predicted_classes": len({guess for _, guess in self.confusion}),
        }
        if self.top_k is not None:
            result[f"eval/top{self.top_k}_accuracy"] = self.top_correct / count
        return result


class _Regression:
    def __init__(self, task: Task) -> None:
        self.sse = self.sae = self.total = self.squares = 0.0
        self.values = 0

    def add(self, out: torch.Tensor, y: torch.Tensor) -> None:
        if out.shape != y.shape:
            if out.numel() != y.numel():
                raise DataError(f"regression outputs {tuple(out.shape)} do not match the targets "
                                f"{tuple(y.shape)}")
            out = out.reshape(y.shape)
        y64, error = y.double(), (out.double() - y.double())
        self.sse += float((error * error).sum())
        self.sae += float(error.abs().sum())
        self.total += float(y64.sum())
        self.squares += float((y64 * y64).sum())
        self.values += y.numel()

    def result(self, count: int) -> dict[str, float]:
        n = max(self.values, 1)
        sst = self.squares - self.total * self.total / n
        return {"eval/mse": self.sse / n, "eval/mae": self.sae / n,
                "eval/r2": 1.0 - self.sse / sst if sst > 0 else math.nan}


class _Labels:
    def __init__(self, task: Task) -> None:
        self.tp: torch.Tensor | None = None
        self.fp: torch.Tensor | None = None
        self.fn: torch.Tensor | None = None

    def add(self, out: torch.Tensor, y: torch.Tensor) -> None:
        if out.shape != y.shape or out.dim() != 2:
            raise DataError(f"multi-label needs outputs and targets of one shape (N, labels); got "
                            f"{tuple(out.shape)} and {tuple(y.shape)}")
        predicted, truth = out > 0, y > 0.5
        tp = (predicted & truth).sum(0).double().cpu()
        fp = (predicted & ~truth).sum(0).double().cpu()
        fn = (~predicted & truth).sum(0).double().cpu()
        if self.tp is None:
            self.tp, self.fp, self.fn = tp, fp, fn
        else:
            self.tp, self.fp, self.fn = self.tp + tp, self.fp + fp, self.fn + fn

    def result(self, count: int) -> dict[str, Any]:
        assert self.tp is not None and self.fp is not None and self.fn is not None
        # A label never true and never predicted is scored 1: nothing was wrong about it.
        denominator = 2 * self.tp + self.fp + self.fn
        per_label = torch.where(denominator > 0, 2 * self.tp / denominator.clamp(min=1),
                                torch.ones_like(denominator))
        micro = float(2 * self.tp.sum() / max(float(denominator.sum()), 1.0))
        return {"eval/f1_macro": float(per_label.mean()), "eval/f1_micro": micro,
                "eval/f1_per_label": [round(float(v), 6) for v in per_label]}
