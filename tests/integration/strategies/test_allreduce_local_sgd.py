"""allreduce and local-sgd: real processes, a real torch.distributed (gloo) group on loopback."""

from functools import partial

import pytest
import torch

import downpour as dp
from downpour.flat import FlatParams
from downpour.strategies.allreduce import Allreduce
from downpour.strategies.collective import ring_allreduce_bytes
from downpour.strategies.local_sgd import Ensemble, LocalSGD, sample_clients
from tests.reference import reference_job, reference_sgd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# Nesterov momentum with a cosine schedule; lr chosen for W = 4 workers of batch 64 (a combined batch of 256).
MNIST_RUN = {"optimizer": dp.optim("nesterov", lr=0.15, schedule="cosine"), "workers": 4, "batch_size": 64,
             "epochs": 1, "save": False}


@pytest.fixture(scope="module")
def allreduce_mnist(mnist):
    return dp.train(model="mlp", data=mnist, strategy=Allreduce(), **MNIST_RUN)


@pytest.fixture(scope="module")
def local_sgd_mnist(mnist):
    return dp.train(model="mlp", data=mnist, strategy=LocalSGD(average_every=8), **MNIST_RUN)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return FlatParams(model).params


@pytest.mark.slow
def test_allreduce_4_workers_reaches_96_percent_in_one_epoch(allreduce_mnist, mnist):
    s = allreduce_mnist.summary
    assert s["accuracy"] >= 0.96, s
    assert s["samples"] <= mnist.num_train + 4 * 64  # one epoch's worth, split among the workers
    steps = -(-mnist.num_train // (4 * 64))  # 235 steps of 4 x 64 examples
    assert s["rounds"] == steps and s["pushes"] == 4 * steps
    # Every step, each worker sends its share of a ring allreduce of the gradient.
    gradient = ring_allreduce_bytes(4 * _flat(allreduce_mnist.model).numel(), 4)
    assert 4 * steps * gradient <= s["bytes_sent"] <= 4 * (steps + 2) * gradient


@pytest.mark.slow
def test_local_sgd_every_8_steps_reaches_96_percent_moving_8_times_fewer_bytes(local_sgd_mnist, allreduce_mnist,
                                                                               mnist):
    s, baseline = local_sgd_mnist.summary, allreduce_mnist.summary
    assert s["accuracy"] >= 0.96, s
    assert s["samples"] <= mnist.num_train
    assert s["rounds"] == 235 // 8  # whole rounds of 8 steps
    assert s["bytes_sent"] * 8 <= baseline["bytes_sent"], (s["bytes_sent"], baseline["bytes_sent"])
    assert s["bytes_received"] * 8 <= baseline["bytes_received"]


def test_allreduce_equals_large_batch_sgd_and_local_sgd_every_step_equals_allreduce(digits):
    workers, batch, steps, lr = 3, 16, 6, 0.1
    optimizer = dp.optim("momentum", lr=lr)
    common = {"model": "mlp", "data": digits, "optimizer": optimizer, "workers": workers, "batch_size": batch,
              "max_steps": steps, "epochs": 5, "save": False}
    allreduce = dp.train(strategy=Allreduce(), **common)
    local = dp.train(strategy=LocalSGD(average_every=1), **common)

    # The same steps in this process: one momentum-SGD step per round on the W x b examples of the round.
    job = reference_job("mlp", digits, optimizer, workers=workers, batch_size=batch)
    reference = reference_sgd(job, [range(workers)] * steps)
    trained = _flat(allreduce.model)
    assert torch.allclose(trained, reference, atol=1e-5), (trained - reference).abs().max()
    averaged = _flat(local.model)
    assert torch.allclose(averaged, trained, atol=1e-5), (averaged - trained).abs().max()
    assert allreduce.summary["rounds"] == local.summary["rounds"] == steps
    assert allreduce.summary["steps"] == local.summary["steps"] == steps * workers


def test_one_shot_averaging_and_the_ensemble_report_their_accuracy(digits):
    common = {"model": "logistic", "data": digits, "optimizer": dp.optim("sgd", lr=0.5), "workers": 3,
              "batch_size": 16, "epochs": 5, "save": False}
    averaged = dp.train(strategy=LocalSGD(average_every=0), **common)
    ensemble = dp.train(strategy=LocalSGD(average_every=0, ensemble=True), **common)

    # Measured 0.914-0.925 over seeds 0-2 (2026-12-04); 5% of the budget 0.727. One worker alone on
    # its third reaches 0.911: that is the method's claim (the average of models trained apart is
    # as good as one of them, and better as shards grow), not a broken run.
    assert averaged.summary["accuracy"] >= 0.90, averaged.summary
    assert averaged.summary["rounds"] == 1  # the models met once, at the end
    model = ensemble.model
    assert isinstance(model, Ensemble) and len(model.members) == 3
    members = [_flat(m) for m in model.members]
    assert not torch.allclose(members[0], members[1])  # trained apart, never averaged
    report = next(e for e in ensemble.history if "eval/ensemble_accuracy" in e)
    assert report["eval/ensemble_accuracy"] == ensemble.summary["accuracy"] >= 0.90
    # Same seed, same shards: the ensemble's average is the one-shot run's model.
    assert torch.allclose(_flat(model.average()), _flat(averaged.model), atol=1e-6)
    assert report["eval/averaged_accuracy"] == pytest.approx(averaged.summary["accuracy"])
    probabilities = model(digits.x_test[:5]).exp()
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(5), atol=1e-5)


