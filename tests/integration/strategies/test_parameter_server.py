"""Downpour and sync: real processes, real gRPC on loopback."""

import math
import signal
import subprocess
import sys

import pytest
import torch

import downpour as dp
from downpour.errors import WorkerFailed
from downpour.flat import FlatParams
from tests.integration.strategies.conftest import DOWNPOUR_MNIST, DOWNPOUR_MNIST_ADAM_BAND
from tests import events
from tests.processes import alive, child_processes
from tests.waiting import wait_until
from tests.reference import reference_job, reference_sgd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.mark.slow
def test_downpour_4_workers_2_servers_trains_mnist_in_one_epoch(mnist, tmp_path):
    # Adam on the shards copes with the staleness of four replicas (about 2 on average); batch 32
    # gives the one epoch enough steps; the shards' moving average smooths the last steps' noise.
    # Measured: 97.25-97.37% (the parameters themselves: 95.7-96.6%).
    result = dp.train(model="mlp", data=mnist, strategy=dp.Downpour(ema_decay=0.99, evaluate_average=True),
                      optimizer=dp.optim("adam", lr=0.001), workers=4, servers=2, epochs=1, batch_size=32,
                      run_dir=tmp_path / "run")
    s = result.summary
    assert s["accuracy"] >= 0.96, s
    assert s["samples"] <= mnist.num_train + 4 * 32  # one epoch's worth, split among the workers
    assert s["pushes"] > 0 and s["bytes_sent"] > 0 and s["bytes_received"] > 0
    assert s["staleness_max"] is not None
    for key in ("bytes_sent", "bytes_received", "pushes", "pulls", "staleness_mean", "staleness_p95",
                "staleness_max", "dropped_gradients"):
        assert key in s


@pytest.mark.slow
def test_sync_with_3_plus_1_backup_reaches_96_percent(mnist):
    # The shards' moving average of the parameters: 97.0-97.5% in six runs under CPU load
    # (the parameters themselves, one epoch: 96.2-96.8%).
    result = dp.train(model="mlp", data=mnist, strategy=dp.Sync(backup=1, ema_decay=0.95, evaluate_average=True),
                      optimizer=dp.optim("momentum", lr=0.1),
                      workers=4, servers=2, epochs=1, save=False)
    assert result.summary["accuracy"] >= 0.96, result.summary
    assert result.summary["staleness_max"] == 0


def test_sync_without_backups_equals_single_process_large_batch_sgd(digits):
    workers, batch, rounds, lr = 3, 16, 6, 0.5
    result = dp.train(model="logistic", data=digits, strategy=dp.Sync(), optimizer=dp.optim("sgd", lr=lr),
                      workers=workers, servers=2, batch_size=batch, max_steps=rounds, epochs=5, save=False)

    # The same k steps in this process: one SGD step per round on the N x b examples of the round.
    job = reference_job("logistic", digits, dp.optim("sgd", lr=lr), workers=workers,
                        batch_size=batch)
    reference = reference_sgd(job, [range(workers)] * rounds)
    trained = FlatParams(result.model).params
    assert torch.allclose(trained, reference, atol=1e-5), (trained - reference).abs().max()
    assert result.summary["steps"] == rounds * workers


# A straggler 5x slower makes its own pushes stale by about (workers - 1) x 5 = 10 versions while the
# others run; a calm run's staleness stays about 1 (measured: at most 4-5 with 3 workers, once 15 on a
# loaded machine). The shards count staleness for all workers together; a bound refuses the pushes
# staler than it, and each worker reports its own refusals: the bound is the probe of whose pushes
# were stale. Measured at 6, 4 epochs: the straggler 10-11 refusals, every other rank and the calm
# run's rank 1 none.
PROBE = dict(model="logistic", strategy=dp.Downpour(max_staleness=6), optimizer=dp.optim("sgd", lr=0.1),
             workers=3, servers=1, epochs=4, batch_size=16, save=False)


def test_a_slow_worker_makes_its_own_downpour_pushes_stale(digits):
    calm = events.per_rank(dp.train(data=digits, **PROBE).history, "worker/refused")
    slowed = dp.train(data=digits, faults=dp.Faults(slow={1: 5.0}), **PROBE)
    refused = events.per_rank(slowed.history, "worker/refused")
    assert refused[1] > max(calm[1], refused[0], refused[2]), (refused, calm)
    assert slowed.summary["staleness_max"] <= 6  # what was stale was refused, not applied


