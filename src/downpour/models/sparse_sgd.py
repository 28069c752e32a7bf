"""Compiled SGD for the linear models over CSR rows: a few dozen flops per example, not a dispatch.

A step of a linear model on a sparse row of k nonzeros costs O(k C) arithmetic
(C classes); done through torch it costs tens of microseconds of dispatch, so
downpour's torch path trains w8a at a few thousand examples a second where
scikit-learn's ``SGDClassifier`` does millions. These kernels, compiled by
numba, run the same updates as the torch models (:mod:`downpour.models.linear`)
on ``float32`` weights, with the GIL released, so that Hogwild! threads can run
them over one shared weight matrix (Niu, Recht, Ré, Wright, NIPS 2011).

Two ways to regularise, both exact in expectation:

- ``"scale"`` (one process): the weight matrix is ``W = s V``. The L2 decay of
  every coordinate, ``W <- (1 - lr l2) W``, is one multiplication of ``s``;
  a gradient step writes ``V`` divided by ``s``, on the row's features only
  (Bottou's sgd and scikit-learn do the same). The result equals dense SGD
  with weight decay.
- ``"split"`` (Hogwild!): an example holding feature ``u`` shrinks only
  ``W[:, u]``, by ``lr l2 N / n_u`` (``n_u`` of the N examples hold ``u``):
  summed over the examples it is the whole L2 term, and every write stays on
  the row's features, as in the paper's sparse SVM. A shared scale could not
  be: every thread would write it.

The bias is never regularised. Learning rates: constant, scikit-learn's
``"optimal"`` ``1 / (alpha (t0 + t))`` and ``"invscaling"`` ``eta0 / (t + 1)^power``,
``t`` counting the examples seen (mini-batches of B examples advance it by B).

Example:
    >>> import scipy.sparse
    >>> x = scipy.sparse.csr_matrix(np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32))
    >>> kernel = SparseSGD("svm", num_features=2, num_classes=2, lr=0.1)
    >>> round(kernel.fit_epoch(x, np.array([0, 1])), 3)  # the mean loss of the epoch
    2.1
    >>> kernel.predict(x).tolist()
    [0, 1]
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, NamedTuple

import numba
import numpy as np
import scipy.sparse
import torch
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic

from downpour.errors import DataError, check_range, choose

LOSSES: dict[str, int] = {"perceptron": 0, "svm": 1, "squared-hinge-svm": 2, "multiclass-svm": 3,
                          "logistic": 4}
"""The kernel's losses, by the name of the model that trains with them."""

SCHEDULES: dict[str, int] = {"constant": 0, "optimal": 1, "invscaling": 2}
Regularization = Literal["scale", "split"]

# Below this the scale is folded into V (an O(d C) pass), so that V / s never overflows.
_MIN_SCALE = 1e-6
# Averaging, the average's sum U + B V cancels about 1 / s of V's float32 rounding: folded sooner.
_MIN_SCALE_AVERAGED = 1e-2


# Rows read ahead of the one being trained (see _read_ahead), and the cache lines (16 values) of a
# row asked for: a shuffled pass over the RCV1-shaped set went from 0.84 s to 0.21 s (0.16 s in order).
_AHEAD = 16
_AHEAD_LINES = 16


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask the CPU to bring ``array[index]``'s cache line in (LLVM's ``prefetch``: a hint, no fault)."""
    if not isinstance(array, numba.types.Array):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        byte = ir.IntType(8).as_pointer()
        hint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [byte, ir.IntType(32), ir.IntType(32), ir.IntType(32)]), "llvm.prefetch.p0")
        i32 = ir.IntType(32)  # read, keep in every cache level, data
        builder.call(hint, [builder.bitcast(builder.gep(data, [args[1]]), byte), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return numba.types.void(array, index), codegen


@numba.njit(cache=True, nogil=True, inline="always")
def _read_ahead(indptr, indices, values, labels, order, position):
    """Prefetch what the rows ahead of ``order[position]`` will read.

    A shuffled pass waits on memory at every row: the row's pointer, then its
    values, each a miss the CPU cannot see coming (the row before it is
    hundreds of instructions long). So the pointer and label of the row
    ``2 _AHEAD`` ahead are asked for, and the values and indices of the row
    ``_AHEAD`` ahead, whose pointer was asked for ``_AHEAD`` rows ago.
    """
    n = order.shape[0]
    if position + 2 * _AHEAD < n:
        far = order[position + 2 * _AHEAD]
        _prefetch(indptr, far)
        _prefetch(labels, far)
    if position + _AHEAD < n:
        near = order[position + _AHEAD]
        start, stop = indptr[near], indptr[near + 1]
        for at in range(start, min(stop, start + 16 * _AHEAD_LINES), 16):
            _prefetch(values, at)
            _prefetch(indices, at)


@numba.njit(cache=True, nogil=True, inline="always")
def _rate(kind: int, eta0: float, alpha: float, t0: float, power: float, t: float) -> float:
    if kind == 1:
        return 1.0 / (alpha * (t0 + t))
    if kind == 2:
        return eta0 / (t + 1.0) ** power
    return eta0


@numba.njit(cache=True, nogil=True)
def _score_gradient(loss: int, scores: np.ndarray, label: int, out: np.ndarray) -> float:
    """``out = dL/dscores`` of one example; returns its loss. Ties break as torch's max does."""
    classes = scores.shape[0]
    for c in range(classes):
        out[c] = 0.0
    if loss == 0 or loss == 3:  # perceptron: max over all; Crammer-Singer: over the others, +1
        best, best_score = -1, -np.inf
        for c in range(classes):
            if (loss == 0 or c != label) and scores[c] > best_score:
                best, best_score = c, scores[c]
        margin = best_score - scores[label] + (1.0 if loss == 3 else 0.0)
        if margin > 0.0:
            out[best] += 1.0
            out[label] -= 1.0
            return margin
        return 0.0
    if loss == 4:  # softmax cross-entropy
        top = scores.max()
        total = 0.0
        for c in range(classes):
            out[c] = math.exp(scores[c] - top)
            total += out[c]
        for c in range(classes):
            out[c] /= total
        value = -(scores[label] - top - math.log(total))
        out[label] -= 1.0
        return value
    value = 0.0  # one-vs-rest hinge (1) or squared hinge (2), summed over classes
    for c in range(classes):
        target = 1.0 if c == label else -1.0
        slack = 1.0 - target * scores[c]
        if slack > 0.0:
            if loss == 1:
                value += slack
                out[c] = -target
            else:
                value += slack * slack
                out[c] = -2.0 * target * slack
    return value


