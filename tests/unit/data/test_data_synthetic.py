"""Seeded synthetic problems: determinism, shapes, separability, sparsity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Perceptron
from sklearn.svm import LinearSVC

from downpour.data import DATASETS, load


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.to_dense().numpy() if x.layout == torch.sparse_csr else x.numpy()


def test_same_seed_same_data_other_seed_other_data():
    a = load("synthetic", n=500, d=7, classes=3, seed=4)
    b = load("synthetic", n=500, d=7, classes=3, seed=4)
    c = load("synthetic", n=500, d=7, classes=3, seed=5)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)


def test_defaults():
    data = load("synthetic")
    assert data.num_train == 8000 and len(data.y_test) == 2000
    assert data.input_shape == (20,) and data.num_classes == 2 and not data.sparse
    assert data.x_train.dtype == torch.float32
    counts = torch.bincount(data.y_train).tolist()
    assert min(counts) > 0.4 * data.num_train  # the orthonormal teacher gives balanced classes


@pytest.mark.parametrize("classes", [2, 5])
@pytest.mark.parametrize("sparse", [False, True])
def test_separable_is_learned_by_perceptron_and_svm(classes, sparse):
    data = load(
        "synthetic",
        n=3000,
        d=50,
        classes=classes,
        sparse=sparse,
        density=0.2,
        separable=True,
        seed=0,
    )
    assert data.sparse == sparse
    x, y = _numpy(data.x_train), data.y_train.numpy()
    xt, yt = _numpy(data.x_test), data.y_test.numpy()
    svm = LinearSVC(C=100.0, max_iter=20000).fit(x, y)
    assert svm.score(x, y) >= 0.99 and svm.score(xt, yt) >= 0.95
    if classes == 2:
        perceptron = Perceptron(max_iter=200, tol=None, random_state=0).fit(x, y)
        assert perceptron.score(x, y) >= 0.99


def test_noise_caps_linear_accuracy():
    clean = load("synthetic", n=4000, d=10, noise=0.0, seed=2)
    noisy = load("synthetic", n=4000, d=10, noise=0.3, seed=2)
    score = {}
    for name, data in (("clean", clean), ("noisy", noisy)):
        model = LinearSVC().fit(data.x_train.numpy(), data.y_train.numpy())
        score[name] = model.score(data.x_test.numpy(), data.y_test.numpy())
    assert score["clean"] > 0.95
    assert 0.6 < score["noisy"] < 0.8  # Bayes accuracy is 1 - noise


def test_sparse_density():
    data = load("synthetic", n=2000, d=1000, sparse=True, density=0.01, seed=0)
    assert data.x_train.layout == torch.sparse_csr and data.input_shape == (1000,)
    nnz_per_row = data.x_train.values().numel() / data.num_train
    assert 8 < nnz_per_row < 12


def test_bad_arguments():
    with pytest.raises(ValueError, match="noise"):
        load("synthetic", noise=1.0)
    with pytest.raises(ValueError, match="classes"):
        load("synthetic", classes=1)
    with pytest.raises(ValueError, match="density"):
        load("synthetic", sparse=True, density=0.0)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown dataset 'mnsit'; choose one of: .*mnist"):
        load("mnsit")
    with pytest.raises(TypeError, match="takes no option 'bogus'.*n, d, classes"):
        load("synthetic", bogus=1)
    assert set(DATASETS) == {
        "mnist",
        "fashion-mnist",
        "cifar10",
        "svmlight",
        "w8a",
        "digits",
        "imagefolder",
        "synthetic",
        "rcv1-like",
    }


def test_the_rcv1_shaped_set_has_rcv1s_shape_and_is_seeded():
    data = load("rcv1-like", n_train=3000, n_test=600, features=5000, seed=4)
    assert data.sparse and data.input_shape == (5000,) and data.num_classes == 2
    assert (data.num_train, len(data.y_test)) == (3000, 600)
    per_row = data.x_train.crow_indices().diff().float()
    assert 65 <= float(per_row.mean()) <= 85  # RCV1: about 76 words a document
    norms = torch.zeros(3000).index_add_(0, torch.repeat_interleave(per_row.long()),
                                         data.x_train.values() ** 2)
    assert torch.allclose(norms, torch.ones(3000), atol=1e-4)  # tf-idf rows of unit length
    assert abs(float(data.y_train.float().mean()) - 0.5) < 0.05
    again = load("rcv1-like", n_train=3000, n_test=600, features=5000, seed=4)
    assert torch.equal(again.x_train.values(), data.x_train.values())
    with pytest.raises(ValueError, match="noise"):
        load("rcv1-like", n_train=10, n_test=10, noise=0.7)