def test_local_sgd_averages_compressed_changes(digits):
    common = {"model": "logistic", "data": digits, "optimizer": dp.optim("sgd", lr=0.5), "workers": 3,
              "batch_size": 16, "epochs": 5, "save": False}
    plain = dp.train(strategy=LocalSGD(average_every=4), **common)
    compressed = dp.train(strategy=LocalSGD(average_every=4, compress="topk:0.05,fp16,entropy"), **common)
    p, c = plain.summary, compressed.summary
    assert c["rounds"] == p["rounds"] and c["compression_ratio"] > 20, c
    assert c["bytes_sent"] * 10 < p["bytes_sent"]
    assert c["accuracy"] >= p["accuracy"] - 0.03, (p["accuracy"], c["accuracy"])
    with pytest.raises(ValueError, match="does not combine with clients_per_round"):
        LocalSGD(compress="fp16", clients_per_round=2)


@pytest.mark.parametrize("strategy", [Allreduce(log_every=2), LocalSGD(average_every=2)], ids=["allreduce", "local-sgd"])
def test_workers_stop_together_once_the_target_is_reached(digits, strategy):
    # The target is met within ~100 steps; 300 epochs (13,500 steps, seconds long) leave the
    # coordinator's evaluate-and-stop loop (50 ms polls) time to act even on a loaded machine,
    # where 30 epochs (about a second) could end before the stop reached the workers.
    result = dp.train(model="logistic", data=digits, strategy=strategy, optimizer=dp.optim("sgd", lr=0.5),
                      workers=2, batch_size=16, epochs=300, eval_every=4, target_accuracy=0.85, save=False)
    done = [e for e in result.history if e.get("worker/done")]
    assert len(done) == 2 and done[0]["worker/steps"] == done[1]["worker/steps"]  # none left in a collective
    assert done[0]["worker/steps"] < 300 * -(-digits.num_train // 32) / 2
    assert result.summary["best_accuracy"] >= 0.85


@pytest.mark.slow
@pytest.mark.timeout(600)  # 10 worker processes: 100 s on 2 idle cores, nearer 200 s on busy ones
def test_federated_averaging_on_dirichlet_shards_reaches_95_percent(mnist):
    # 10 clients on Dir(0.1) label skew, 5 sampled per round, 10 local steps each: 150 rounds
    # (8 epochs' worth of samples) with plain SGD on a cosine schedule.
    workers, per_round, every = 10, 5, 10
    strategy = LocalSGD(average_every=every, clients_per_round=per_round, partition="dirichlet", alpha=0.1)
    model = partial(dp.models.build, "mlp", mnist.input_shape, mnist.num_classes, hidden=(256,))
    result = dp.train(model=model, data=mnist, strategy=strategy, optimizer=dp.optim("sgd", lr=0.2, schedule="cosine"),
                      workers=workers, batch_size=64, epochs=8, save=False)
    s = result.summary
    assert s["accuracy"] >= 0.95, s
    rounds = s["rounds"]
    assert rounds == 150
    done = {e["rank"]: e["worker/steps"] for e in result.history if e.get("worker/done")}
    # Exactly the sampled clients trained: k steps each in every round they were drawn for.
    expected = {r: every * sum(r in sample_clients(0, i, workers, per_round) for i in range(rounds))
                for r in range(workers)}
    assert done == expected
    assert sum(done.values()) == rounds * per_round * every


def test_bad_configurations_fail_before_any_process_starts(digits, monkeypatch):
    def no_cluster(*args, **kwargs):
        raise AssertionError("a process was about to start")

    monkeypatch.setattr("downpour.run.coordinator.open_cluster", no_cluster)
    with pytest.raises(ValueError, match=r"average_every must be in \[0, inf\], got -1"):
        LocalSGD(average_every=-1)
    with pytest.raises(ValueError, match="clients_per_round must be in .*workers=3.*got 4"):
        dp.train(model="logistic", data=digits, strategy=LocalSGD(clients_per_round=4), workers=3, save=False)
    with pytest.raises(ValueError, match="ensemble .* needs average_every=0"):
        LocalSGD(average_every=4, ensemble=True)
    with pytest.raises(ValueError, match="alpha"):
        LocalSGD(partition="dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="unknown partition"):
        LocalSGD(partition="by-writer")
    with pytest.raises(ValueError, match="nccl"):
        dp.train(model="logistic", data=digits, strategy=Allreduce(backend="nccl"), workers=2, save=False)
    with pytest.raises(ValueError, match="re-evaluates the loss"):
        dp.train(model="logistic", data=digits, strategy=Allreduce(), optimizer=dp.optim("cg"), workers=2,
                 save=False)