@numba.njit(cache=True, nogil=True, inline="always")
def _shrink(weights, avg_sum, scale, summed, decay, average):
    """The L2 step of ``W = s V`` as one multiplication of ``s`` by ``1 - decay``; below
    :data:`_MIN_SCALE` (:data:`_MIN_SCALE_AVERAGED` averaging) ``s`` is folded into ``V``, and the
    average's ``B V`` into ``U`` (see :func:`_fit`). Returns the new ``(s, B)``."""
    scale *= 1.0 - decay
    if scale >= (_MIN_SCALE_AVERAGED if average > 0 else _MIN_SCALE):
        return scale, summed
    for u in range(weights.shape[0]):
        for c in range(weights.shape[1]):
            if summed != 0.0:
                avg_sum[u, c] += summed * weights[u, c]
            weights[u, c] *= scale
    return 1.0, 0.0


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _fit(indptr, indices, values, labels, order, weights, bias, state, loss, batch, schedule,
         eta0, alpha, t0, power, l2, split, feature_scale, bias_lr, average, avg_sum, avg_bias,
         avg_state, pending):
    """SGD over the rows ``order`` in mini-batches of ``batch``; returns the summed loss.

    ``weights`` is (d, C) float32 (a feature's classes side by side), ``V^T`` of ``W = s V`` with ``split`` False
    (``state[0]`` is ``s``), ``W`` itself with ``split`` True. ``state[1]`` is
    the examples seen (the schedule's t); ``state[2]`` the updates written.

    With ``average`` > 0, every iterate after a step that brings the examples
    seen to ``average`` or more is summed, sparsely: the sum is ``U + B V``
    (``avg_sum`` is ``U``, float64, ``avg_state`` is ``(B, steps summed)``), so
    a step that moves ``V`` by ``D`` on the row's features moves ``U`` by
    ``-B D`` there, and ``B`` grows by the step's ``s``; ``avg_bias`` sums the
    biases. A rescale of ``V`` folds ``B V`` into ``U``; averaging, it comes at
    ``s`` = 1e-2 (not 1e-6), since ``U`` cancels ``B V`` to about ``1 / s``.

    ``split`` without averaging defers the shrinking: an example whose gradient
    is zero multiplies ``pending[u]`` (the caller's, float32 (d,), one per
    thread) by its features' keep factors instead of writing the weights, the
    dot products read ``weights[u] pending[u]``, and the next write of feature
    ``u`` applies and resets it; :func:`_flush` writes what is left. The steps
    are the eager ones, but only examples that move the weights write them:
    Hogwild! threads then share far fewer cache lines.
    """
    classes = weights.shape[1]
    defer = split and l2 > 0.0 and average == 0
    grads = np.empty((batch, classes), dtype=np.float64)
    scores = np.empty(classes, dtype=np.float64)
    coefficient = np.empty(classes, dtype=np.float32)
    total = 0.0
    n = order.shape[0]
    # The clock, the scale and B in locals, stored back once: kept in arrays, every write to the
    # weights (which may alias them, for all numba knows) would make them be read again.
    scale, seen, updates = state[0], state[1], state[2]
    summed, averaged = avg_state[0], avg_state[1]  # B, steps summed
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        size = stop - start
        averaging = average > 0 and seen + size >= average
        for k in range(size):  # every gradient of the batch at the same weights
            _read_ahead(indptr, indices, values, labels, order, start + k)
            row = order[start + k]
            for c in range(classes):
                scores[c] = 0.0
            if classes == 2:  # both classes' dot products in one pass, unrolled
                first = second = 0.0
                for j in range(indptr[row], indptr[row + 1]):
                    u = indices[j]
                    x = values[j] * pending[u] if defer else values[j]
                    first += weights[u, 0] * x
                    second += weights[u, 1] * x
                scores[0], scores[1] = first, second
            else:
                for j in range(indptr[row], indptr[row + 1]):
                    u = indices[j]
                    x = values[j] * pending[u] if defer else values[j]
                    for c in range(classes):
                        scores[c] += weights[u, c] * x
            for c in range(classes):
                scores[c] = scores[c] * scale + bias[c]
            total += _score_gradient(loss, scores, labels[row], grads[k])
        lr = _rate(schedule, eta0, alpha, t0, power, seen)
        step = lr / size
        if not split and l2 > 0.0:
            scale, summed = _shrink(weights, avg_sum, scale, summed, lr * l2, average)
        for k in range(size):
            row = order[start + k]
            active = False
            for c in range(classes):
                coefficient[c] = step * grads[k, c] / scale
                active = active or grads[k, c] != 0.0
            if defer:
                decay = lr * l2 / size
                for j in range(indptr[row], indptr[row + 1]):
                    u = indices[j]
                    keep = 1.0 - min(decay * feature_scale[u], 1.0)
                    if not active:
                        pending[u] *= keep
                        continue
                    keep *= pending[u]
                    pending[u] = 1.0
                    for c in range(classes):
                        weights[u, c] = keep * weights[u, c] - coefficient[c] * values[j]
            elif split and l2 > 0.0:
                decay = lr * l2 / size
                for j in range(indptr[row], indptr[row + 1]):
                    u = indices[j]
                    keep = 1.0 - min(decay * feature_scale[u], 1.0)
                    for c in range(classes):
                        old = weights[u, c]
                        weights[u, c] = keep * old - coefficient[c] * values[j]
                        if summed != 0.0:
                            avg_sum[u, c] -= summed * (weights[u, c] - old)
            elif active and classes == 2 and summed == 0.0:  # both classes' moves in one pass
                first, second = coefficient[0], coefficient[1]
                for j in range(indptr[row], indptr[row + 1]):
                    u = indices[j]
                    weights[u, 0] -= first * values[j]
                    weights[u, 1] -= second * values[j]
            elif active:  # a hinge or perceptron example on the right side writes nothing
                for j in range(indptr[row], indptr[row + 1]):
                    u = indices[j]
                    for c in range(classes):
                        move = coefficient[c] * values[j]
                        weights[u, c] -= move
                        if summed != 0.0:
                            avg_sum[u, c] += summed * move
            if bias_lr != 0.0:
                for c in range(classes):
                    bias[c] -= bias_lr * step * grads[k, c]
        seen += size
        updates += 1
        if averaging:
            summed += scale
            averaged += 1.0
            for c in range(classes):
                avg_bias[c] += bias[c]
    state[0], state[1], state[2] = scale, seen, updates
    avg_state[0], avg_state[1] = summed, averaged
    return total


