"""Fault tolerance with real processes: a killed shard comes back, a killed worker rejoins, a stopped run resumes."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import downpour as dp
from downpour.checkpoint import load_run_state, load_shard
from tests.integration.strategies.conftest import (
    DOWNPOUR_MNIST,
    DOWNPOUR_MNIST_ADAM_BAND,
    DOWNPOUR_MNIST_FLAGS,
)
from tests.processes import alive, child_processes
from tests.waiting import wait_until
from tests import events

pytestmark = pytest.mark.integration

CHECKPOINT_EVERY = 100  # versions
# Shard 1 dies halfway through the run (1,875 versions), between two checkpoints.
KILLED_AT_VERSION = 9 * CHECKPOINT_EVERY + CHECKPOINT_EVERY // 2
# Downpour's recipe with the shards' moving average evaluated: the raw parameters' final accuracy varies
# by about a point between runs on two cores (one CI run's undisturbed baseline came out at 95.47%); the
# average's stays in DOWNPOUR_MNIST_ADAM_BAND, steady enough to hold a run to half a point of it.
LOW, HIGH = DOWNPOUR_MNIST_ADAM_BAND
FLAGS = [*DOWNPOUR_MNIST_FLAGS, "--downpour.ema-decay", "0.99", "--downpour.evaluate-average"]


@pytest.fixture(scope="module")
def baseline(mnist):
    """The undisturbed run: faulty and resumed runs are held to its steps, samples, lost updates."""
    return dp.train(data=mnist, strategy=dp.Downpour(ema_decay=0.99, evaluate_average=True),
                    optimizer=dp.optim("adam", lr=0.001), save=False, **DOWNPOUR_MNIST).summary


def _train(args: list[str], shared_data: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "downpour.cli", "train", "--data-dir", str(shared_data), "--quiet", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _watch(proc: subprocess.Popen, timeout: float, until=None) -> set[int]:
    """Wait for ``proc`` (or for ``until()``), noting every role process it ever had; kill it on timeout."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not (until is not None and until()):
        seen.update(pid for pid, _ in child_processes(proc.pid))
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run did not finish within {timeout:g} s: {proc.communicate()}")
        time.sleep(0.2)
    return seen


def _assert_no_process_left(roles: set[int]) -> None:
    assert roles
    # Polled: a role takes a moment to exit after its coordinator; one that never does fails here.
    wait_until(lambda: not [pid for pid in roles if alive(pid)], timeout=30, what="every role's exit")


@pytest.mark.slow
def test_a_killed_shard_restarts_from_its_checkpoint_and_the_run_completes(
        shared_data, tmp_path, baseline):
    run_dir = tmp_path / "killed"
    proc = _train([*FLAGS, "--dataset", "mnist", "--kill-server", f"1@version={KILLED_AT_VERSION}",
                   "--checkpoint-every", str(CHECKPOINT_EVERY), "--run-dir", str(run_dir)], shared_data)
    try:
        roles = _watch(proc, timeout=240)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _assert_no_process_left(roles)
    summary = json.loads((run_dir / "summary.json").read_text())
    log = events.read(run_dir)
    [restart] = [e for e in log if e.get("fault/restarted") == "server:1"]
    [killed] = [e for e in log if e.get("fault/killed") == "server:1"]
    assert killed["fault/killed_at_version"] == KILLED_AT_VERSION
    assert summary["restarts"] == 1
    # It came back from its last checkpoint written whole (900, or an earlier one had that write,
    # fsynced by a thread of its own, not finished), and lost exactly the updates since it: a
    # calm run loses none.
    restored = restart["fault/restored_version"]
    assert restored % CHECKPOINT_EVERY == 0 and 0 < restored < KILLED_AT_VERSION
    assert summary["lost_updates"] == restart["fault/lost_updates"] == KILLED_AT_VERSION - restored
    assert baseline["lost_updates"] == 0 and baseline["restarts"] == 0
    # Workers reconnected to the shard's new address and trained on: every step was taken.
    assert summary["steps"] == baseline["steps"]
    assert any(e.get("comm/reconnections", 0) > 0 for e in log)
    assert summary["accuracy"] >= LOW - 0.005, (summary["accuracy"], baseline["accuracy"])


