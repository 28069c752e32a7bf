"""The compiled sparse SGD kernel against the torch models it stands in for, and its input checks."""

from __future__ import annotations

import threading
from functools import partial

import numpy as np
import pytest
import scipy.sparse
import torch

import downpour as dp
from downpour.errors import DataError
from downpour.models.gradients import backward
from downpour.models.sparse_sgd import (LOSSES, SparseSGD, check_csr, compact, gather_rows,
                                        hogwild_threads)


def sparse_problem(rows=60, features=40, classes=3, density=0.15, seed=0):
    rng = np.random.default_rng(seed)
    x = scipy.sparse.random(rows, features, density=density, format="csr", dtype=np.float32,
                            random_state=rng)
    x.data *= 2.0
    y = rng.integers(0, classes, size=rows)
    return x, y


def torch_sgd(name, x, y, weights, bias, *, lr, l2, batch, average=0, bias_lr=1.0):
    """Plain torch SGD on the downpour model ``name``: its loss and regularization, dense inputs.

    With ``average`` n, the mean of the iterates after every step from the one that brings the
    examples seen to n (summed in float64, one by one).
    """
    model = dp.models.build(name, (x.shape[1],), weights.shape[0], bias_lr=bias_lr,
                            **({"l2": l2} if l2 else {}))
    if not l2 and hasattr(model, "l2"):
        model.l2 = 0.0
    with torch.no_grad():
        model.linear.weight.copy_(torch.from_numpy(weights))
        model.linear.bias.copy_(torch.from_numpy(bias))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    dense, labels = torch.from_numpy(x.toarray()), torch.from_numpy(y)
    sums, count = [np.zeros(weights.shape), np.zeros(bias.shape)], 0
    for start in range(0, len(y), batch):
        optimizer.zero_grad()
        backward(model, dp.models.default_loss(name), dense[start : start + batch],
                 labels[start : start + batch])
        optimizer.step()
        if average and min(start + batch, len(y)) >= average:
            sums[0] += model.linear.weight.detach().double().numpy()
            sums[1] += model.linear.bias.detach().double().numpy()
            count += 1
    if average:
        return sums[0] / count, sums[1] / count
    return model.linear.weight.detach().numpy(), model.linear.bias.detach().numpy()


def start_weights(start, features, seed=1):
    """``"three"``: 3 classes; ``"two"``: 2 classes, two vectors; ``"pair"``: 2 classes whose
    weights are each other's negatives, which the kernel holds as one vector."""
    rng = np.random.default_rng(seed)
    classes = 3 if start == "three" else 2
    weights = rng.normal(0, 0.3, size=(classes, features)).astype(np.float32)
    bias = rng.normal(0, 0.3, size=classes).astype(np.float32)
    if start == "pair":
        weights[0], bias[0] = -weights[1], -bias[1]
    return weights, bias


# One row per model, loss and shape: the kernel's epoch equals torch's SGD on the same examples.
@pytest.mark.parametrize("start", ["three", "two", "pair"])
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("l2", [0.0, 0.05])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_the_kernel_takes_the_torch_models_steps(name, l2, batch, start):
    if name == "perceptron" and l2:
        pytest.skip("the perceptron has no L2 term")
    weights, bias = start_weights(start, 40)
    x, y = sparse_problem(classes=len(bias))
    kernel = SparseSGD(name, num_features=x.shape[1], num_classes=len(bias), lr=0.1, l2=l2,
                       batch_size=batch)
    kernel.set_weights(weights, bias)
    assert kernel.binary == (start == "pair")
    kernel.fit_epoch(x, y)
    want_w, want_b = torch_sgd(name, x, y, weights, bias, lr=0.1, l2=l2, batch=batch)
    got_w, got_b = kernel.coefficients()
    np.testing.assert_allclose(got_w, want_w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-4, atol=1e-5)
    # It moved: an epoch that changed nothing would pass the comparison with an idle kernel too.
    assert np.abs(got_w - weights).max() > 1e-3


