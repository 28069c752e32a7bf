"""Models given as plain NumPy functions instead of an ``nn.Module``.

This serves the seeds' literal interface: "the user gives a function that
returns the outputs of a model, a function that returns the gradients, and the
number of machines". The functions see the parameters as one flat NumPy
vector, the same flat vector every strategy exchanges.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse
import torch
from torch import nn

Init = Callable[[np.random.Generator], np.ndarray]
Predict = Callable[[np.ndarray, object], np.ndarray]
Gradient = Callable[[np.ndarray, object, np.ndarray], np.ndarray]
Loss = Callable[[np.ndarray, object, np.ndarray], float]


def to_numpy(x: torch.Tensor) -> np.ndarray | scipy.sparse.csr_matrix:
    """Convert a dense tensor to a NumPy array and a sparse one to a SciPy CSR matrix.

    Example:
        >>> to_numpy(torch.eye(2).to_sparse_csr()).nnz
        2
    """
    if x.layout == torch.sparse_coo:
        x = x.to_sparse_csr()
    if x.layout == torch.sparse_csr:
        x = x.detach().cpu()
        parts = (x.values().numpy(), x.col_indices().numpy(), x.crow_indices().numpy())
        return scipy.sparse.csr_matrix(parts, shape=tuple(x.shape))
    return x.detach().cpu().numpy()


class FunctionModel(nn.Module):
    """A model defined by ``init``, ``predict`` and ``gradient`` functions over NumPy arrays.

    The module holds one flat float32 parameter ``params``. ``forward`` calls
    ``predict`` (for evaluation; there is no autograd through it) and
    :func:`downpour.models.backward` calls ``gradient``, which must return the
    gradient of the *mean* loss over the batch, like torch's default losses.
    Inputs reach the functions as NumPy arrays, or SciPy CSR matrices for
    sparse batches; labels as int64 arrays. The parameters they receive are a
    read-only view, so a function cannot change them by accident.

    Args:
        init: initial parameters, or a function of a ``np.random.Generator`` returning them (1-D).
        predict: ``predict(params, x) -> outputs`` with one row per example.
        gradient: ``gradient(params, x, y) -> grad`` with the shape of ``params``.
        loss: optional ``loss(params, x, y) -> float``; without it, :func:`backward`
            applies its ``loss_fn`` to the outputs of ``predict``.
        seed: seed of the generator passed to ``init``.

    Example:
        >>> init, predict, gradient = logistic_regression_functions(4, 3)
        >>> model = FunctionModel(init, predict, gradient)
        >>> model(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        init: Init | np.ndarray,
        predict: Predict,
        gradient: Gradient,
        loss: Loss | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for what, fn in (("predict", predict), ("gradient", gradient), ("loss", loss)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{what} must be a function, got {type(fn).__name__}")
        start = init(np.random.default_rng(seed)) if callable(init) else init
        start = np.asarray(start)
        if start.ndim != 1 or start.size == 0 or not np.issubdtype(start.dtype, np.number):
            raise ValueError(
                f"init must give a non-empty 1-D numeric array of parameters, "
                f"got {start.dtype} array of shape {start.shape}"
            )
        _check_finite("init", start)
        self.params = nn.Parameter(torch.tensor(start, dtype=torch.float32))
        self.predict_fn = predict
        self.gradient_fn = gradient
        self.loss_fn = loss

    def numpy_params(self) -> np.ndarray:
        """Return the parameters as a read-only NumPy view (no copy on CPU)."""
        view = self.params.detach().cpu().numpy()
        view.flags.writeable = False
        return view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = np.asarray(self.predict_fn(self.numpy_params(), to_numpy(x)))
        if outputs.ndim < 1 or outputs.shape[0] != x.shape[0]:
            raise ValueError(
                f"predict must return one row per example: expected shape ({x.shape[0]}, ...), "
                f"got {outputs.shape}"
            )
        return torch.as_tensor(outputs, dtype=torch.float32, device=self.params.device)

    def accumulate_grad_(self, loss_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Add the user's gradient on ``(x, y)`` into ``params.grad`` in place; return the loss.

        Prefer :func:`downpour.models.backward`, which dispatches here.
        """
        params, features, labels = self.numpy_params(), to_numpy(x), y.detach().cpu().numpy()
        grad = np.asarray(self.gradient_fn(params, features, labels))
        if grad.shape != params.shape:
            raise ValueError(
                f"gradient must return an array of shape {params.shape}, got {grad.shape}"
            )
        _check_finite("gradient", grad)
        if self.params.grad is None:
            self.params.grad = torch.zeros_like(self.params)
        # add_ (never rebinding .grad) because .grad may be a view into a flat buffer.
        self.params.grad.add_(torch.as_tensor(grad, dtype=torch.float32, device=self.params.device))
        if self.loss_fn is not None:
            value = float(self.loss_fn(params, features, labels))
            return torch.tensor(value, dtype=torch.float32)
        with torch.no_grad():
            return loss_fn(self(x), y).detach()


def _check_finite(what: str, values: np.ndarray) -> None:
    if not np.all(np.isfinite(values)):
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        raise ValueError(f"{what} returned {bad} NaN or infinite value(s)")


def logistic_regression_functions(d: int, num_classes: int) -> tuple[Init, Predict, Gradient]:
    """Return ``(init, predict, gradient)`` of multinomial logistic regression in pure NumPy.

    The flat parameters are laid out like the "logistic" torch model's
    (weight ``(num_classes, d)`` row-major, then bias), so the two can share a
    flat vector. ``x`` may be dense (flattened per example) or SciPy sparse.

    Example:
        >>> init, predict, gradient = logistic_regression_functions(2, 3)
        >>> params = init(np.random.default_rng(0))
        >>> gradient(params, np.ones((4, 2)), np.array([0, 1, 2, 0])).shape
        (9,)
    """
    size = num_classes * d

    def unpack(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return params[:size].reshape(num_classes, d), params[size:]

    def rows(x):
        return x if scipy.sparse.issparse(x) else np.asarray(x).reshape(x.shape[0], -1)

    def init(rng: np.random.Generator) -> np.ndarray:
        return np.concatenate([rng.normal(0.0, 0.01, size), np.zeros(num_classes)])

    def predict(params: np.ndarray, x) -> np.ndarray:
        weight, bias = unpack(params)
        return np.asarray(rows(x) @ weight.T) + bias

    def gradient(params: np.ndarray, x, y: np.ndarray) -> np.ndarray:
        x = rows(x)
        scores = predict(params, x).astype(np.float64)
        # Subtracting the row max keeps exp from overflowing; softmax is unchanged.
        probs = np.exp(scores - scores.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        probs[np.arange(len(y)), y] -= 1.0
        probs /= len(y)
        grad_weight = np.asarray(x.T @ probs).T
        return np.concatenate([grad_weight.ravel(), probs.sum(axis=0)])

    return init, predict, gradient
