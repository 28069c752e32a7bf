"""L2-regularised multinomial logistic regression in float64: the objective batch methods are held to."""

from __future__ import annotations

import numpy as np
import scipy.optimize
from threadpoolctl import threadpool_limits
from torch import nn

from downpour.flat import FlatParams


def logistic_objective(theta: np.ndarray, x: np.ndarray, y: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
    """Mean multinomial logistic loss over all examples plus λ/2 ||θ||², and its gradient, in float64.

    θ is laid out like the "logistic" model's flat vector: weight (C, d) row-major, then bias (C).
    """
    classes = theta.size // (x.shape[1] + 1)
    weight, bias = theta[: classes * x.shape[1]].reshape(classes, -1), theta[classes * x.shape[1]:]
    scores = x @ weight.T + bias
    scores -= scores.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(scores).sum(axis=1))
    rows = np.arange(len(y))
    value = float((log_norm - scores[rows, y]).mean() + 0.5 * l2 * theta @ theta)
    probs = np.exp(scores - log_norm[:, None])
    probs[rows, y] -= 1.0
    probs /= len(y)
    grad = np.concatenate([(probs.T @ x).ravel(), probs.sum(axis=0)]) + l2 * theta
    return value, grad


def arrays(data) -> tuple[np.ndarray, np.ndarray]:
    """The training set as float64 rows and labels (copies: a run moves the tensors to shared memory)."""
    return data.x_train.reshape(data.num_train, -1).double().numpy(), data.y_train.numpy().copy()


def objective(data, l2: float):
    """``f(theta) -> (value, gradient)`` over ``data``'s training set, and the length of theta."""
    x, y = arrays(data)

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        with threadpool_limits(1):  # BLAS threads fighting over 2 busy cores make this 50x slower
            return logistic_objective(theta, x, y, l2)

    return f, data.num_classes * (x.shape[1] + 1)


def scipy_optimum(data, l2: float, **options) -> scipy.optimize.OptimizeResult:
    """scipy's L-BFGS-B from zero on the objective (its default tolerances unless ``options`` says)."""
    f, numel = objective(data, l2)
    result = scipy.optimize.minimize(f, np.zeros(numel), jac=True, method="L-BFGS-B", options=options)
    assert result.success, result.message
    return result


def flat64(model: nn.Module) -> np.ndarray:
    return FlatParams(model).params.double().numpy()
