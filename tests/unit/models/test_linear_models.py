"""Linear models: losses, dense versus sparse CSR input, and training on separable data."""

from __future__ import annotations

import warnings

import pytest
import torch

from downpour.models import backward, build, default_loss
from downpour.models.linear import hinge_loss, multiclass_hinge_loss, perceptron_loss

LINEAR = ("perceptron", "svm", "squared-hinge-svm", "multiclass-svm", "logistic")


def to_csr(x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return x.to_sparse_csr()


def sparse_batch(n: int = 12, d: int = 30, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator)
    x[torch.rand(n, d, generator=generator) < 0.8] = 0.0
    y = torch.randint(0, 4, (n,), generator=generator)
    return x, y


def gradients(model, name, x, y):
    model.zero_grad(set_to_none=True)
    loss = backward(model, default_loss(name), x, y)
    return loss, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", LINEAR)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_csr_input_matches_dense(name, dtype):
    torch.manual_seed(0)
    model = build(name, (30,), 4)
    x, y = sparse_batch()
    x = x.to(dtype)
    torch.testing.assert_close(model(to_csr(x)), model(x))
    dense_loss, dense_grads = gradients(model, name, x, y)
    sparse_loss, sparse_grads = gradients(model, name, to_csr(x), y)
    torch.testing.assert_close(sparse_loss, dense_loss)
    for sparse, dense in zip(sparse_grads, dense_grads):
        assert sparse.layout == torch.strided
        torch.testing.assert_close(sparse, dense)


def test_sparse_gradient_accumulates_in_place_into_a_flat_buffer():
    torch.manual_seed(0)
    model = build("logistic", (30,), 4)
    x, y = sparse_batch()
    buffer = torch.zeros(30 * 4 + 4)
    model.linear.weight.grad = buffer[:120].view(4, 30)
    model.linear.bias.grad = buffer[120:]
    backward(model, default_loss("logistic"), to_csr(x), y)
    assert model.linear.weight.grad.data_ptr() == buffer.data_ptr()
    assert buffer.abs().sum() > 0


def test_dense_input_of_any_shape_is_flattened():
    torch.manual_seed(0)
    model = build("logistic", (2, 3, 5), 4)
    x = torch.randn(6, 2, 3, 5)
    torch.testing.assert_close(model(x), model(x.reshape(6, 30)))


def test_feature_count_mismatch_is_reported():
    model = build("svm", (30,), 4)
    with pytest.raises(
        ValueError, match=r"expects 30 features per example, got a batch of shape \(12, 29\)"
    ):
        model(to_csr(torch.ones(12, 29)))
    with pytest.raises(ValueError, match="expects 30 features"):
        model(torch.ones(12, 31))


def test_perceptron_loss_is_zero_when_right_and_the_margin_when_wrong():
    scores = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    assert perceptron_loss(scores, torch.tensor([0, 0])).item() == pytest.approx((0.0 + 5.0) / 2)


def test_one_vs_rest_hinge_sums_binary_hinges_over_classes():
    scores = torch.tensor([[0.5, -2.0, 0.2]])
    # class 0 (target +1): 1 - 0.5; class 1 (-1): max(0, 1 - 2); class 2 (-1): 1 + 0.2
    assert hinge_loss(scores, torch.tensor([0])).item() == pytest.approx(0.5 + 0.0 + 1.2)


def test_crammer_singer_hinge_uses_the_best_wrong_class():
    scores = torch.tensor([[2.0, 1.5, -1.0], [4.0, 0.0, 1.0]])
    # row 0: 1 + 1.5 - 2.0 = 0.5; row 1: 1 + 1.0 - 4.0 < 0 -> 0
    assert multiclass_hinge_loss(scores, torch.tensor([0, 0])).item() == pytest.approx(0.25)


def separable_set(n: int = 400, d: int = 20, num_classes: int = 4, seed: int = 0):
    """Points labelled by a random linear classifier, keeping only those with a clear margin."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_classes, d, generator=generator)
    x = torch.randn(4 * n, d, generator=generator)
    scores = x @ weight.T
    top2 = scores.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]) > 0.5
    return x[keep][:n], scores[keep][:n].argmax(dim=1)


@pytest.mark.parametrize("name", ["perceptron", "multiclass-svm"])
def test_reaches_99_percent_training_accuracy_on_a_separable_set(name):
    torch.manual_seed(0)
    x, y = separable_set()
    model = build(name, (x.shape[1],), 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        for index in torch.randperm(len(x), generator=generator).split(100):
            optimizer.zero_grad()
            backward(model, default_loss(name), x[index], y[index])
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    assert accuracy >= 0.99
