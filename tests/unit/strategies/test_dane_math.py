"""DANE's round in one process, on quadratics, against the paper's closed form."""

from itertools import pairwise

import pytest
import torch

from downpour.strategies.dane import quadratic_round, solve_lbfgs, solve_sgd, subproblem


def _quadratics(workers: int, dim: int = 6, seed: int = 0):
    """Local objectives φ_i(w) = ½ wᵀA_i w − b_iᵀw (float64), their Hessians A_i and the global optimum."""
    generator = torch.Generator().manual_seed(seed)
    hessians, linears = [], []
    for _ in range(workers):
        basis = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        hessians.append(basis @ basis.T / dim + 0.5 * torch.eye(dim, dtype=torch.float64))
        linears.append(torch.randn(dim, generator=generator, dtype=torch.float64))
    optimum = torch.linalg.solve(sum(hessians) / workers, sum(linears) / workers)
    return hessians, linears, optimum


def _local(hessian, linear):
    return lambda w: (float(0.5 * w @ hessian @ w - linear @ w), hessian @ w - linear)


def _dane_round(hessians, linears, w, *, eta, mu, solve):
    """One round with equal weights: the global gradient, the local problems solved by ``solve``, the average."""
    locals_ = [_local(h, b) for h, b in zip(hessians, linears)]
    grads = [local(w)[1] for local in locals_]
    global_grad = sum(grads) / len(grads)
    solutions = [solve(subproblem(local, w, grad - eta * global_grad, mu), w)
                 for local, grad in zip(locals_, grads)]
    return sum(solutions) / len(solutions), global_grad


def _exact(problem, start):
    return solve_lbfgs(problem, start, steps=200)[0]


def test_the_local_problem_has_the_scaled_global_gradient_at_the_rounds_start():
    hessians, linears, _ = _quadratics(3)
    w = torch.ones(6, dtype=torch.float64)
    local = _local(hessians[0], linears[0])
    global_grad = sum(_local(h, b)(w)[1] for h, b in zip(hessians, linears)) / 3
    _, grad = subproblem(local, w, local(w)[1] - 0.3 * global_grad, mu=2.0)(w)
    assert torch.allclose(grad, 0.3 * global_grad)


@pytest.mark.parametrize(("eta", "mu"), [(1.0, 0.0), (0.5, 0.0), (1.0, 0.3), (0.7, 2.0)])
def test_exact_local_solves_give_the_averaged_inverse_hessian_step(eta, mu):
    hessians, linears, _ = _quadratics(4)
    w = torch.zeros(6, dtype=torch.float64)
    after, global_grad = _dane_round(hessians, linears, w, eta=eta, mu=mu, solve=_exact)
    expected = quadratic_round(hessians, [1, 1, 1, 1], global_grad, w, eta=eta, mu=mu)
    assert torch.allclose(after, expected, atol=1e-6)  # L-BFGS stops once the loss changes by < 1e-12


def test_one_worker_or_identical_shards_with_eta_1_and_mu_0_land_on_the_optimum_in_one_round():
    hessians, linears, optimum = _quadratics(1)
    w = torch.zeros(6, dtype=torch.float64)
    assert torch.allclose(_dane_round(hessians, linears, w, eta=1.0, mu=0.0, solve=_exact)[0], optimum, atol=1e-6)
    # Three workers with the same shard: each local problem is the global one.
    after, _ = _dane_round(hessians * 3, linears * 3, w, eta=1.0, mu=0.0, solve=_exact)
    assert torch.allclose(after, optimum, atol=1e-6)


def test_different_shards_need_more_rounds_and_converge():
    hessians, linears, optimum = _quadratics(4)
    w = torch.zeros(6, dtype=torch.float64)
    errors = []
    for _ in range(6):
        w, _ = _dane_round(hessians, linears, w, eta=1.0, mu=0.0, solve=_exact)
        errors.append(float((w - optimum).norm()))
    assert errors[0] > 1e-3  # the local Hessians are not the global one
    assert all(later < 0.5 * earlier for earlier, later in pairwise(errors)), errors


def test_a_large_mu_turns_the_round_into_a_gradient_step_of_eta_over_mu():
    hessians, linears, _ = _quadratics(3)
    w = torch.ones(6, dtype=torch.float64)
    eta, mu = 0.8, 1e4
    after, global_grad = _dane_round(hessians, linears, w, eta=eta, mu=mu, solve=_exact)
    gradient_step = w - eta / mu * global_grad
    assert torch.allclose(after, gradient_step, rtol=0, atol=1e-3 * float((gradient_step - w).norm()))


def test_local_gradient_descent_converges_to_the_exact_local_solution():
    hessians, linears, _ = _quadratics(3)
    w = torch.zeros(6, dtype=torch.float64)

    def descend(problem, start):
        return solve_sgd(problem, start, steps=2000, lr=0.2)[0]

    after, global_grad = _dane_round(hessians, linears, w, eta=1.0, mu=0.1, solve=descend)
    expected = quadratic_round(hessians, [1, 1, 1], global_grad, w, eta=1.0, mu=0.1)
    assert torch.allclose(after, expected, atol=1e-8)


def test_the_solvers_report_their_iterations():
    quadratic = _local(torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    assert solve_sgd(quadratic, torch.zeros(2, dtype=torch.float64), steps=7, lr=0.1)[1] == 7
    solution, iterations = solve_lbfgs(quadratic, torch.zeros(2, dtype=torch.float64), steps=50)
    assert torch.allclose(solution, torch.ones(2, dtype=torch.float64)) and 1 <= iterations <= 3