# A bias at a share of the rate (scikit-learn's 0.01 on sparse data): the torch model scales the
# bias's gradient, the kernel its step; the same steps, and the bias moves that much less.
@pytest.mark.parametrize("start", ["three", "pair"])
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_scaled_bias_rate_is_the_torch_models_scaled_gradient(name, batch, start):
    weights, bias = start_weights(start, 40)
    x, y = sparse_problem(classes=len(bias))
    l2 = 0.0 if name == "perceptron" else 0.05
    moved = {}
    for bias_lr in (0.01, 1.0):
        kernel = SparseSGD(name, num_features=x.shape[1], num_classes=len(bias), lr=0.1, l2=l2,
                           batch_size=batch, bias_lr=bias_lr)
        kernel.set_weights(weights, bias)
        kernel.fit_epoch(x, y)
        want_w, want_b = torch_sgd(name, x, y, weights, bias, lr=0.1, l2=l2, batch=batch,
                                   bias_lr=bias_lr)
        got_w, got_b = kernel.coefficients()
        np.testing.assert_allclose(got_w, want_w, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got_b, want_b, rtol=1e-4, atol=1e-6)
        moved[bias_lr] = np.abs(got_b - bias).max()
    if name != "perceptron":  # its ±1 bias steps can cancel over an epoch at any rate
        assert 0 < moved[0.01] < 0.1 * moved[1.0]


def test_a_bias_rate_is_checked_and_refused_by_the_batch_methods():
    with pytest.raises(ValueError, match="bias_lr"):
        dp.models.build("svm", (3,), 2, bias_lr=-1.0)
    with pytest.raises(ValueError, match="bias_lr"):
        SparseSGD("svm", num_features=3, num_classes=2, bias_lr=float("nan"))
    model = dp.models.build("logistic", (3,), 2, bias_lr=0.0)
    scores = model(torch.ones(2, 3))
    scores.sum().backward()
    assert model.linear.bias.grad.abs().sum() == 0 and model.linear.weight.grad.abs().sum() > 0
    data = dp.data.load("rcv1-like", n_train=64, n_test=16, features=50)
    factory = partial(dp.models.build, "svm", data.input_shape, 2, bias_lr=0.01)
    for strategy in (dp.Sandblaster(), dp.Dane()):
        with pytest.raises(ValueError, match="bias_lr=0.01"):
            dp.train(model=factory, loss=dp.models.default_loss("svm"), data=data,
                     strategy=strategy, workers=2, save=False)