@numba.njit(cache=True, nogil=True, inline="always")
def _binary_gradient(loss: int, h: float, label: int) -> tuple[float, float]:
    """``(loss, dL/ds_1)`` of one example of a two-class model held as one vector: scores
    ``(-h, h)``, class 0's gradient the negative of class 1's (what :func:`_score_gradient` gives
    on those scores, in scalars)."""
    t = 1.0 if label == 1 else -1.0  # the sign of the true class's score h
    if loss == 0:  # perceptron: a mistake only if the other class scores strictly higher (ties: 0)
        if (label == 1 and h < 0.0) or (label == 0 and h > 0.0):
            return -2.0 * t * h, -t
        return 0.0, 0.0
    if loss == 3:  # Crammer-Singer: max(0, 1 + s_other - s_label)
        margin = 1.0 - 2.0 * t * h
        return (margin, -t) if margin > 0.0 else (0.0, 0.0)
    if loss == 4:  # softmax of (-h, h): p_1 = sigmoid(2h), the loss softplus(-2th); one exp
        small = math.exp(-abs(2.0 * h))
        p1 = 1.0 / (1.0 + small) if h >= 0.0 else small / (1.0 + small)
        return max(-2.0 * t * h, 0.0) + math.log1p(small), p1 - (1.0 if label == 1 else 0.0)
    slack = 1.0 - t * h  # one-vs-rest (squared) hinge: both classes' slacks are this one
    if slack <= 0.0:
        return 0.0, 0.0
    if loss == 1:
        return 2.0 * slack, -t
    return 2.0 * slack * slack, -2.0 * t * slack


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _fit_binary(indptr, indices, values, labels, order, weights, bias, state, loss, batch,
                schedule, eta0, alpha, t0, power, l2, split, feature_scale, bias_lr, average,
                avg_sum, avg_bias, avg_state, pending):
    """:func:`_fit` for two classes held as one vector ``w`` (``weights`` (d, 1)): ``W = (-w, w)``,
    ``b = (-b_1, b_1)``; ``w`` takes class 1's steps (class 0's are their negatives). Scalars
    throughout: one dot product and one write per stored value; ``pending`` as there."""
    w, grads = weights[:, 0], np.empty(batch, dtype=np.float64)
    defer = split and l2 > 0.0 and average == 0
    total = 0.0
    n = order.shape[0]
    scale, seen, updates = state[0], state[1], state[2]
    summed, averaged = avg_state[0], avg_state[1]
    b = bias[0]
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        size = stop - start
        averaging = average > 0 and seen + size >= average
        for k in range(size):
            _read_ahead(indptr, indices, values, labels, order, start + k)
            row = order[start + k]
            dot = 0.0
            if defer:
                for j in range(indptr[row], indptr[row + 1]):
                    dot += w[indices[j]] * pending[indices[j]] * values[j]
            else:
                for j in range(indptr[row], indptr[row + 1]):
                    dot += w[indices[j]] * values[j]
            value, grads[k] = _binary_gradient(loss, dot * scale + b, labels[row])
            total += value
        lr = _rate(schedule, eta0, alpha, t0, power, seen)
        step = lr / size
        if not split and l2 > 0.0:
            scale, summed = _shrink(weights, avg_sum, scale, summed, lr * l2, average)
        for k in range(size):
            g = grads[k]
            row = order[start + k]
            coefficient = np.float32(step * g / scale)
            if defer:
                decay = lr * l2 / size
                for j in range(indptr[row], indptr[row + 1]):
                    u = indices[j]
                    keep = 1.0 - min(decay * feature_scale[u], 1.0)
                    if g == 0.0:
                        pending[u] *= keep
                    else:
                        w[u] = keep * pending[u] * w[u] - coefficient * values[j]
                        pending[u] = 1.0
            elif split and l2 > 0.0:
                decay = lr * l2 / size
                for j in range(indptr[row], indptr[row + 1]):
                    u = indices[j]
                    old = w[u]
                    w[u] = (1.0 - min(decay * feature_scale[u], 1.0)) * old - coefficient * values[j]
                    if summed != 0.0:
                        avg_sum[u, 0] -= summed * (w[u] - old)
            elif g != 0.0 and summed == 0.0:
                for j in range(indptr[row], indptr[row + 1]):
                    w[indices[j]] -= coefficient * values[j]
            elif g != 0.0:
                for j in range(indptr[row], indptr[row + 1]):
                    move = coefficient * values[j]
                    w[indices[j]] -= move
                    avg_sum[indices[j], 0] += summed * move
            if bias_lr != 0.0:
                b -= bias_lr * step * g
        seen += size
        updates += 1
        if averaging:
            summed += scale
            averaged += 1.0
            avg_bias[0] += b
    bias[0] = b
    state[0], state[1], state[2] = scale, seen, updates
    avg_state[0], avg_state[1] = summed, averaged
    return total


