"""Function models: equivalence with the torch "logistic" model, and validation of user functions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from downpour.models import FunctionModel, backward, build, default_loss
from downpour.models.function import logistic_regression_functions

D, K = 12, 3


def data(n: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=generator)
    x[torch.rand(n, D, generator=generator) < 0.5] = 0.0
    return x, torch.randint(0, K, (n,), generator=generator)


def to_csr(x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return x.to_sparse_csr()


def twin_models():
    """The torch logistic model and a FunctionModel of the NumPy functions, on the same parameters."""
    torch.manual_seed(0)
    reference = build("logistic", (D,), K)
    flat = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    _, predict, gradient = logistic_regression_functions(D, K)
    return reference, FunctionModel(flat.numpy(), predict, gradient)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_numpy_logistic_regression_matches_the_torch_model(sparse):
    reference, function_model = twin_models()
    x, y = data()
    x = to_csr(x) if sparse else x
    torch.testing.assert_close(function_model(x), reference(x))
    reference_loss = backward(reference, F.cross_entropy, x, y)
    loss = backward(function_model, F.cross_entropy, x, y)
    torch.testing.assert_close(loss, reference_loss)
    expected = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
    torch.testing.assert_close(function_model.params.grad, expected)


def test_gradient_is_added_in_place_into_an_existing_view():
    _, model = twin_models()
    buffer = torch.ones(model.params.numel() + 5)
    model.params.grad = buffer[5:]
    x, y = data()
    backward(model, F.cross_entropy, x, y)
    first = buffer[5:].clone()
    backward(model, F.cross_entropy, x, y)
    assert model.params.grad.data_ptr() == buffer[5:].data_ptr()
    torch.testing.assert_close(buffer[5:] - 1, 2 * (first - 1))
    assert torch.all(buffer[:5] == 1)


def test_init_function_is_seeded_and_params_are_one_flat_float32_parameter():
    init, predict, gradient = logistic_regression_functions(D, K)
    a, b = (
        FunctionModel(init, predict, gradient, seed=3),
        FunctionModel(init, predict, gradient, seed=3),
    )
    assert [name for name, _ in a.named_parameters()] == ["params"]
    assert a.params.dtype == torch.float32 and a.params.shape == (K * D + K,)
    torch.testing.assert_close(a.params, b.params)
    assert not torch.equal(a.params, FunctionModel(init, predict, gradient, seed=4).params)


def test_user_loss_function_is_used_when_given():
    init, predict, gradient = logistic_regression_functions(D, K)
    model = FunctionModel(init, predict, gradient, loss=lambda params, x, y: 42.0)
    x, y = data()
    assert backward(model, F.cross_entropy, x, y).item() == 42.0


def test_functions_get_read_only_parameters():
    init, predict, _ = logistic_regression_functions(D, K)

    def meddling_gradient(params, x, y):
        params[0] = 1.0
        return np.zeros_like(params)

    model = FunctionModel(init, predict, meddling_gradient)
    with pytest.raises(ValueError, match="read-only"):
        backward(model, F.cross_entropy, *data())


def test_sgd_on_a_function_model_lowers_the_loss():
    init, predict, gradient = logistic_regression_functions(D, K)
    model = FunctionModel(init, predict, gradient)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, _ = data(n=64)
    y = (x @ torch.randn(D, K, generator=torch.Generator().manual_seed(1))).argmax(dim=1)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        losses.append(backward(model, default_loss("logistic"), x, y).item())
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0]


def test_wrong_gradient_shape_names_expected_and_got():
    init, predict, gradient = logistic_regression_functions(D, K)
    model = FunctionModel(init, predict, lambda p, x, y: gradient(p, x, y)[:-1])
    with pytest.raises(
        ValueError, match=r"gradient must return an array of shape \(39,\), got \(38,\)"
    ):
        backward(model, F.cross_entropy, *data())


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradient_is_rejected(bad):
    init, predict, gradient = logistic_regression_functions(D, K)

    def broken(params, x, y):
        grad = gradient(params, x, y)
        grad[3] = bad
        return grad

    model = FunctionModel(init, predict, broken)
    with pytest.raises(ValueError, match="gradient returned 1 NaN or infinite value"):
        backward(model, F.cross_entropy, *data())
    assert model.params.grad is None or torch.all(model.params.grad == 0)


def test_wrong_prediction_rows_are_rejected():
    init, _, gradient = logistic_regression_functions(D, K)
    model = FunctionModel(init, lambda params, x: np.zeros((3, K)), gradient)
    with pytest.raises(ValueError, match=r"expected shape \(16, \.\.\.\), got \(3, 3\)"):
        model(data()[0])


@pytest.mark.parametrize(
    ("init", "message"),
    [
        (np.zeros((3, 4)), r"1-D numeric array of parameters, got float64 array of shape \(3, 4\)"),
        (np.zeros(0), "non-empty"),
        (np.array([0.0, np.nan]), "init returned 1 NaN"),
    ],
)
def test_bad_initial_parameters_are_rejected(init, message):
    _, predict, gradient = logistic_regression_functions(D, K)
    with pytest.raises(ValueError, match=message):
        FunctionModel(init, predict, gradient)


def test_functions_must_be_callable():
    init, predict, _ = logistic_regression_functions(D, K)
    with pytest.raises(TypeError, match="gradient must be a function, got ndarray"):
        FunctionModel(init, predict, np.zeros(3))
