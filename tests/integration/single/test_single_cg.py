"""The single-process baseline drives optimizers that re-evaluate the loss through a closure."""

import pytest

import downpour as dp


@pytest.mark.timeout(120)
def test_single_trains_with_conjugate_gradients(tmp_path):
    result = dp.train(model="logistic", data="digits", optimizer=dp.optim("cg", beta="hs", max_iter=5),
                      batch_size=256, epochs=2, run_dir=tmp_path / "run")
    assert result.summary["accuracy"] >= 0.85, result.summary