@numba.njit(cache=True, nogil=True)
def _flush(weights, pending):
    """Write the shrinking ``pending`` holds (see :func:`_fit`) into ``weights``; resets it."""
    for u in range(weights.shape[0]):
        if pending[u] != 1.0:
            for c in range(weights.shape[1]):
                weights[u, c] *= pending[u]
            pending[u] = 1.0


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _batch_gradient(indptr, indices, values, labels, weights, bias, loss, l2, bias_lr, grad_w,
                    grad_b):
    """Add the mean gradient over the batch's rows to ``grad_w`` (C, d) and ``grad_b`` (times
    ``bias_lr``), the L2 term ``l2 W`` included as torch's regularization gives it; returns the
    mean loss with it."""
    classes, rows = weights.shape[0], indptr.shape[0] - 1
    scores = np.empty(classes, dtype=np.float64)
    g = np.empty(classes, dtype=np.float64)
    total = 0.0
    for row in range(rows):
        for c in range(classes):
            acc = 0.0
            for j in range(indptr[row], indptr[row + 1]):
                acc += weights[c, indices[j]] * values[j]
            scores[c] = acc + bias[c]
        total += _score_gradient(loss, scores, labels[row], g)
        for c in range(classes):
            if g[c] != 0.0:
                coefficient = g[c] / rows
                for j in range(indptr[row], indptr[row + 1]):
                    grad_w[c, indices[j]] += coefficient * values[j]
                grad_b[c] += coefficient * bias_lr
    penalty = 0.0
    if l2 > 0.0:
        for c in range(classes):
            for u in range(weights.shape[1]):
                w = weights[c, u]
                grad_w[c, u] += l2 * w
                penalty += w * w
    return total / max(rows, 1) + 0.5 * l2 * penalty


def batch_gradient(loss: str, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, l2: float, bias_lr: float = 1.0) -> float:
    """Add the gradient of ``loss`` (a model name of :data:`LOSSES`) on the CSR batch ``(x, y)``
    to ``weight.grad`` and ``bias.grad`` (CPU float32, ``weight`` (C, d) as torch holds it),
    the model's ``0.5 l2 ||W||^2`` included, the bias's times ``bias_lr`` (the model's, see
    :class:`downpour.models.linear.LinearModel`); returns the loss. It is the gradient torch's
    autograd gives for the model, without its dispatch. The batch is taken as it is (its
    rows are downpour's own CSR batches, already checked)."""
    return float(_batch_gradient(
        x.crow_indices().numpy(), x.col_indices().numpy(), x.values().numpy(),
        y.numpy(), weight.detach().numpy(), bias.detach().numpy(), LOSSES[loss], float(l2),
        float(bias_lr), weight.grad.numpy(), bias.grad.numpy()))


@numba.njit(cache=True, nogil=True)
def _scores(indptr, indices, values, weights, bias, scale, out):
    classes = weights.shape[1]
    for row in range(indptr.shape[0] - 1):
        for c in range(classes):
            out[row, c] = 0.0
        for j in range(indptr[row], indptr[row + 1]):
            for c in range(classes):
                out[row, c] += weights[indices[j], c] * values[j]
        for c in range(classes):
            out[row, c] = out[row, c] * scale + bias[c]