@pytest.mark.slow
def test_a_run_stopped_with_sigint_resumes_to_the_same_steps_and_accuracy(
        shared_data, tmp_path, baseline):
    run_dir = tmp_path / "stopped"
    halfway = baseline["steps"] // 2
    proc = _train([*FLAGS, "--dataset", "mnist", "--checkpoint-every", str(CHECKPOINT_EVERY),
                   "--run-dir", str(run_dir)],
                  shared_data)
    try:
        def past_halfway() -> bool:
            return sum(events.per_rank(events.read(run_dir), "worker/steps").values()) >= halfway

        roles = _watch(proc, timeout=240, until=past_halfway)
        assert proc.poll() is None, "the run ended before it was interrupted"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _assert_no_process_left(roles)
    state = load_run_state(run_dir / "checkpoints")
    assert not state["finished"] and halfway <= sum(state["steps"].values()) < baseline["steps"]
    # The shards checkpointed as they stopped: nothing the workers pushed is lost.
    versions = [load_shard(run_dir / "checkpoints" / f"shard-{s}.safetensors")["version"] for s in (0, 1)]
    assert versions == [sum(state["steps"].values())] * 2

    resumed = _train(["--resume", str(run_dir)], shared_data)
    try:
        out, err = resumed.communicate(timeout=240)
        assert resumed.returncode == 0, err[-3000:]
    finally:
        if resumed.poll() is None:
            resumed.kill()
            resumed.wait()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == baseline["steps"]
    assert summary["samples"] == baseline["samples"]
    assert LOW - 0.005 <= summary["accuracy"] <= HIGH + 0.005, (
        summary["accuracy"], baseline["accuracy"])
    assert load_run_state(run_dir / "checkpoints")["finished"]
    # The resumed part's events follow the first part's in the same log.
    starts_and_ends = [e.get("event") for e in events.read(run_dir)
                       if e.get("event") in ("start", "end")]
    assert starts_and_ends == ["start", "start", "end"]


KILLED_AT = 30  # a multiple of the workers' log_every (10): a worker's last report is at the kill step


