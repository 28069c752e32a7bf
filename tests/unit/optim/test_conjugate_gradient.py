"""Nonlinear conjugate gradients: the quadratic done-when test, steepest-descent limits, line search."""

from __future__ import annotations

import pytest
import torch

from downpour.optim import ConjugateGradient
from downpour.optim.cg import conjugate_direction
from downpour.optim.line_search import Point, strong_wolfe

D = 50


def spd_problem(seed: int, d: int = D, condition: float = 100.0):
    """A random SPD matrix with eigenvalues in [1, condition] (both ends included) and a random b."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    inner = 1 + (condition - 1) * torch.rand(d - 2, generator=generator, dtype=torch.float64)
    eigenvalues = torch.cat([torch.tensor([1.0, condition], dtype=torch.float64), inner])
    a = basis @ torch.diag(eigenvalues) @ basis.T
    return (a + a.T) / 2, torch.randn(d, generator=generator, dtype=torch.float64)


def quadratic_closure(optimizer, x, a, b):
    def closure():
        optimizer.zero_grad()
        loss = 0.5 * x @ a @ x - b @ x
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta", ["fr", "hs"])
def test_minimizes_an_spd_quadratic_within_d_iterations(beta, seed):
    a, b = spd_problem(seed)
    x = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    optimizer = ConjugateGradient(
        [x], beta=beta, max_iter=1, tolerance_grad=0.0, tolerance_change=0.0
    )
    closure = quadratic_closure(optimizer, x, a, b)
    for iteration in range(1, D + 1):
        optimizer.step(closure)
        residual = (a @ x.detach() - b).norm() / b.norm()
        if residual <= 1e-6:
            break
    assert residual <= 1e-6, f"relative residual {residual:.1e} after {D} iterations"
    assert optimizer.state[x]["n_iter"] == iteration <= D


def test_first_step_without_line_search_is_an_sgd_step():
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    models = [torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [
        ConjugateGradient(models[0].parameters(), lr=0.05, line_search=None, max_iter=1),
        torch.optim.SGD(models[1].parameters(), lr=0.05),
    ]
    for model, optimizer in zip(models, optimizers):

        def closure(model=model, optimizer=optimizer):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
    for cg_param, sgd_param in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(cg_param, sgd_param)


def test_first_step_is_steepest_descent_with_an_exact_line_search_on_a_quadratic():
    a, b = spd_problem(0)
    x = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grad = a @ x - b
    expected = x - (grad @ grad) / (grad @ a @ grad) * grad
    x = x.clone().requires_grad_()
    optimizer = ConjugateGradient([x], beta="hs", max_iter=1)
    optimizer.step(quadratic_closure(optimizer, x, a, b))
    torch.testing.assert_close(x.detach(), expected)


def test_restart_every_iteration_is_steepest_descent():
    a, b = spd_problem(0, d=10)
    expected = torch.zeros(10, dtype=torch.float64)
    for _ in range(5):
        grad = a @ expected - b
        expected = expected - (grad @ grad) / (grad @ a @ grad) * grad
    x = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    optimizer = ConjugateGradient([x], max_iter=5, restart_every=1, tolerance_change=0.0)
    optimizer.step(quadratic_closure(optimizer, x, a, b))
    assert optimizer.state[x]["n_iter"] == 5
    torch.testing.assert_close(x.detach(), expected)


def test_state_carries_over_between_steps():
    a, b = spd_problem(1, d=20)
    once = torch.zeros(20, dtype=torch.float64, requires_grad=True)
    optimizer = ConjugateGradient([once], max_iter=8, tolerance_change=0.0)
    optimizer.step(quadratic_closure(optimizer, once, a, b))
    twice = torch.zeros(20, dtype=torch.float64, requires_grad=True)
    optimizer = ConjugateGradient([twice], max_iter=4, tolerance_change=0.0)
    optimizer.step(quadratic_closure(optimizer, twice, a, b))
    optimizer.step(quadratic_closure(optimizer, twice, a, b))
    torch.testing.assert_close(twice, once)


def test_fletcher_reeves_direction():
    grad, prev_grad = torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0])
    prev_direction = torch.tensor([-2.0, 0.0])
    # beta = |g|^2 / |g_prev|^2 = 2 / 4
    torch.testing.assert_close(
        conjugate_direction(grad, prev_grad, prev_direction, "fr"), torch.tensor([-2.0, -1.0])
    )


def test_negative_hestenes_stiefel_beta_restarts_from_steepest_descent():
    grad, prev_grad = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])
    prev_direction = torch.tensor([-1.0, 0.0])
    # y = g - g_prev = (-2, 0); beta = g.y / d.y = -2 / 2 < 0
    torch.testing.assert_close(conjugate_direction(grad, prev_grad, prev_direction, "hs"), -grad)


def test_a_direction_that_does_not_descend_is_replaced_by_steepest_descent():
    grad, prev_grad = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0])
    prev_direction = torch.tensor([5.0, 0.0])  # uphill; FR beta = 4 would keep it uphill
    torch.testing.assert_close(conjugate_direction(grad, prev_grad, prev_direction, "fr"), -grad)


@pytest.mark.parametrize("first_step", [1e-3, 0.3, 1.0, 50.0])
def test_line_search_meets_the_strong_wolfe_conditions(first_step):
    # f(x) = (x - 2)^4 + 0.5 x along d = +1 from x = 0: not quadratic, minimum near 1.5.
    def evaluate(t: float) -> Point:
        slope = 4 * (t - 2) ** 3 + 0.5
        return Point(t, (t - 2) ** 4 + 0.5 * t, torch.tensor([slope]), slope)

    start, c1, c2 = evaluate(0.0), 1e-4, 0.1
    point, evals = strong_wolfe(evaluate, start, first_step, c1=c1, c2=c2)
    assert point.loss <= start.loss + c1 * point.t * start.slope
    assert abs(point.slope) <= c2 * abs(start.slope)
    assert evals <= 25


def test_step_needs_a_closure():
    optimizer = ConjugateGradient([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="needs a closure"):
        optimizer.step(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"beta": "pr"}, r"unknown beta 'pr'; choose one of: fr, hs"),
        (
            {"line_search": "armijo"},
            r"unknown line_search 'armijo'; choose one of: strong_wolfe, None",
        ),
        ({"lr": 0.0}, r"lr must be in \(0, inf\], got 0.0"),
        ({"c1": 0.5, "c2": 0.1}, r"c2 must be in \(0.5, 1\], got 0.1"),
        ({"restart_every": 0}, r"restart_every must be in \[1, inf\], got 0"),
    ],
)
def test_bad_arguments_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        ConjugateGradient([torch.zeros(2, requires_grad=True)], **options)


def test_one_parameter_group_only():
    groups = [
        {"params": [torch.zeros(1, requires_grad=True)]},
        {"params": [torch.zeros(1, requires_grad=True)]},
    ]
    with pytest.raises(ValueError, match="one parameter group"):
        ConjugateGradient(groups)
