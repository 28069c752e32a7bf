"""Every registered strategy on a streamed dataset: it trains as on the data in memory, or refuses.

The strategies come from the registry: one that declares ``in_memory`` must
refuse a streamed dataset with an error saying what it needs; every other
trains the conformance suite's problem (4 Gaussian clusters, a user's model
with BatchNorm and Dropout) from a user's ``torch.utils.data.Dataset`` to
within its family's margin of ``single`` on the same data in memory.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset as TorchDataset

import downpour as dp
from downpour.strategies import STRATEGIES
from tests.integration.strategies.test_conformance import (
    MARGINS,
    WORKERS,
    UserNet,
    build_data,
    smoothed_loss,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


class Rows(TorchDataset):
    """A user's Dataset over tensors, without a ``targets`` attribute (one pass finds the labels)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


@pytest.fixture(scope="module")
def data() -> dp.data.Dataset:
    return build_data()


def train(name: str, data) -> dp.TrainResult:
    cls = STRATEGIES[name]
    options = {"optimizer": dp.optim("sgd", lr=0.05, momentum=0.5), "epochs": 1, "batch_size": 32}
    if cls.takes_workers:
        options["workers"] = WORKERS
    if cls.uses_servers:
        options["servers"] = 2
    options = {key: value for key, value in options.items() if key not in cls.ignores}
    return dp.train(model=UserNet, loss=smoothed_loss, data=data, strategy=name, save=False,
                    seed=0, **options)


@pytest.fixture(scope="module")
def single(data) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train("single", data).summary["accuracy"]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_trains_from_a_streamed_dataset_or_refuses_it(name, data, single):
    streamed = dp.data.from_torch(Rows(data.x_train, data.y_train), Rows(data.x_test, data.y_test),
                                  name="clusters")
    if STRATEGIES[name].in_memory:
        with pytest.raises(ValueError, match=rf"'{name}' needs the training set in memory"):
            train(name, streamed)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        accuracy = train(name, streamed).summary["accuracy"]
    finally:
        torch.set_num_threads(threads)
    assert accuracy >= single - MARGINS.get(name, 0.0) - 0.01, (name, accuracy, single)