class Rows(NamedTuple):
    """CSR arrays as the kernel reads them: no copy of a scipy matrix's or a torch tensor's."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]


def check_csr(x: Any, num_features: int | None = None, name: str = "x") -> Rows:
    """``x`` (a scipy CSR matrix or a torch ``sparse_csr`` tensor) as :class:`Rows`, refused with
    a clear error before any kernel reads it.

    Out-of-range or unsorted column indices, duplicates, a broken ``indptr`` and
    NaN or infinite values are named; nothing is copied unless the values are not float32.
    """
    if isinstance(x, Rows):
        return x
    if isinstance(x, torch.Tensor) and x.layout == torch.sparse_csr:
        indptr, indices = x.crow_indices().numpy(), x.col_indices().numpy()
        data = x.values().numpy()
    elif scipy.sparse.issparse(x) and x.format == "csr":
        indptr, indices, data = x.indptr, x.indices, x.data
    else:
        raise DataError(f"{name} must be a CSR matrix (scipy) or tensor (torch.sparse_csr), got "
                        f"{type(x).__name__}")
    rows, features = (int(n) for n in x.shape)
    if num_features is not None and features != num_features:
        raise DataError(f"{name} has {features} features, the model {num_features}")
    if len(data) != len(indices):
        raise DataError(f"{name} holds {len(indices)} column indices but {len(data)} values")
    fault = _check_rows(indptr, indices, data, features) if len(indptr) == rows + 1 else _CSR_INDPTR
    if fault == _CSR_INDPTR:
        raise DataError(f"{name}: indptr is not a valid CSR row pointer for {rows} rows and "
                        f"{len(indices)} stored values")
    if fault == _CSR_RANGE:
        bad = int(indices.min()) if int(indices.min()) < 0 else int(indices.max())
        raise DataError(f"{name}: column index {bad} is outside [0, {features})")
    if fault == _CSR_NOT_FINITE:
        raise DataError(f"{name} holds {int((~np.isfinite(data)).sum())} NaN or infinite values")
    if fault == _CSR_UNSORTED:
        raise DataError(f"{name}: column indices are unsorted or duplicated within a row "
                        "(call sort_indices() and sum_duplicates() first)")
    return Rows(indptr, indices, np.ascontiguousarray(data, dtype=np.float32), (rows, features))


def _index_dtype(stored: int, features: int) -> type:
    """int32 for the row pointers and column indices of ``stored`` values over ``features``
    columns where they fit, else int64."""
    small = max(stored, features) <= np.iinfo(np.int32).max
    return np.int32 if small else np.int64


def compact(x: Rows) -> Rows:
    """``x`` with int32 row pointers and column indices where they fit (those two copied once;
    torch's CSR tensors hold int64): the kernel then reads 8 bytes a stored value, not 12,
    which makes a shuffled pass over the RCV1-shaped set 1.46x faster (memory-bound).

    Example:
        >>> x = Rows(np.array([0, 1]), np.array([2]), np.ones(1, "f4"), (1, 3))
        >>> compact(x).indices.dtype
        dtype('int32')
    """
    kind = _index_dtype(len(x.indices), x.shape[1])
    if x.indptr.dtype == x.indices.dtype == kind:
        return x
    return Rows(x.indptr.astype(kind), x.indices.astype(kind), x.data, x.shape)


def gather_rows(x: Rows, order: np.ndarray) -> Rows:
    """The rows ``order`` of ``x``, laid out in that order: a pass over them in order then reads
    memory front to back (Bottou's sgd shuffles its data once so; a shuffled pass over rows
    where they lie waits on memory at every row: 3.9x slower on the RCV1-shaped set).

    Example:
        >>> x = Rows(np.array([0, 1, 3]), np.array([2, 0, 1]), np.array([1., 2., 3.], "f4"), (2, 3))
        >>> gather_rows(x, np.array([1, 0])).indices
        array([0, 1, 2], dtype=int32)
    """
    order = np.ascontiguousarray(order, dtype=np.int64)
    lengths = np.diff(x.indptr)[order]
    indptr = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    kind = _index_dtype(int(indptr[-1]), x.shape[1])  # as compact() makes them
    indptr = indptr.astype(kind, copy=False)
    indices = np.empty(int(indptr[-1]), dtype=kind)
    data = np.empty(int(indptr[-1]), dtype=x.data.dtype)
    _gather(x.indptr, x.indices, x.data, order, indptr, indices, data)
    return Rows(indptr, indices, data, (len(order), x.shape[1]))


@numba.njit(cache=True, nogil=True)
def _gather(indptr, indices, data, order, out_indptr, out_indices, out_data):
    for k in range(order.shape[0]):
        start, at = indptr[order[k]], out_indptr[k]
        for j in range(indptr[order[k] + 1] - start):
            out_indices[at + j] = indices[start + j]
            out_data[at + j] = data[start + j]


@numba.njit(cache=True, nogil=True)
def _count_features(indices, features):
    """How many stored values each feature holds: ``np.bincount``'s counts without its copy of
    int32 indices to int64 (RCV1-shaped set: 44 ms against 166)."""
    counts = np.zeros(features, dtype=np.int64)
    for j in range(indices.shape[0]):
        counts[indices[j]] += 1
    return counts


_CSR_OK, _CSR_INDPTR, _CSR_RANGE, _CSR_NOT_FINITE, _CSR_UNSORTED = range(5)


@numba.njit(cache=True, nogil=True)
def _check_rows(indptr, indices, data, features) -> int:
    """The first fault of a CSR matrix, in the order :func:`check_csr` names them (a row pointer
    that does not rise from 0 to the number of stored values, a column index outside
    ``[0, features)``, a value NaN or infinite, a row whose indices do not rise strictly), or
    ``_CSR_OK``. The tests share flat passes that vectorize (a row-by-row loop over rows of a
    dozen values does not): 0.14 ms on w8a, where numpy's passes, one a test, took 0.26 ms."""
    stored = indices.shape[0]
    if indptr[0] != 0 or indptr[indptr.shape[0] - 1] != stored:
        return _CSR_INDPTR
    drops = 0
    for row in range(1, indptr.shape[0]):
        drops += indptr[row] < indptr[row - 1]
    if drops:
        return _CSR_INDPTR
    width = np.uint64(features)  # a negative index is a large unsigned one: one test, not two
    outside = stored > 0 and np.uint64(indices[0]) >= width
    falls = 0  # every step that does not rise, less those where a row begins (below)
    for j in range(1, stored):
        outside += np.uint64(indices[j]) >= width
        falls += indices[j] <= indices[j - 1]
    if outside:
        return _CSR_RANGE
    infinite = 0
    for j in range(stored):
        infinite += not (abs(data[j]) < np.inf)  # NaN compares false
    if infinite:
        return _CSR_NOT_FINITE
    for row in range(1, indptr.shape[0] - 1):
        start = indptr[row]
        if indptr[row - 1] < start < stored:  # the first value of a row after a non-empty one
            falls -= indices[start] <= indices[start - 1]
    return _CSR_OK if falls == 0 else _CSR_UNSORTED


@dataclass
class SparseSGD:
    """A linear model trained by the compiled kernel: ``weights`` (d, C), ``W`` transposed, and
    ``bias`` (C,), or (d, 1) and (1,) for two classes held as one vector (:meth:`set_weights`);
    :meth:`coefficients` gives ``W`` (C, d) as the torch models hold it.

    Args:
        loss: a model name of :data:`LOSSES` (its loss: ``"svm"`` is the one-vs-rest hinge).
        num_features, num_classes: the shape of ``W``.
        lr: the learning rate (``eta0`` of ``"invscaling"``; unused by ``"optimal"``).
        l2: λ of ``0.5 λ ||W||²``.
        schedule: ``"constant"``, ``"optimal"`` or ``"invscaling"``.
        alpha, t0, power: the ``"optimal"`` and ``"invscaling"`` parameters;
            ``t0`` defaults to scikit-learn's choice for ``"optimal"``.
        regularization: ``"scale"`` or ``"split"`` (see the module).
        batch_size: examples per step (their gradients at the same weights, averaged).
        average: 0 for plain SGD; n >= 1 for averaged SGD (Polyak and Juditsky; Bottou's
            ASGD; scikit-learn's ``average=n``): the model it predicts with is the mean of
            the iterates after every step from the one that brings the examples seen to n.
        bias_lr: the bias's rate as a share of ``lr`` (the torch model's ``bias_lr``).
    """

    loss: str
    num_features: int
    num_classes: int
    lr: float = 0.01
    l2: float = 0.0
    schedule: str = "constant"
    alpha: float = 1e-4
    t0: float | None = None
    power: float = 0.5
    regularization: Regularization = "scale"
    batch_size: int = 1
    average: int = 0
    bias_lr: float = 1.0
    weights: np.ndarray = field(init=False, repr=False)
    bias: np.ndarray = field(init=False, repr=False)
    feature_scale: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        choose("loss", self.loss, LOSSES)
        choose("schedule", self.schedule, SCHEDULES)
        choose("regularization", self.regularization, ("scale", "split"))
        check_range("num_features", self.num_features, 1)
        check_range("num_classes", self.num_classes, 2)
        check_range("batch_size", self.batch_size, 1)
        check_range("average", self.average, 0)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (self.l2 >= 0 and math.isfinite(self.l2)):
            raise ValueError(f"l2 must be >= 0, got {self.l2!r}")
        if not (self.bias_lr >= 0 and math.isfinite(self.bias_lr)):
            raise ValueError(f"bias_lr must be >= 0, got {self.bias_lr!r}")
        if self.schedule == "optimal" and self.t0 is None:
            # scikit-learn's heuristic: the first rate is that of a typical hinge example.
            typw = math.sqrt(1.0 / math.sqrt(self.alpha))
            self.t0 = 1.0 / (typw * self.alpha)
        self.feature_scale = np.ones(self.num_features, dtype=np.float32)
        self._state = np.array([1.0, 0.0, 0.0])  # scale, examples seen, updates written
        self._avg_state = np.zeros(2)  # B, iterates summed
        self._pending = self.pending()
        self._lock = threading.Lock()
        self.set_weights(np.zeros((self.num_classes, self.num_features), dtype=np.float32),
                         np.zeros(self.num_classes, dtype=np.float32))

    @property
    def examples_seen(self) -> int:
        return int(self._state[1])

    @property
    def iterates_averaged(self) -> int:
        """How many iterates the average holds (0: the model predicts with the last one)."""
        return int(self._avg_state[1])

    @property
    def binary(self) -> bool:
        """Whether the two classes are held as one vector (see :meth:`set_weights`)."""
        return self.weights.shape[1] == 1 < self.num_classes

    def set_weights(self, weights: np.ndarray, bias: np.ndarray) -> None:
        """Start from ``weights`` (C, d) and ``bias`` (C,) (a torch model's, say).

        Two classes whose weights and biases are each other's negatives (zeros,
        the linear models' start) are held as one vector ``w = W_1``, as a binary
        model is: every loss's two gradients are then each other's negatives too,
        so the classes stay so and one dot product and one write per feature
        take the two-vector model's exact steps. Any other start keeps both.
        """
        weights = np.asarray(weights, dtype=np.float32)
        bias = np.asarray(bias, dtype=np.float32)
        if weights.shape != (self.num_classes, self.num_features) or bias.shape != (
                self.num_classes,):
            raise ValueError(f"weights {weights.shape} and bias {bias.shape} do not fit a model of "
                             f"{self.num_classes} classes over {self.num_features} features")
        if self.num_classes == 2 and bias[0] == -bias[1] and np.array_equal(weights[0], -weights[1]):
            weights, bias = weights[1:], bias[1:]
        # Transposed, (d, C): the classes of one feature in one cache line.
        self.weights = np.array(weights.T, order="C")  # a copy: the kernel writes it
        self.bias = bias.copy()
        self._state[0] = 1.0
        # The averaged iterates' sum U + B V (see _fit): float64, as B V nearly cancels U.
        self._avg_sum = np.zeros(self.weights.shape if self.average else (1, 1), dtype=np.float64)
        self._avg_bias = np.zeros(self.bias.shape, dtype=np.float64)
        self._avg_state[...] = 0.0

    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W, b)`` it predicts with: the average of the iterates once it holds one, else the
        last iterate (the scale folded into a copy of the weights)."""
        weights, bias, scale = self._predictor()
        return np.ascontiguousarray(weights.T) * np.float32(scale), bias.copy()

    def _predictor(self) -> tuple[np.ndarray, np.ndarray, float]:
        """``(weights (d, C), bias, scale)`` of the model it predicts with."""
        count = self._avg_state[1]
        if not count:
            weights, bias, scale = self.weights, self.bias, float(self._state[0])
        else:
            summed = self._avg_sum + self._avg_state[0] * self.weights
            weights, bias, scale = ((summed / count).astype(np.float32),
                                    (self._avg_bias / count).astype(np.float32), 1.0)
        if self.binary:
            weights, bias = np.concatenate([-weights, weights], axis=1), np.concatenate([-bias, bias])
        return weights, bias, scale

    def frequencies(self, x: Any) -> None:
        """The ``"split"`` regularisation's ``N / n_u`` from the training rows ``x``."""
        x = check_csr(x, self.num_features)
        counts = _count_features(x.indices, self.num_features).astype(np.float64)
        self.feature_scale = np.where(counts > 0, x.shape[0] / np.maximum(counts, 1), 0).astype(
            np.float32)

    def fit_epoch(self, x, y: np.ndarray, order: np.ndarray | None = None, *,
                  checked: bool = False, state: np.ndarray | None = None,
                  pending: np.ndarray | None = None) -> float:
        """One pass over rows ``order`` of ``(x, y)`` (all, in order, by default); the mean loss.

        ``state`` is a thread's own clock (Hogwild!: every thread its schedule's
        t); by default the model's. ``pending`` is a thread's shrinking not yet
        written (``"split"``; see :func:`_fit`), from :meth:`pending` and written
        back by :meth:`flush`; by default the model's, written back before this returns.
        """
        x = check_csr(x, self.num_features)  # at once for Rows already checked
        if not checked:
            y = self.check_labels(y, x.shape[0])
        if order is None:
            order = np.arange(x.shape[0], dtype=np.int64)
        if len(order) == 0:
            return 0.0
        own = self._state if state is None else state
        deferred = self._pending if pending is None else pending
        total = (_fit_binary if self.binary else _fit)(
            x.indptr, x.indices, x.data, y, order, self.weights, self.bias, own,
            LOSSES[self.loss], self.batch_size, SCHEDULES[self.schedule], self.lr, self.alpha,
            self.t0 or 1.0, self.power, self.l2, self.regularization == "split",
            self.feature_scale, float(self.bias_lr), self.average, self._avg_sum, self._avg_bias,
            self._avg_state, deferred)
        if pending is None and self.regularization == "split":  # "scale" defers nothing
            self.flush(deferred)
        return total / len(order)

    def pending(self) -> np.ndarray:
        """A thread's own record of the shrinking it has not yet written (see :meth:`fit_epoch`)."""
        return np.ones(self.num_features, dtype=np.float32)

    def flush(self, pending: np.ndarray) -> None:
        """Write ``pending``'s shrinking into the weights (and reset it)."""
        _flush(self.weights, pending)

    def check_labels(self, y: np.ndarray, rows: int) -> np.ndarray:
        y = np.ascontiguousarray(y, dtype=np.int64)
        if y.shape != (rows,):
            raise DataError(f"labels have shape {y.shape}, the inputs {rows} rows")
        if rows and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise DataError(f"a label is outside [0, {self.num_classes})")
        return y

    def decision_function(self, x) -> np.ndarray:
        x = check_csr(x, self.num_features)
        out = np.empty((x.shape[0], self.num_classes), dtype=np.float64)
        weights, bias, scale = self._predictor()
        _scores(x.indptr, x.indices, x.data, weights, bias, scale, out)
        return out

    def predict(self, x) -> np.ndarray:
        return self.decision_function(x).argmax(axis=1)

    def error(self, x, y: np.ndarray) -> float:
        """The share of rows of ``x`` misclassified."""
        return float((self.predict(x) != np.asarray(y)).mean())


