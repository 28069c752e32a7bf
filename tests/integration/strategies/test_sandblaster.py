"""Sandblaster: batch methods driven by a coordinator, vectors on real gRPC shards, portions on real workers."""

import numpy as np
import pytest
import scipy.optimize
import torch

import downpour as dp
from downpour.strategies.sandblaster import Sandblaster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def objective64(data, l2):
    """The run's objective in float64 over a linear model's flat (weight, bias): mean cross-entropy + l2/2 |w|^2."""
    x = data.x_train.reshape(data.num_train, -1).double().numpy()
    y = data.y_train.numpy().copy()  # the run moves the tensor to shared memory, freeing what a view saw
    n, d = x.shape
    k = data.num_classes

    def f(w):
        weight, bias = w[: k * d].reshape(k, d), w[k * d:]
        z = x @ weight.T + bias
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        value = -np.log(p[np.arange(n), y]).mean() + 0.5 * l2 * w @ w
        p[np.arange(n), y] -= 1
        grad = np.concatenate([(p.T @ x / n).ravel(), p.mean(axis=0)]) + l2 * w
        return value, grad

    return f, k * d + k


def flat64(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy()


def end_event(result):
    return next(e for e in reversed(result.history) if e.get("event") == "end")


@pytest.fixture(scope="module")
def mnist_part(mnist):
    return mnist.subset(np.arange(6000))


@pytest.mark.slow
def test_lbfgs_on_mnist_matches_scipy_in_as_few_iterations(mnist_part):
    l2 = 1e-3
    f, numel = objective64(mnist_part, l2)
    reference = scipy.optimize.minimize(f, np.zeros(numel), jac=True, method="L-BFGS-B")
    result = dp.train(model="logistic", data=mnist_part, workers=4, servers=2, save=False,
                      strategy=Sandblaster(method="lbfgs", l2=l2, max_iterations=300))
    reached, _ = f(flat64(result.model))
    end = end_event(result)
    assert abs(reached - reference.fun) <= 1e-4 * abs(reference.fun), (reached, reference.fun)
    assert end["run/iterations"] <= 1.5 * reference.nit, (end["run/iterations"], reference.nit)
    assert result.summary["accuracy"] > 0.85


def test_what_the_coordinator_receives_per_iteration_does_not_grow_with_the_model(digits):
    # The logistic model has 650 parameters, the MLP about 100 times more; the
    # coordinator gets dot products and portion losses, never a vector.
    per_iteration = {}
    for model in ("logistic", "mlp"):
        result = dp.train(model=model, data=digits, workers=2, servers=2, save=False,
                          strategy=Sandblaster(method="lbfgs", l2=1e-3, max_iterations=4, ftol=0, gtol=0))
        end = end_event(result)
        assert end["run/iterations"] == 4
        per_iteration[model] = end["coordinator/bytes_per_iteration"]
    numel = {m: sum(p.numel() for p in dp.models.build(m, digits.input_shape, digits.num_classes).parameters())
             for m in per_iteration}
    assert numel["mlp"] > 50 * numel["logistic"]
    assert per_iteration["mlp"] < 1.5 * per_iteration["logistic"], per_iteration
    assert per_iteration["mlp"] < numel["logistic"] * 4, per_iteration  # less than even the small model's vector


@pytest.mark.parametrize("method, beta", [("cg", "fr"), ("cg", "hs"), ("agd", "fr")])
def test_conjugate_gradients_and_accelerated_descent_reach_the_optimum(digits, method, beta):
    l2 = 1e-2  # strongly convex, with a condition number the accelerated method gets through quickly
    f, numel = objective64(digits, l2)
    reference = scipy.optimize.minimize(f, np.zeros(numel), jac=True, method="L-BFGS-B", options={"gtol": 1e-8})
    result = dp.train(model="logistic", data=digits, workers=2, servers=1, save=False,
                      strategy=Sandblaster(method=method, beta=beta, l2=l2, max_iterations=400, ftol=1e-10))
    reached, _ = f(flat64(result.model))
    assert abs(reached - reference.fun) <= 1e-4 * abs(reference.fun), (reached, reference.fun)
    assert result.summary["iterations"] == end_event(result)["run/iterations"] > 0


def test_backup_portions_keep_a_straggler_from_holding_up_a_pass(mnist_part):
    # Worker 1 takes ten times as long for every portion after its first in a pass. The
    # others finish the fresh portions, then take its outstanding one; the first answer counts.
    seconds, backups = {}, {}
    for slow in ({}, {1: 10.0}):
        result = dp.train(model="logistic", data=mnist_part, workers=4, servers=1, save=False,
                          faults=dp.Faults(slow=slow),
                          strategy=Sandblaster(method="lbfgs", l2=1e-3, max_iterations=6, ftol=0, gtol=0))
        seconds[bool(slow)] = end_event(result)["batch/pass_seconds_mean"]
        backups[bool(slow)] = sum(max(e.get("sandblaster/backups", 0) for e in result.history
                                      if e.get("role") == "worker" and e.get("rank") == r) for r in range(4))
    assert seconds[True] <= 2 * seconds[False], seconds
    assert backups[True] > 0
