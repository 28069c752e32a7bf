"""Learning-rate schedules produce the documented sequences."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from downpour.optim import SCHEDULES, optim


def learning_rates(spec, total_steps: int, num: int | None = None) -> list[float]:
    """The learning rate each of the first ``num`` optimizer steps runs with."""
    optimizer = spec.build([torch.zeros(1, requires_grad=True)])
    scheduler = spec.build_scheduler(optimizer, total_steps)
    rates = []
    for _ in range(total_steps if num is None else num):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step(lambda: torch.tensor(0.0))  # a closure, so "cg" steps too
        scheduler.step()
    return rates


def test_registry_names():
    assert set(SCHEDULES) == {"constant", "step", "cosine", "warmup-cosine"}


def test_constant_is_a_lambda_scheduler_that_keeps_the_rate():
    spec = optim("sgd", lr=0.3)
    optimizer = spec.build([torch.zeros(1, requires_grad=True)])
    assert isinstance(spec.build_scheduler(optimizer, 10), LambdaLR)
    assert learning_rates(spec, 5) == [0.3] * 5


def test_step_decays_every_step_size_steps():
    rates = learning_rates(optim("sgd", lr=1.0, schedule="step", step_size=2, gamma=0.5), 7)
    assert rates == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125])


def test_cosine_anneals_to_zero_over_total_steps():
    total = 8
    rates = learning_rates(optim("sgd", lr=2.0, schedule="cosine"), total, num=total + 1)
    expected = [1.0 * (1 + math.cos(math.pi * k / total)) for k in range(total + 1)]
    assert rates == pytest.approx(expected, abs=1e-12)
    assert rates[-1] == pytest.approx(0.0, abs=1e-12)


def test_warmup_ramps_linearly_then_hands_over_to_constant():
    rates = learning_rates(optim("sgd", lr=1.0, warmup_steps=4), 7)
    assert rates == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0])


def test_warmup_then_step_counts_decays_from_the_end_of_warmup():
    spec = optim("sgd", lr=1.0, schedule="step", step_size=2, gamma=0.1, warmup_steps=2)
    assert learning_rates(spec, 7) == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01])


@pytest.mark.parametrize("name", ["cosine", "warmup-cosine"])
def test_warmup_then_cosine_over_the_remaining_steps(name):
    warmup, total = 3, 7
    rates = learning_rates(optim("adam", lr=1.0, schedule=name, warmup_steps=warmup), total)
    cosine = [0.5 * (1 + math.cos(math.pi * k / (total - warmup))) for k in range(total - warmup)]
    assert rates == pytest.approx([1 / 3, 2 / 3, 1.0] + cosine)


def test_schedules_drive_conjugate_gradient_too():
    rates = learning_rates(optim("cg", lr=1.0, schedule="step", step_size=1, gamma=0.5), 3)
    assert rates == pytest.approx([1.0, 0.5, 0.25])


def test_warmup_cosine_needs_warmup_steps():
    with pytest.raises(
        ValueError, match=r"schedule 'warmup-cosine' needs warmup_steps >= 1, got 0"
    ):
        optim("sgd", lr=0.1, schedule="warmup-cosine")


def test_cosine_needs_steps_left_after_warmup():
    spec = optim("sgd", lr=0.1, schedule="cosine", warmup_steps=10)
    optimizer = spec.build([torch.zeros(1, requires_grad=True)])
    with pytest.raises(ValueError, match=r"warmup_steps \(10\) must be below total_steps \(10\)"):
        spec.build_scheduler(optimizer, 10)


def test_total_steps_must_be_positive():
    spec = optim("sgd", lr=0.1)
    optimizer = spec.build([torch.zeros(1, requires_grad=True)])
    with pytest.raises(ValueError, match="total_steps must be a positive int, got 0"):
        spec.build_scheduler(optimizer, 0)


@pytest.mark.parametrize("gamma", [0.0, 1.5])
def test_gamma_must_be_a_decay_factor(gamma):
    with pytest.raises(ValueError, match=rf"gamma must be in \(0, 1\], got {gamma}"):
        optim("sgd", lr=0.1, schedule="step", step_size=3, gamma=gamma)