def warm_up(model: SparseSGD) -> None:
    """Compile the kernels ``model`` calls (or load them from numba's cache), leaving it as it was."""
    probe = SparseSGD(model.loss, num_features=1, num_classes=model.num_classes, lr=model.lr,
                      l2=model.l2, schedule=model.schedule, alpha=model.alpha, t0=model.t0,
                      power=model.power, regularization=model.regularization,
                      batch_size=model.batch_size, average=model.average, bias_lr=model.bias_lr)
    if model.num_classes == 2 and not model.binary:  # the two-vector kernel, not the binary one
        probe.set_weights(np.zeros((2, 1), np.float32), np.array([0.0, 1.0], np.float32))
    for kind in (np.int32, np.int64):  # the input checks, for scipy's and torch's index types
        for values in (np.float32, np.float64):
            _check_rows(np.array([0, 2], kind), np.array([0, 1], kind), np.ones(2, values), 2)
        _count_features(np.array([0], kind), 1)
    x = Rows(np.array([0, 1], np.int64), np.array([0], np.int64), np.ones(1, np.float32), (1, 1))
    probe.fit_epoch(x, np.zeros(1, np.int64))
    probe.predict(x)
    probe.fit_epoch(gather_rows(x, np.zeros(1, np.int64)), np.zeros(1, np.int64))  # int32 rows
    probe.fit_epoch(compact(x), np.zeros(1, np.int64))