# Averaged SGD: the kernel keeps the average sparsely (U + B V); torch sums every iterate densely.
# L2 2.0 at lr 0.1 rescales V every ~70 steps, folding B V into U. "split" equals dense L2 only
# in expectation, so it is compared without L2.
@pytest.mark.parametrize("start", ["three", "pair"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize(("regularization", "l2"),
                         [("scale", 0.0), ("scale", 0.05), ("scale", 2.0), ("split", 0.0)])
@pytest.mark.parametrize("name", ["svm", "logistic"])
def test_averaged_sgd_predicts_with_the_mean_of_the_torch_iterates(name, regularization, l2,
                                                                  batch, start):
    weights, bias = start_weights(start, 40)
    x, y = sparse_problem(rows=240, classes=len(bias))
    kernel = SparseSGD(name, num_features=x.shape[1], num_classes=len(bias), lr=0.1, l2=l2,
                       batch_size=batch, average=37, regularization=regularization)
    kernel.set_weights(weights, bias)
    assert kernel.binary == (start == "pair")
    kernel.fit_epoch(x[:100], y[:100])  # two calls (100 rows: whole batches): the average
    kernel.fit_epoch(x[100:], y[100:])  # carries across them
    want_w, want_b = torch_sgd(name, x, y, weights, bias, lr=0.1, l2=l2, batch=batch, average=37)
    last_w, _ = torch_sgd(name, x, y, weights, bias, lr=0.1, l2=l2, batch=batch)
    got_w, got_b = kernel.coefficients()
    np.testing.assert_allclose(got_w, want_w, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-4, atol=2e-5)
    steps = [start for start in range(0, 240, batch) if min(start + batch, 240) >= 37]
    assert kernel.iterates_averaged == len(steps)
    assert np.abs(want_w - last_w).max() > 1e-3  # the average is not the last iterate
    np.testing.assert_array_equal(kernel.predict(x), (x @ got_w.T + got_b).argmax(axis=1))


def test_averaging_is_refused_by_hogwild_threads_and_checked():
    with pytest.raises(ValueError, match="average"):
        SparseSGD("svm", num_features=3, num_classes=2, average=-1)
    model = SparseSGD("svm", num_features=40, num_classes=3, average=1, regularization="split")
    x, y = sparse_problem()
    with pytest.raises(ValueError, match="cannot average"):
        hogwild_threads(model, x, y, [np.arange(30), np.arange(30, 60)])


def test_split_regularisation_shrinks_only_the_rows_features_and_equals_scale_without_l2():
    x, y = sparse_problem(seed=3)
    split = SparseSGD("svm", num_features=40, num_classes=3, lr=0.1, l2=0.0, regularization="split")
    scale = SparseSGD("svm", num_features=40, num_classes=3, lr=0.1, l2=0.0)
    split.fit_epoch(x, y)
    scale.fit_epoch(x, y)
    np.testing.assert_allclose(split.coefficients()[0], scale.coefficients()[0], rtol=1e-5)
    # With L2, a feature no row holds keeps its weight under "split".
    x = x[:, :30]
    x = scipy.sparse.hstack([x, scipy.sparse.csr_matrix((x.shape[0], 10), dtype=np.float32)],
                            format="csr")
    model = SparseSGD("svm", num_features=40, num_classes=3, lr=0.1, l2=0.1, regularization="split")
    model.set_weights(np.ones((3, 40), np.float32), np.zeros(3, np.float32))
    model.frequencies(x)
    model.fit_epoch(x, y)
    assert (model.weights[30:] == 1.0).all()
    assert (model.weights[:30] != 1.0).any()


def eager_split(x, y, weights, bias, *, loss, lr, l2, batch, feature_scale):
    """The "split" steps written out: each example of a batch shrinks its features' weights by
    lr l2 N / n_u / batch (clipped at 1), then takes its step (the batch's gradients at the same
    weights); no deferral."""
    w, b = weights.astype(np.float64).copy(), bias.astype(np.float64).copy()
    dense = x.toarray().astype(np.float64)
    model = dp.models.build(loss, (x.shape[1],), len(b), **({"l2": 0.0} if loss != "perceptron"
                                                          else {}))
    for start in range(0, len(y), batch):
        rows = range(start, min(start + batch, len(y)))
        grads = []
        for i in rows:
            scores = torch.tensor(dense[i] @ w.T + b, requires_grad=True)
            model.criterion(scores[None], torch.tensor([y[i]])).backward()
            grads.append(scores.grad.numpy())
        for i, g in zip(rows, grads):
            held = dense[i] != 0
            keep = 1.0 - np.minimum(lr * l2 / len(rows) * feature_scale, 1.0)
            w[:, held] *= keep[held]
            w[:, held] -= lr / len(rows) * np.outer(g, dense[i][held])
            b -= lr / len(rows) * g
    return w, b


@pytest.mark.parametrize("start", ["three", "pair"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", ["svm", "logistic"])
def test_split_regularisation_deferred_takes_the_eager_steps(name, batch, start):
    # Examples with a zero gradient leave their shrinking pending (not written); the result is the
    # eager one's, also across calls that share one pending record (a Hogwild! thread's).
    weights, bias = start_weights(start, 40)
    weights *= 8.0  # the start classifies most rows with a margin: many hinge examples are idle
    x, _ = sparse_problem(rows=120, classes=len(bias))
    y = (x @ weights.T + bias).argmax(axis=1)
    y[::5] = (y[::5] + 1) % len(bias)  # and some it gets wrong
    kernel = SparseSGD(name, num_features=40, num_classes=len(bias), lr=0.1, l2=0.5,
                       batch_size=batch, regularization="split")
    kernel.set_weights(weights, bias)
    kernel.frequencies(x)
    pending, state = kernel.pending(), np.array([1.0, 0.0, 0.0])
    kernel.fit_epoch(x, y, np.arange(60), state=state, pending=pending)
    if name == "svm":  # its examples past the margin have no gradient (logistic ones always do)
        assert (pending != 1.0).any()  # some shrinking was left pending
    kernel.fit_epoch(x, y, np.arange(60, 120), state=state, pending=pending)
    kernel.flush(pending)
    want_w, want_b = eager_split(x, y, weights, bias, loss=name, lr=0.1, l2=0.5, batch=batch,
                                 feature_scale=kernel.feature_scale)
    got_w, got_b = kernel.coefficients()
    np.testing.assert_allclose(got_w, want_w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-4, atol=1e-5)
    assert np.abs(got_w - weights).max() > 1e-3


def test_schedules_follow_their_formulas():
    # One example whose hinge is active on every step: b moves by the step's rate each time.
    x = scipy.sparse.csr_matrix(np.zeros((1, 3), np.float32))
    y = np.array([0])
    for schedule, rate in [("constant", lambda t: 0.5),
                           ("invscaling", lambda t: 0.5 / (t + 1) ** 0.5),
                           ("optimal", lambda t: 1 / (1e-2 * (100.0 + t)))]:
        model = SparseSGD("svm", num_features=3, num_classes=2, lr=0.5, schedule=schedule,
                          alpha=1e-2, t0=100.0)
        # Both classes' hinges stay active (not each other's negatives: two vectors are kept).
        model.set_weights(np.zeros((2, 3), np.float32), np.full(2, -50.0, np.float32))
        for _ in range(3):
            model.fit_epoch(x, y)
        assert model.bias[0] == pytest.approx(-50.0 + sum(rate(t) for t in range(3)), rel=1e-6)


@pytest.mark.parametrize("mode", ["hogwild", "lock", "round_robin"])
def test_every_thread_writes_the_shared_weights(mode):
    # Each thread owns one block of features: its rows hold only those, so the block moved only if
    # that thread wrote the shared matrix.
    blocks, per = 3, 10
    rows = []
    for block in range(blocks):
        part = scipy.sparse.random(40, per, density=0.3, format="csr", dtype=np.float32,
                                   random_state=block)
        rows.append(scipy.sparse.hstack([scipy.sparse.csr_matrix((40, block * per), dtype=np.float32),
                                         part, scipy.sparse.csr_matrix(
                                             (40, (blocks - block - 1) * per), dtype=np.float32)]))
    x = scipy.sparse.vstack(rows, format="csr")
    x.sort_indices()
    y = np.random.default_rng(0).integers(0, 2, size=x.shape[0])
    model = SparseSGD("svm", num_features=blocks * per, num_classes=2, lr=0.1, l2=1e-3,
                      regularization="split")
    model.frequencies(x)
    orders = [np.arange(40 * b, 40 * (b + 1)) for b in range(blocks)]
    results = hogwild_threads(model, x, y, orders, mode=mode, chunk=4)
    assert [r["examples"] for r in results] == [40, 40, 40]
    for block in range(blocks):
        assert np.abs(model.weights[block * per : (block + 1) * per]).sum() > 0, block


def test_hogwild_threads_refuse_a_shared_scale():
    x, y = sparse_problem()
    with pytest.raises(ValueError, match="split"):
        hogwild_threads(SparseSGD("svm", num_features=40, num_classes=3), x, y, [np.arange(10)])


def test_threads_run_concurrently_without_the_gil():
    # A kernel call holds no GIL: a Python thread keeps running while two kernels train.
    x, y = sparse_problem(rows=20_000, features=500, density=0.05)
    model = SparseSGD("logistic", num_features=500, num_classes=3, lr=0.01, regularization="split")
    model.fit_epoch(x[:10], y[:10])  # compiled before the measurement
    ticks, done = [0], threading.Event()

    def count():
        while not done.is_set():
            ticks[0] += 1

    counter = threading.Thread(target=count)
    counter.start()
    try:
        hogwild_threads(model, x, y, [np.tile(np.arange(20_000), 5)] * 2)
    finally:
        done.set()
        counter.join()
    assert ticks[0] > 1000


@pytest.mark.parametrize("broken, message", [
    (lambda x: setattr(x, "indices", np.where(x.indices == 0, 99, x.indices)), "outside"),
    (lambda x: x.data.__setitem__(0, np.nan), "NaN"),
    (lambda x: x.indices.__setitem__(slice(0, 2), x.indices[:2][::-1].copy()), "unsorted"),
    (lambda x: x.indptr.__setitem__(1, x.indptr[2] + 1), "indptr"),
])
def test_broken_csr_is_refused_before_any_kernel_runs(broken, message):
    x = scipy.sparse.csr_matrix(np.array([[1.0, 2.0, 0.0], [0.0, 3.0, 4.0], [5.0, 0.0, 6.0]],
                                         dtype=np.float32))
    broken(x)
    model = SparseSGD("svm", num_features=3, num_classes=2)
    before = model.weights.copy()
    with pytest.raises(DataError, match=message):
        model.fit_epoch(x, np.array([0, 1, 0]))
    assert (model.weights == before).all()


def test_check_csr_passes_a_good_matrix_through_and_names_a_wrong_width():
    x, _ = sparse_problem()
    rows = check_csr(x)
    assert rows.indices is x.indices and rows.data is x.data  # read in place, not copied
    tensor = check_csr(torch.sparse_csr_tensor(torch.from_numpy(x.indptr), torch.from_numpy(x.indices),
                                               torch.from_numpy(x.data), x.shape))
    assert np.shares_memory(tensor.data, x.data)
    with pytest.raises(DataError, match="features"):
        check_csr(x, num_features=41)


def test_gathered_rows_are_scipys_rows_in_that_order():
    x, _ = sparse_problem()
    order = np.random.default_rng(3).permutation(x.shape[0])
    rows = gather_rows(check_csr(x), order)
    expected = x[order]
    assert rows.shape == expected.shape
    for mine, theirs in zip(rows[:3], (expected.indptr, expected.indices, expected.data)):
        np.testing.assert_array_equal(mine, theirs)
    assert gather_rows(check_csr(x), np.zeros(0, np.int64)).shape == (0, x.shape[1])
    # torch's int64 indices, compacted to int32: the same rows, and the kernel takes either.
    wide = check_csr(torch.sparse_csr_tensor(torch.from_numpy(x.indptr).long(),
                                             torch.from_numpy(x.indices).long(),
                                             torch.from_numpy(x.data), x.shape))
    narrow = compact(wide)
    assert wide.indices.dtype == np.int64 and narrow.indices.dtype == narrow.indptr.dtype == np.int32
    assert compact(narrow) is narrow
    for mine, theirs in zip(narrow[:3], wide[:3]):
        np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize("bias_lr", [1.0, 0.01])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_the_compiled_batch_gradient_is_autograds(name, bias_lr):
    from downpour.data.rows import csr_from_scipy
    from downpour.flat import FlatParams
    from downpour.models.sparse_sgd import batch_gradient

    x, y = sparse_problem(rows=12, seed=5)
    model = dp.models.build(name, (x.shape[1],), 3, bias_lr=bias_lr,
                            **({} if name == "perceptron" else {"l2": 0.05}))
    with torch.no_grad():
        model.linear.weight.normal_(0, 0.3)
    flat = FlatParams(model)
    batch, labels = csr_from_scipy(x), torch.from_numpy(y)
    flat.zero_grad_()
    want_loss = float(backward(model, dp.models.default_loss(name), batch, labels))
    want = flat.grads.clone()
    flat.zero_grad_()
    got_loss = batch_gradient(name, batch, labels, model.linear.weight, model.linear.bias,
                              getattr(model, "l2", 0.0), bias_lr)
    torch.testing.assert_close(flat.grads, want, rtol=1e-4, atol=1e-6)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    assert want.abs().sum() > 0
