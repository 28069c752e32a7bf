"""OptimSpec: every registered optimizer builds and descends; bad specs fail early and clearly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from downpour.optim import OPTIMIZERS, ConjugateGradient, OptimSpec, optim

LEARNING_RATES = {"sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "adagrad": 0.3,
                  "rmsprop": 0.01, "adadelta": 3.0, "adam": 0.05, "cg": 1.0}  # fmt: skip


def regression_problem():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=generator)
    y = x @ torch.randn(5, 1, generator=generator) + 0.1 * torch.randn(64, 1, generator=generator)
    return x, y


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_builds_and_lowers_a_least_squares_loss(name):
    torch.manual_seed(0)
    x, y = regression_problem()
    model = torch.nn.Linear(5, 1)
    spec = optim(name, lr=LEARNING_RATES[name])
    optimizer = spec.build(model.parameters())
    assert isinstance(optimizer, OPTIMIZERS[name].cls)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = closure().item()
    for _ in range(30):
        optimizer.step(closure)
    assert closure().item() < 0.8 * first


def test_names_map_to_torch_optimizers_with_their_defaults():
    param = [torch.zeros(1, requires_grad=True)]
    momentum = optim("momentum", lr=0.1).build(param)
    assert isinstance(momentum, torch.optim.SGD) and momentum.defaults["momentum"] == 0.9
    nesterov = optim("nesterov", lr=0.1).build(param)
    assert nesterov.defaults["nesterov"] and nesterov.defaults["momentum"] == 0.9
    assert optim("momentum", lr=0.1, momentum=0.5).build(param).defaults["momentum"] == 0.5
    assert type(optim("adagrad", lr=0.05).build(param)) is torch.optim.Adagrad
    cg = optim("cg", beta="hs").build(param)
    assert isinstance(cg, ConjugateGradient) and cg.defaults["beta"] == "hs"


def test_missing_lr_takes_the_recipe_default():
    assert optim("adam").lr == 1e-3
    assert optim("adadelta").lr == 1.0


def test_spec_is_a_frozen_hashable_value():
    spec = optim("adam", lr=0.01, betas=(0.8, 0.9))
    assert spec == optim("adam", lr=0.01, betas=(0.8, 0.9))
    assert hash(spec) == hash(optim("adam", lr=0.01, betas=(0.8, 0.9)))
    assert spec.kwargs == {"betas": (0.8, 0.9)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.lr = 1.0  # type: ignore[misc]


def test_parameter_groups_are_accepted():
    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    optimizer = optim("sgd", lr=0.1).build([{"params": [a]}, {"params": [b], "lr": 0.01}])
    assert [group["lr"] for group in optimizer.param_groups] == [0.1, 0.01]


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(
        ValueError, match=r"unknown optimizer 'adamw'; choose one of: adadelta, adagrad, adam, cg,"
    ):
        optim("adamw", lr=0.1)
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'"):
        OptimSpec(name="adamw", lr=0.1)


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan"), float("inf")])
def test_learning_rate_must_be_positive_and_finite(lr):
    with pytest.raises(ValueError, match=f"lr must be a finite number > 0, got {lr}"):
        optim("sgd", lr=lr)


def test_unknown_optimizer_options_are_named_with_the_accepted_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown option\(s\) 'beta', 'moment' for optimizer 'adam'; it accepts: .*betas",
    ):
        optim("adam", lr=0.1, moment=0.9, beta=0.9)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("momentum", {"momentum": -1.0}, "Invalid momentum value: -1.0"),
        ("nesterov", {"momentum": 0.0}, "Nesterov momentum requires"),
        ("adam", {"betas": (1.5, 0.9)}, "Invalid beta parameter"),
        ("cg", {"beta": "pr"}, r"unknown beta 'pr'; choose one of: fr, hs"),
    ],
)
def test_bad_optimizer_values_fail_when_the_spec_is_made(name, options, message):
    with pytest.raises(ValueError, match=rf"invalid options for optimizer '{name}': .*{message}"):
        optim(name, lr=0.1, **options)


def test_bad_schedule_settings_fail_when_the_spec_is_made():
    with pytest.raises(
        ValueError, match=r"unknown schedule 'linear'; choose one of: constant, cosine, step"
    ):
        optim("sgd", lr=0.1, schedule="linear")
    with pytest.raises(ValueError, match="schedule 'step' needs step_size"):
        optim("sgd", lr=0.1, schedule="step")
    with pytest.raises(ValueError, match=r"warmup_steps must be in \[0, inf\], got -1"):
        optim("sgd", lr=0.1, warmup_steps=-1)