def hogwild_threads(model: SparseSGD, x, y: np.ndarray, orders: Sequence[np.ndarray], *,
                    mode: Literal["hogwild", "lock", "round_robin"] = "hogwild",
                    chunk: int = 1) -> list[dict[str, float]]:
    """One pass per thread, thread i over rows ``orders[i]``, all writing ``model``'s weights.

    ``hogwild``: every thread runs the kernel over its whole order at once,
    without a lock (the GIL released), its writes racing the others' as the
    paper's do. ``lock`` takes one lock around each ``chunk`` of examples;
    ``round_robin`` has the threads write in turn, ``chunk`` examples each:
    the paper's comparators, their gradients computed inside the critical
    section because the kernel fuses gradient and write. The model must use
    the ``"split"`` regularisation (a shared scale would be a shared write).

    Returns each thread's ``{"loss": mean loss, "examples": n, "updates": steps}``.
    """
    if model.regularization != "split":
        raise ValueError("hogwild threads need regularization='split': a shared scale factor "
                         "would be written by every thread")
    if model.average:
        raise ValueError("hogwild threads cannot average the iterates: the average's shared "
                         "sum would be written by every thread")
    choose("mode", mode, ("hogwild", "lock", "round_robin"))
    check_range("chunk", chunk, 1)
    x = check_csr(x, model.num_features)
    y = model.check_labels(y, x.shape[0])
    results: list[dict[str, float]] = [{} for _ in orders]
    errors: list[BaseException] = []
    lock = threading.Lock()
    turn = threading.Condition()
    whose = [0]
    live = [True] * len(orders)

    def run(rank: int, order: np.ndarray) -> None:
        # Each thread its own clock: the schedule runs on the examples it has seen, times W.
        state, pending = np.array([1.0, 0.0, 0.0]), model.pending()
        total = 0.0
        fit = partial(model.fit_epoch, x, y, checked=True, state=state, pending=pending)
        try:
            if mode == "hogwild":
                total = fit(order) * len(order)
            else:
                for start in range(0, len(order), chunk):
                    part = order[start : start + chunk]
                    if mode == "lock":
                        with lock:
                            total += fit(part) * len(part)
                    else:
                        with turn:
                            turn.wait_for(lambda: whose[0] == rank)
                            total += fit(part) * len(part)
                            _pass_turn(whose, live, rank)
                            turn.notify_all()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(error)
        finally:
            if mode == "hogwild":
                model.flush(pending)  # racing the others' writes, as every write here does
            elif mode == "lock":
                with lock:
                    model.flush(pending)
            if mode == "round_robin":
                with turn:  # held by every round-robin write
                    model.flush(pending)
                    live[rank] = False
                    if whose[0] == rank:
                        _pass_turn(whose, live, rank)
                    turn.notify_all()
        results[rank] = {"loss": total / max(len(order), 1), "examples": int(state[1]),
                         "updates": int(state[2])}

    threads = [threading.Thread(target=run, args=(rank, np.ascontiguousarray(order, np.int64)),
                                name=f"hogwild-{rank}") for rank, order in enumerate(orders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def _pass_turn(whose: list[int], live: list[bool], rank: int) -> None:
    """The next live thread after ``rank`` in rank order gets the turn (itself if it is the last)."""
    count = len(live)
    for offset in range(1, count + 1):
        nxt = (rank + offset) % count
        if live[nxt]:
            whose[0] = nxt
            return