def test_max_staleness_bounds_every_applied_push(digits):
    # No straggler needed: at a bound of 1, three calm workers make stale pushes enough (measured: 12-24
    # refusals per worker), and the bound must refuse every one (unbounded, the same run reaches 4-15).
    result = dp.train(model="logistic", data=digits, strategy=dp.Downpour(max_staleness=1),
                      optimizer=dp.optim("sgd", lr=0.1), workers=3, servers=2, epochs=2, batch_size=16, save=False)
    assert result.summary["staleness_max"] <= 1
    refused = events.per_rank(result.history, "worker/refused")
    assert sum(refused.values()) > 0, refused  # the bound was reached, and refused rather than applied


def test_sync_with_a_backup_does_not_wait_for_the_slow_worker(digits):
    result = dp.train(model="logistic", data=digits, strategy=dp.Sync(backup=1), optimizer=dp.optim("sgd", lr=0.1),
                      workers=3, servers=1, epochs=2, batch_size=16, faults=dp.Faults(slow={1: 5.0}), save=False)
    done = {e["rank"]: e for e in result.history if e.get("worker/done")}
    # In a calm run every worker takes about as many steps (measured: 78-88 each of the 90) and the
    # late push of each round is anyone's (20-28 dropped each). With the straggler, it is always late:
    # the others went on without it (measured: 10-12 steps of its 90, 9-11 of them dropped, the others
    # 0-1 dropped).
    assert done[1]["worker/steps"] < done[0]["worker/steps"] / 2
    assert done[1]["worker/dropped"] > done[0]["worker/dropped"] + done[2]["worker/dropped"], done
    assert result.summary["dropped_gradients"] >= done[1]["worker/dropped"]


KILLED_AT = 20  # a multiple of the workers' log_every (10): their last report is at the kill step


