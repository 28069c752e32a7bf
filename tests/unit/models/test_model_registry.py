"""Conformance of every registered model, and the registry's error messages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from downpour.models import MODELS, backward, build, default_loss
from downpour.models.linear import hinge_loss

NUM_CLASSES = 5


def example_shape(name: str) -> tuple[int, ...]:
    return (3, 32, 32) if name == "resnet" else (1, 28, 28)


def batch(name: str, n: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *example_shape(name), generator=generator)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    return x, y


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_outputs_one_score_per_class(name):
    model = build(name, example_shape(name), NUM_CLASSES)
    x, _ = batch(name)
    assert model(x).shape == (len(x), NUM_CLASSES)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_backward_gives_finite_float32_gradients_for_every_parameter(name):
    torch.manual_seed(0)
    model = build(name, example_shape(name), NUM_CLASSES)
    x, y = batch(name)
    loss = backward(model, default_loss(name), x, y)
    assert loss.shape == () and not loss.requires_grad and torch.isfinite(loss)
    for parameter in model.parameters():
        assert parameter.dtype == torch.float32
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_backward_accumulates_into_existing_gradient_views(name):
    torch.manual_seed(0)
    model = build(name, example_shape(name), NUM_CLASSES).eval()  # eval: no dropout noise
    x, y = batch(name)
    backward(model, default_loss(name), x, y)
    reference = [p.grad.clone() for p in model.parameters()]
    # Gradients as views into one flat buffer holding ones, as downpour.flat sets them up.
    buffer = torch.ones(sum(p.numel() for p in model.parameters()))
    views = list(torch.split(buffer, [p.numel() for p in model.parameters()]))
    for parameter, view in zip(model.parameters(), views):
        parameter.grad = view.view_as(parameter)
    backward(model, default_loss(name), x, y)
    for parameter, view, expected in zip(model.parameters(), views, reference):
        assert parameter.grad.data_ptr() == view.data_ptr(), "grad was rebound, not accumulated"
        torch.testing.assert_close(parameter.grad, 1 + expected)


def test_default_losses():
    assert default_loss("perceptron").__name__ == "perceptron_loss"
    assert default_loss("svm") is hinge_loss
    assert default_loss("multiclass-svm").__name__ == "multiclass_hinge_loss"
    for name in ("logistic", "mlp", "cnn", "resnet"):
        assert default_loss(name) is F.cross_entropy


def test_backward_adds_the_svm_regularization_to_the_loss():
    torch.manual_seed(0)
    model = build("svm", (7,), 3, l2=0.5)
    x, y = torch.randn(4, 7), torch.tensor([0, 1, 2, 0])
    expected = hinge_loss(model(x), y) + 0.25 * model.linear.weight.pow(2).sum()
    torch.testing.assert_close(backward(model, hinge_loss, x, y), expected.detach())


def test_parameters_are_float32_even_with_a_float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = build("mlp", (4,), 3, hidden=(8,))
    finally:
        torch.set_default_dtype(previous)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_options_reach_the_model():
    mlp = build("mlp", (1, 28, 28), 10, hidden=(32, 16))
    assert [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [32, 16, 10]
    resnet8 = build("resnet", (3, 32, 32), 10, depth=8)
    resnet20 = build("resnet", (3, 32, 32), 10)
    assert sum(p.numel() for p in resnet8.parameters()) < sum(
        p.numel() for p in resnet20.parameters()
    )


def test_cnn_accepts_flat_and_two_dimensional_images():
    model = build("cnn", (28, 28), 10)
    assert model(torch.zeros(2, 784)).shape == (2, 10)


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown model 'lenet'; choose one of: cnn, .*resnet"):
        build("lenet", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="unknown model 'lenet'"):
        default_loss("lenet")


def test_unknown_option_names_it_and_the_accepted_ones():
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) 'hiden' for model 'mlp'; it accepts: .*hidden"
    ):
        build("mlp", (1, 28, 28), 10, hiden=(64,))


@pytest.mark.parametrize(
    ("name", "shape", "options", "message"),
    [
        ("mlp", (0, 28), {}, "input_shape must be positive"),
        ("cnn", (1, 2, 28, 28), {}, r"input_shape \(H, W\) or \(C, H, W\)"),
        ("resnet", (3, 32, 32), {"depth": 9}, "depth must be 6n . 2"),
        ("mlp", (4,), {"hidden": (16, 0)}, "hidden must be positive"),
        ("svm", (4,), {"l2": -1.0}, "l2 must be in"),
    ],
)
def test_bad_values_are_rejected_with_what_is_wrong(name, shape, options, message):
    with pytest.raises(ValueError, match=message):
        build(name, shape, 10, **options)


def test_num_classes_must_be_at_least_two():
    with pytest.raises(ValueError, match="num_classes must be in"):
        build("logistic", (4,), 1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameters_are_the_whole_model_state(name):
    # Strategies exchange only the flat parameter vector, so no default model may
    # keep state outside it (batch-norm running statistics would be lost).
    model = build(name, example_shape(name), NUM_CLASSES)
    assert list(model.buffers()) == []


def test_resnet_batch_norm_option():
    model = build("resnet", (3, 32, 32), 10, depth=8, norm="batch")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with pytest.raises(ValueError, match=r"unknown norm 'layer'; choose one of: batch, group"):
        build("resnet", (3, 32, 32), 10, norm="layer")