def test_a_restarted_worker_rejoins_and_its_pushes_are_applied(digits):
    result = dp.train(model="logistic", data=digits, strategy=dp.Downpour(), optimizer=dp.optim("sgd", lr=0.1),
                      workers=2, servers=2, epochs=3, batch_size=16, save=False, restart_workers=True,
                      faults=dp.Faults(kill_at_step={1: KILLED_AT}))
    events = result.history
    assert [e["fault/killed_at_step"] for e in events if e.get("fault/killed") == "worker:1"] == [KILLED_AT]
    assert any(e.get("fault/died") == "worker:1" for e in events)
    assert any(e.get("fault/restarted") == "worker:1" for e in events)

    def lives(rank: int, incarnation: int) -> list[dict]:
        return [e for e in events if e.get("role") == "worker" and e.get("rank") == rank
                and e.get("worker/incarnation") == incarnation]

    reborn = lives(1, 1)
    assert reborn, "the restarted worker reported nothing"
    # Its first life ended at the kill step; the second went on from there (its predecessor's last
    # report), pushed, and nothing it pushed was dropped. A calm run has one life per worker.
    assert max(e["worker/steps"] for e in lives(1, 0)) == KILLED_AT
    assert min(e["worker/steps"] for e in reborn) >= KILLED_AT
    last = reborn[-1]
    assert last["worker/done"] and last["worker/steps"] > KILLED_AT and last["comm/pushes"] > 0
    assert last["worker/dropped"] == 0
    assert not lives(0, 1), "the worker that was not killed was restarted"
    # Both workers took all their steps (three passes over their half of the data), the reborn one included.
    per_worker = 3 * math.ceil(digits.num_train // 2 / 16)
    assert last["worker/steps"] == per_worker and result.summary["steps"] == 2 * per_worker
    # Measured 0.91; floor: one worker alone on its half for the same three passes, 0.85 (lr 0.05).
    assert result.summary["accuracy"] >= 0.885


def test_resuming_a_finished_run_is_refused_and_checkpoints_are_kept_readable(digits, tmp_path):
    run_dir = tmp_path / "done"
    dp.train(model="logistic", data=digits, strategy=dp.Downpour(), workers=2, servers=2, epochs=2,
             batch_size=16, run_dir=run_dir, checkpoint_every=10)
    state = load_run_state(run_dir / "checkpoints")
    shard = load_shard(run_dir / "checkpoints" / "shard-1.safetensors")
    assert state["finished"] and shard["version"] == sum(state["steps"].values())
    with pytest.raises(ValueError, match="already finished"):
        dp.train(model="logistic", data=digits, strategy=dp.Downpour(), workers=2, servers=2, epochs=2,
                 batch_size=16, run_dir=run_dir, resume=True)


def test_checkpoints_are_refused_where_workers_hold_the_state(digits):
    with pytest.raises(ValueError, match="parameter-server strategies"):
        dp.train(model="logistic", data=digits, strategy="allreduce", workers=2, save=False, checkpoint_every=10)


SYNC_KILLED_AT_VERSION = 50  # between two checkpoints (every 20 versions)


def test_sync_rounds_go_on_from_the_checkpointed_version_of_a_restarted_shard(mnist):
    result = dp.train(model="logistic", data=mnist, strategy=dp.Sync(backup=1), optimizer=dp.optim("sgd", lr=0.1),
                      workers=3, servers=2, epochs=0.5, batch_size=32, save=False,
                      checkpoint_every=20,
                      faults=dp.Faults(kill_server_at_version={1: SYNC_KILLED_AT_VERSION}))
    [killed] = [e for e in result.history if e.get("fault/killed") == "server:1"]
    [restart] = [e for e in result.history if e.get("fault/restarted") == "server:1"]
    assert killed["fault/killed_at_version"] == SYNC_KILLED_AT_VERSION
    # It came back from a checkpoint before the kill (40, or 20 where 40's write had not finished)
    # and lost exactly the rounds since it, which a calm run never loses.
    restored = restart["fault/restored_version"]
    assert restored % 20 == 0 and 0 < restored < SYNC_KILLED_AT_VERSION, restart
    lost = SYNC_KILLED_AT_VERSION - restored
    assert restart["fault/lost_updates"] == result.summary["lost_updates"] == lost, restart
    # Shard 1 redid the rounds it lost and the run reached its last round on every shard.
    # Measured 2026-12-03/04: 0.913, 0.907 and 0.8895 (the same run with no fault 0.908; which
    # worker the backup leaves out varies); floor: 5% of the rounds 0.853.
    assert result.summary["restarts"] == 1 and result.summary["accuracy"] >= 0.875


def test_an_allreduce_worker_death_ends_the_run_naming_it(digits):
    """Allreduce cannot go on short of a member (its group is fixed): a clear error, not a hang."""
    with pytest.raises(dp.errors.WorkerFailed, match="worker 1"):
        dp.train(model="logistic", data=digits, strategy="allreduce", workers=2, epochs=2, batch_size=16,
                 save=False, faults=dp.Faults(kill_at_step={1: 10}))


@pytest.mark.parametrize("strategy", [dp.Allreduce(), dp.LocalSGD(average_every=4)], ids=["allreduce", "local-sgd"])
def test_a_collective_group_re_forms_with_a_restarted_worker_which_takes_a_survivors_state(digits, strategy):
    """With restart_workers the survivors leave the broken group and meet the new worker in the elastic rendezvous."""
    epochs = 6
    steps = math.ceil(epochs * math.ceil(digits.num_train // 3 / 16))  # per worker: six passes over its third
    result = dp.train(model="mlp", data=digits, strategy=strategy, optimizer=dp.optim("momentum", lr=0.05),
                      workers=3, epochs=epochs, batch_size=16, save=False, restart_workers=True,
                      faults=dp.Faults(kill_at_step={1: KILLED_AT}))
    events = result.history
    assert [e["fault/killed_at_step"] for e in events if e.get("fault/killed") == "worker:1"] == [KILLED_AT]
    assert any(e.get("fault/restarted") == "worker:1" for e in events)
    assert {e["rank"] for e in events if "fault/regrouped" in e} == {0, 2}
    # The new worker took a survivor's state (so may a survivor whose last collective failed where the
    # other's completed: it was a step behind).
    adopted = {e["rank"]: e["fault/adopted_from"] for e in events if "fault/adopted_from" in e}
    assert adopted[1] in (0, 2)
    finals = {(e["rank"], e["worker/incarnation"]): e for e in events if e.get("worker/done")}
    assert set(finals) >= {(0, 0), (2, 0), (1, 1)}
    reborn = finals[1, 1]
    # The new worker took part to the end, and every replica ended bit-identical: it took the model,
    # the momentum and the schedule of a survivor, else its steps would have drifted from theirs.
    assert reborn["comm/rounds"] > 0 and reborn["worker/steps"] == finals[0, 0]["worker/steps"]
    assert len({finals[key]["worker/params_crc32"] for key in ((0, 0), (2, 0), (1, 1))}) == 1
    assert result.summary["steps"] >= 3 * steps - 3 * 4  # local SGD drops the steps short of a round
    assert result.summary["accuracy"] >= 0.93


def test_a_worker_restart_is_refused_where_the_workers_cannot_take_it_back(digits):
    with pytest.raises(ValueError, match="restart_workers is for downpour, sync, allreduce and local-sgd"):
        dp.train(model="logistic", data=digits, strategy="hogwild", workers=2, save=False, restart_workers=True)
    with pytest.raises(ValueError, match="ensemble keeps every worker's own model"):
        dp.train(model="logistic", data=digits, strategy=dp.LocalSGD(average_every=0, ensemble=True), workers=2,
                 save=False, restart_workers=True)
