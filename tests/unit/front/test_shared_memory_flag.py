"""--no-shared-memory: from the flag, through the run's config, to the shards that offer it."""

from functools import partial

import pytest
import torch.nn.functional as F

import downpour as dp
from downpour import models
from downpour.cli import main
from downpour.run import RunConfig


def test_the_flag_turns_shared_memory_off(trained):
    assert main(["train", "--no-shared-memory", "--quiet"]) == 0
    assert main(["train", "--quiet"]) == 0
    assert [call["config"].cluster.shared_memory for call in trained] == [False, True]


@pytest.mark.parametrize("shared_memory", [False, True])
def test_the_job_carries_the_setting_to_the_plan(shared_memory):
    data = dp.data.load("digits")
    config = RunConfig.of(strategy=dp.Downpour(), workers=2, servers=2, dataset="digits",
                          model="logistic", shared_memory=shared_memory)
    model = partial(models.build, "logistic", data.input_shape, data.num_outputs)
    assert config.job(model=model, loss=F.cross_entropy, data=data).shared_memory is shared_memory
    # Whether the shards then offer it is what the wire-bytes integration test measures.
