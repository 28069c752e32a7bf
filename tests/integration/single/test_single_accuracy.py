"""The single-process baseline reaches the accuracies every strategy is measured against."""

import json

import pytest

import downpour as dp
from downpour.cli import main
from downpour.models import FunctionModel
from downpour.models.function import logistic_regression_functions

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def test_cli_mlp_reaches_97_percent_in_one_epoch(shared_data, tmp_path, capsys):
    run_dir = tmp_path / "mlp"
    code = main(["train", "--strategy", "single", "--dataset", "mnist", "--data-dir", str(shared_data),
                 "--model", "mlp", "--epochs", "1", "--optimizer", "momentum", "--lr", "0.05",
                 "--schedule", "cosine", "--run-dir", str(run_dir), "--quiet"])
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["accuracy"] >= 0.97, summary
    assert summary["samples"] == 60_000 and summary["steps"] == 938


def test_cnn_reaches_98_5_percent_in_one_epoch(mnist):
    result = dp.train(model="cnn", data=mnist, optimizer=dp.optim("momentum", lr=0.05, schedule="cosine"),
                      epochs=1, save=False)
    assert result.summary["accuracy"] >= 0.985, result.summary


@pytest.mark.parametrize("model", ["logistic", "svm"])
def test_linear_models_reach_91_percent(mnist, model):
    result = dp.train(model=model, data=mnist, optimizer=dp.optim("momentum", lr=0.01, schedule="cosine"),
                      epochs=1, save=False)
    assert result.summary["accuracy"] >= 0.91, result.summary


@pytest.mark.parametrize("model", ["multiclass-svm", "perceptron"])
def test_margin_models_separate_a_separable_set(model):
    data = dp.data.load("synthetic", n=6000, d=20, classes=4, separable=True, seed=1)
    result = dp.train(model=model, data=data, optimizer=dp.optim("sgd", lr=0.1), epochs=5, save=False)
    assert result.summary["accuracy"] >= 0.99, result.summary


def test_function_model_matches_the_torch_model(mnist):
    optimizer = dp.optim("momentum", lr=0.01, schedule="cosine")
    torch_result = dp.train(model="logistic", data=mnist, optimizer=optimizer, epochs=1, save=False)
    d = 1
    for size in mnist.input_shape:
        d *= size
    init, predict, gradient = logistic_regression_functions(d, mnist.num_classes)
    numpy_result = dp.train(model=lambda: FunctionModel(init, predict, gradient), data=mnist, optimizer=optimizer,
                            epochs=1, save=False)
    assert abs(numpy_result.summary["accuracy"] - torch_result.summary["accuracy"]) <= 0.005
    assert numpy_result.summary["accuracy"] >= 0.9
