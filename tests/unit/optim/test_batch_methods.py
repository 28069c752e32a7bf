"""L-BFGS, accelerated gradient descent and conjugate gradients on vector ops, against scipy."""

import numpy as np
import pytest
import scipy.optimize
import torch

from downpour.optim.batch import LocalSpace, Stopping, cg_beta, minimize


def problem(seed=0, n=200, d=20, l2=1e-2):
    """L2-regularised binary logistic regression: smooth and strongly convex."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = np.sign(x @ rng.normal(size=d) + 0.5 * rng.normal(size=n))

    def f(w):
        margins = y * (x @ w)
        value = np.logaddexp(0, -margins).mean() + 0.5 * l2 * w @ w
        grad = -(x.T @ (y / (1 + np.exp(margins)))) / n + l2 * w
        return value, grad

    def objective(w):
        value, grad = f(w.double().numpy())
        return value, torch.from_numpy(grad).float()

    return f, objective, d


@pytest.mark.parametrize("method, options", [
    ("lbfgs", {}), ("agd", {}), ("cg", {"beta": "fr"}), ("cg", {"beta": "hs"}),
])
def test_every_method_reaches_scipys_optimum(method, options):
    f, objective, d = problem()
    reference = scipy.optimize.minimize(f, np.zeros(d), jac=True, method="L-BFGS-B", options={"gtol": 1e-9})
    space = LocalSpace(torch.zeros(d), objective)
    result = minimize(method, space, stop=Stopping(max_iterations=500, gtol=1e-5, ftol=1e-12), **options)
    assert abs(result.objective - reference.fun) <= 1e-4 * reference.fun
    assert result.converged
    # The method leaves the parameters at its result.
    assert abs(f(space.vectors["x"].double().numpy())[0] - result.objective) < 1e-6
    if method == "lbfgs":
        assert result.iterations <= 1.5 * reference.nit


def test_a_quadratic_takes_cg_at_most_its_dimension_in_iterations():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(10, 10))
    h = torch.tensor(a @ a.T + 10 * np.eye(10), dtype=torch.float32)
    b = torch.randn(10)
    space = LocalSpace(torch.zeros(10), lambda w: (float(0.5 * w @ h @ w - b @ w), h @ w - b))
    result = minimize("cg", space, beta="hs", stop=Stopping(max_iterations=100, gtol=1e-4))
    assert result.iterations <= 10


def test_betas_follow_their_formulas():
    assert cg_beta("fr", 2.0, 4.0, 0.0, 0.0, 0.0) == 0.5
    assert cg_beta("hs", 3.0, 9.0, 1.0, 0.5, -3.5) == 0.5  # (3 - 1) / (0.5 + 3.5)
    assert cg_beta("hs", 1.0, 9.0, 2.0, 1.0, 0.0) == 0.0  # negative: clipped (Powell)


@pytest.mark.parametrize("method, kwargs, words", [
    ("newton", {}, "method"), ("cg", {"beta": "pr"}, "beta"), ("lbfgs", {"memory": 0}, "memory"),
    ("agd", {"step": -1.0}, "step"),
])
def test_bad_options_say_what_is_wrong(method, kwargs, words):
    _, objective, d = problem()
    with pytest.raises(ValueError, match=words):
        minimize(method, LocalSpace(torch.zeros(d), objective), **kwargs)


def test_lbfgs_trains_a_squared_hinge_svm_to_scipys_optimum():
    # The L2-SVM is smooth: batch methods apply to the model itself, through FlatParams.
    from sklearn.datasets import load_digits

    from downpour.flat import FlatParams
    from downpour.models import backward, build, default_loss

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    model = build("squared-hinge-svm", (64,), 10, l2=1e-2)
    flat = FlatParams(model)

    def objective(w):
        flat.params.copy_(w)
        flat.zero_grad_()
        return float(backward(model, default_loss("squared-hinge-svm"), x, y)), flat.grads.clone()

    def f(w):
        value, grad = objective(torch.from_numpy(w).float())
        return value, grad.double().numpy()

    reference = scipy.optimize.minimize(f, np.zeros(flat.numel), jac=True, method="L-BFGS-B")
    result = minimize("lbfgs", LocalSpace(torch.zeros(flat.numel), objective), stop=Stopping(max_iterations=500))
    assert abs(result.objective - reference.fun) <= 1e-4 * reference.fun
