"""Workers on a CUDA GPU: the collective and parameter-server strategies, an elastic restart, Ray's GPU resources.

Skipped on a machine without one. One GPU is enough: workers share it (gloo
reduces CUDA tensors; NCCL, which wants a GPU per rank, runs a group of one).
"""

from __future__ import annotations

import pytest
import torch

import downpour as dp

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

COMMON = {"model": "mlp", "data": "digits", "batch_size": 16, "save": False, "device": "cuda",
          "optimizer": dp.optim("momentum", lr=0.05)}


@pytest.mark.parametrize("strategy, workers", [
    (dp.Allreduce(), 2),
    (dp.Allreduce(backend="nccl"), 1),
    (dp.LocalSGD(average_every=4), 2),
    (dp.Downpour(), 2),
], ids=["allreduce-gloo", "allreduce-nccl", "local-sgd", "downpour"])
def test_workers_on_the_gpu_train_to_the_cpu_accuracy(strategy, workers):
    result = dp.train(strategy=strategy, workers=workers, epochs=10, **COMMON)
    assert result.summary["accuracy"] >= 0.93


def test_an_allreduce_group_on_the_gpu_re_forms_with_a_restarted_worker():
    # Killed at its step 100 of about 900 (30 passes over a third of digits, 16 a batch).
    result = dp.train(strategy=dp.Allreduce(), workers=3, epochs=30, restart_workers=True,
                      faults=dp.Faults(kill_at_step={1: 100}), **COMMON)
    killed = [e["fault/killed_at_step"] for e in result.history if e.get("fault/killed") == "worker:1"]
    assert killed == [100]
    finals = {(e["rank"], e["worker/incarnation"]): e for e in result.history if e.get("worker/done")}
    assert (1, 1) in finals and any("fault/adopted_from" in e for e in result.history)
    assert len({finals[key]["worker/params_crc32"] for key in ((0, 0), (2, 0), (1, 1))}) == 1
    assert result.summary["accuracy"] >= 0.93


def test_ray_gives_each_worker_its_share_of_the_gpu():
    pytest.importorskip("ray", reason="needs Ray: pip install 'downpour-sgd[ray]'")
    result = dp.train(strategy=dp.Allreduce(), workers=2, epochs=10, cluster=dp.RayCluster(num_gpus=0.5),
                      **COMMON)
    assert result.summary["accuracy"] >= 0.93
    with pytest.raises(ValueError, match="need 4 GPUs on the Ray cluster"):
        dp.train(strategy=dp.Allreduce(), workers=4, epochs=1, cluster=dp.RayCluster(num_gpus=1), **COMMON)