def test_a_killed_worker_does_not_stop_downpour(digits):
    result = dp.train(model="logistic", data=digits, strategy=dp.Downpour(), optimizer=dp.optim("sgd", lr=0.05),
                      workers=3, servers=2, epochs=2, batch_size=16,
                      faults=dp.Faults(kill_at_step={2: KILLED_AT}), save=False)
    per_worker = 2 * math.ceil(digits.num_train // 3 / 16)
    assert [e["fault/killed_at_step"] for e in result.history if e.get("fault/killed") == "worker:2"] == [KILLED_AT]
    assert any(e.get("fault/died") == "worker:2" for e in result.history)
    # The dead worker's steps stop at the kill; the others take all of theirs, as in a calm run.
    steps = events.per_rank(result.history, "worker/steps")
    assert steps == {0: per_worker, 1: per_worker, 2: KILLED_AT}, steps
    assert result.summary["steps"] == 2 * per_worker + KILLED_AT
    # Measured 2026-12-03: 0.886 and 0.891 (the same run with no fault alike); floors: one worker
    # alone on its third 0.663, 5% of the steps 0.203.
    assert result.summary["accuracy"] >= 0.85


def test_sync_without_enough_workers_fails_naming_the_dead_one(digits):
    with pytest.raises(WorkerFailed, match="worker 1"):
        dp.train(model="logistic", data=digits, strategy=dp.Sync(backup=0), optimizer=dp.optim("sgd", lr=0.1),
                 workers=2, servers=1, epochs=2, batch_size=16, faults=dp.Faults(kill_at_step={1: 10}), save=False)


def _loss_that_fails_in_workers(outputs, labels):
    if torch.is_grad_enabled():
        raise RuntimeError("the worker's loss blew up")
    return torch.nn.functional.cross_entropy(outputs, labels)


def test_a_raising_worker_ends_the_run_with_its_traceback(digits):
    with pytest.raises(WorkerFailed) as info:
        dp.train(model="logistic", data=digits, loss=_loss_that_fails_in_workers, strategy=dp.Downpour(),
                 workers=2, servers=1, save=False)
    assert "the worker's loss blew up" in str(info.value)
    assert "Traceback" in info.value.remote_traceback


def test_sigint_to_the_coordinator_stops_every_role(tmp_path, shared_data):
    command = [sys.executable, "-m", "downpour.cli", "train", "--strategy", "downpour", "--workers", "2",
               "--servers", "2", "--dataset", "mnist", "--data-dir", str(shared_data), "--model", "logistic",
               "--epochs", "5", "--quiet", "--run-dir", str(tmp_path / "run")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def four_roles() -> list[tuple[int, str]] | None:
            found = child_processes(proc.pid)
            return found if len(found) >= 4 else None

        roles = wait_until(four_roles, timeout=120, what="the coordinator's four roles")
        # Training under way (a worker reported steps), so the signal lands mid-run, not at start-up.
        wait_until(lambda: events.per_rank(events.read(tmp_path / "run"), "worker/steps"),
                   timeout=120, what="a worker's first report")
        assert proc.poll() is None, "the run ended before it was interrupted"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        # Every role ends with the coordinator (polled: a process takes a moment to exit).
        wait_until(lambda: not [pid for pid, _ in roles if alive(pid)], timeout=30,
                   what="every role's exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


THRESHOLD = "threshold:tau=0.05,entropy"
# Uncompressed Downpour with momentum on the shards, the raw parameters: 94.85-95.47% over three
# runs (measured 2026-12-03). With Adam, DOWNPOUR_MNIST_ADAM_BAND.
MOMENTUM_BAND = (0.9485, 0.9547)


@pytest.fixture(scope="module")
def compressed_runs(mnist):
    """Downpour on MNIST (MLP, 4 workers, 2 shards, one epoch), uncompressed and compressed, by server optimizer.

    Top-k's error feedback suits momentum on the shards; Strom's threshold suits Adam, which
    normalizes each coordinate's step, so the fixed +-tau (whatever a layer's gradient scale)
    costs nothing there. Each is held to the uncompressed run with its own optimizer. The Adam
    pair evaluates the shards' moving average: the raw parameters of two asynchronous runs differ
    by up to 0.65 pp either way (measured), more than the half point the pair is held to. Each
    compressed run is held to the band of several uncompressed runs, not to its one partner.
    """
    optimizers = {"momentum": dp.optim("momentum", lr=0.02), "adam": dp.optim("adam", lr=0.001)}
    average = {"momentum": {}, "adam": {"ema_decay": 0.99, "evaluate_average": True}}
    runs = {}
    for optimizer, spec in (("momentum", None), ("momentum", "topk:0.005,fp16,entropy"),
                            ("adam", None), ("adam", THRESHOLD)):
        runs[optimizer, spec] = dp.train(data=mnist, strategy=dp.Downpour(compress=spec, **average[optimizer]),
                                         optimizer=optimizers[optimizer], save=False, **DOWNPOUR_MNIST).summary
    return runs


@pytest.mark.slow
def test_topk_pushes_over_100x_fewer_bytes_at_the_same_accuracy(compressed_runs):
    plain, topk = compressed_runs["momentum", None], compressed_runs["momentum", "topk:0.005,fp16,entropy"]
    assert topk["steps"] == plain["steps"]
    # Against float32 pushes: 267-269x measured (2026-12-04), as threshold's below.
    assert topk["compression_ratio"] >= 100 and topk["bytes_sent"] * 100 <= topk["bytes_raw"]
    # Against the baseline's actual pushes, already sparse where that is smaller: how often depends
    # on how many of a batch's ReLUs stay dead, which differs from run to run, so the uncompressed
    # run sent 1.25-3.0 GB over five runs of the same seed (82-197x top-k's 15 MB).
    assert topk["bytes_sent"] * 50 <= plain["bytes_sent"], (topk["bytes_sent"], plain["bytes_sent"])
    # Asynchronous runs on two cores vary by about a point: top-k measured 95.76-96.34% over three
    # runs (2026-12-03), against MOMENTUM_BAND uncompressed. The half-point goal is threshold's
    # (below); top-k is held to 1.5 pp below the band.
    assert topk["accuracy"] >= MOMENTUM_BAND[0] - 0.015, (topk["accuracy"], plain["accuracy"])


@pytest.mark.slow
def test_threshold_pushes_over_100x_fewer_bytes_within_half_a_point(compressed_runs):
    plain, threshold = compressed_runs["adam", None], compressed_runs["adam", THRESHOLD]
    assert threshold["steps"] == plain["steps"]
    # Against float32 pushes (the baseline's own pushes are already sparse where that is smaller).
    assert threshold["compression_ratio"] >= 100 and threshold["bytes_sent"] * 100 <= threshold["bytes_raw"]
    # Measured at tau 0.05, moving averages: 1,701-1,760x, 97.02-97.08% over three runs against
    # DOWNPOUR_MNIST_ADAM_BAND uncompressed (2026-12-03). With momentum on the shards no tau came
    # within 1 pp: a fixed +-tau caps how fast a coordinate moves, and the last layer's gradients
    # are 10-50x the first layer's.
    low = DOWNPOUR_MNIST_ADAM_BAND[0]
    assert threshold["accuracy"] >= low - 0.005, (threshold["accuracy"], plain["accuracy"])
