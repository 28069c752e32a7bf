"""ServerShard: validation, pulls, sparse updates, moving average, checkpoints, threads."""

from __future__ import annotations

import threading

import pytest
import torch

from downpour.errors import StaleUpdate
from downpour.flat import ShardRange, SparseUpdate
from downpour.server import ApplyAtOnce, BoundedStaleness, InvalidUpdate, ServerShard, Synchronous
from tests.waiting import waiting_pulls, wait_until
from tests.optimizers import sgd


# -- construction -------------------------------------------------------------


def test_the_shard_copies_its_initial_slice_and_knows_its_range():
    initial = torch.arange(6, dtype=torch.float32)
    shard = ServerShard(initial, shard=ShardRange(2, 10, 16), optimizer=sgd())
    initial.zero_()
    assert (shard.shard_id, shard.start, shard.stop, shard.size) == (2, 10, 16, 6)
    assert torch.equal(shard.pull()[1], torch.arange(6, dtype=torch.float32))


@pytest.mark.parametrize(
    "params, kwargs, error, match",
    [
        (torch.zeros(3, dtype=torch.float64), {}, TypeError, "float32"),
        (torch.zeros(3), {"shard": ShardRange(0, 0, 4)}, ValueError, "4 elements"),
        (torch.zeros(0), {}, ValueError, "at least one"),
        (torch.zeros(3), {"ema_decay": 0.0}, ValueError, "ema_decay"),
        (torch.zeros(3), {"optimizer": lambda ps: "adam"}, TypeError, "torch.optim.Optimizer"),
    ],
)
def test_bad_construction_says_what_is_wrong(params, kwargs, error, match):
    with pytest.raises(error, match=match):
        ServerShard(params, **kwargs)


# -- validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    "update, kwargs, reason",
    [
        (torch.ones(5), {}, "BAD_LENGTH"),
        (torch.ones(4, dtype=torch.float64), {}, "BAD_DTYPE"),
        (torch.tensor([1.0, float("nan"), 0.0, 0.0]), {}, "NON_FINITE"),
        (torch.tensor([1.0, float("inf"), 0.0, 0.0]), {}, "NON_FINITE"),
        (SparseUpdate(torch.tensor([0, 4]), torch.ones(2), 4), {}, "BAD_INDEX"),
        (SparseUpdate(torch.tensor([-1]), torch.ones(1), 4), {}, "BAD_INDEX"),
        (SparseUpdate(torch.tensor([2, 1]), torch.ones(2), 4), {}, "BAD_INDEX"),
        (SparseUpdate(torch.tensor([1, 1]), torch.ones(2), 4), {}, "BAD_INDEX"),
        (SparseUpdate(torch.tensor([1]), torch.ones(1), 5), {}, "BAD_LENGTH"),
        (SparseUpdate(torch.tensor([1]), torch.tensor([float("nan")]), 4), {}, "NON_FINITE"),
        (SparseUpdate(torch.tensor([1.0]), torch.ones(1), 4), {}, "BAD_DTYPE"),
        (torch.ones(4), {"kind": "momentum"}, "BAD_KIND"),
        (torch.ones(4), {"version": 7}, "BAD_VERSION"),
        (torch.ones(4), {"version": -1}, "BAD_VERSION"),
        (torch.ones(4), {"worker": -1}, "BAD_REQUEST"),
    ],
)
def test_invalid_updates_are_refused_and_change_nothing(update, kwargs, reason):
    shard = ServerShard(torch.arange(4, dtype=torch.float32), optimizer=sgd())
    shard.push(0, 0, torch.ones(4))
    before = shard.state_dict()
    arguments = {"worker": 0, "version": 1, **kwargs}
    kind = arguments.pop("kind", "gradient")
    with pytest.raises(InvalidUpdate) as error:
        shard.push(arguments["worker"], arguments["version"], update, kind=kind)
    assert error.value.reason == reason
    assert isinstance(error.value, ValueError)
    after = shard.state_dict()
    assert after["version"] == before["version"] == 1
    assert torch.equal(after["params"], before["params"])
    assert shard.status()["pushes"] == 1


def test_non_tensor_updates_are_a_type_error():
    shard = ServerShard(torch.zeros(2), optimizer=sgd())
    with pytest.raises(TypeError, match="SparseUpdate"):
        shard.push(0, 0, [1.0, 2.0])  # type: ignore[arg-type]


# -- sparse updates -----------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer",
    [
        sgd(0.5),
        lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9),
        lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    ],
    ids=["sgd", "momentum", "adagrad"],
)
def test_a_sparse_push_equals_the_dense_push_of_the_same_vector(optimizer):
    sparse = SparseUpdate(torch.tensor([0, 3, 7]), torch.tensor([1.0, -2.0, 0.5]), 8)
    for index_dtype in (torch.int64, torch.int32):
        as_sparse = ServerShard(torch.ones(8), optimizer=optimizer)
        as_dense = ServerShard(torch.ones(8), optimizer=optimizer)
        for version in range(3):
            as_sparse.push(
                0, version, SparseUpdate(sparse.indices.to(index_dtype), sparse.values, 8)
            )
            as_dense.push(0, version, sparse.to_dense())
        assert torch.allclose(as_sparse.pull()[1], as_dense.pull()[1], atol=0, rtol=1e-7)


def test_sparse_deltas_touch_only_their_coordinates():
    shard = ServerShard(torch.ones(6))
    shard.push(0, 0, SparseUpdate(torch.tensor([1, 4]), torch.tensor([2.0, 3.0]), 6), kind="delta")
    assert torch.equal(shard.pull()[1], torch.tensor([1.0, 3.0, 1.0, 1.0, 4.0, 1.0]))


# -- pulls ----------------------------------------------------------------------


def test_pull_newer_than_returns_none_until_the_version_moves():
    shard = ServerShard(torch.zeros(2), optimizer=sgd())
    assert shard.pull(newer_than=0) is None
    shard.push(0, 0, torch.ones(2))
    version, _ = shard.pull(newer_than=0)
    assert version == 1
    assert shard.pull(newer_than=1) is None


def test_pull_copies_so_callers_cannot_touch_the_shard():
    shard = ServerShard(torch.zeros(2), optimizer=sgd())
    _, params = shard.pull()
    params.fill_(9)
    assert torch.equal(shard.pull()[1], torch.zeros(2))


def test_wait_version_blocks_until_the_version_is_reached():
    shard = ServerShard(torch.zeros(2), optimizer=sgd(), policy=Synchronous(num_required=2))
    got = []
    waiter = threading.Thread(target=lambda: got.append(shard.pull(wait_version=1, timeout=30)))
    waiter.start()
    wait_until(lambda: waiting_pulls(shard) == 1, what="the pull waiting on the shard")
    shard.push(0, 0, torch.ones(2))
    # One of two: the round is open, the version has not moved, and the pull is still parked.
    assert shard.version == 0 and not got and waiting_pulls(shard) == 1
    shard.push(1, 0, torch.ones(2))
    waiter.join(timeout=30)
    assert got and got[0][0] == 1
    assert torch.equal(got[0][1], -torch.ones(2))


@pytest.mark.timeout(30)  # a hang guard: the wait must end at its own timeout
def test_wait_version_times_out():
    shard = ServerShard(torch.zeros(2), optimizer=sgd())
    with pytest.raises(TimeoutError, match="did not reach version 3 within 0.1 s"):
        shard.pull(wait_version=3, timeout=0.1)


def test_snapshot_memoizes_an_encoding_until_the_shard_changes():
    shard = ServerShard(torch.zeros(2), optimizer=sgd())
    calls = []

    def encode(version, view):
        calls.append(version)
        return view.tolist()

    assert shard.snapshot(encode, key="k") == [0.0, 0.0]
    assert shard.snapshot(encode, key="k") == [0.0, 0.0]
    assert calls == [0]
    shard.push(0, 0, torch.ones(2))
    assert shard.snapshot(encode, key="k") == [-1.0, -1.0]
    assert calls == [0, 1]
    shard.snapshot(encode)  # no key: no memo
    assert calls == [0, 1, 1]


# -- moving average --------------------------------------------------------------


def test_the_moving_average_follows_every_update():
    decay = 0.9
    shard = ServerShard(torch.zeros(3), optimizer=sgd(1.0), ema_decay=decay)
    expected = torch.zeros(3)
    for version in range(5):
        shard.push(0, version, torch.full((3,), float(version + 1)))
        expected = decay * expected + (1 - decay) * shard.pull()[1]
    assert torch.allclose(shard.average(), expected, rtol=1e-6)
    assert shard.pull(average=True)[0] == 5
    assert shard.status()["has_average"]


def test_average_without_ema_says_how_to_turn_it_on():
    with pytest.raises(ValueError, match="ema_decay"):
        ServerShard(torch.zeros(2)).average()


# -- checkpoints ------------------------------------------------------------------


def test_state_dict_round_trip_continues_bit_identically():
    torch.manual_seed(0)
    grads = [torch.randn(16) for _ in range(6)]

    def make():
        return ServerShard(
            torch.ones(16),
            shard=ShardRange(1, 16, 32),
            optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01),
            ema_decay=0.5,
        )

    original = make()
    for version, grad in enumerate(grads[:3]):
        original.push(0, version, grad)
    state = original.state_dict()
    restored = make()
    restored.load_state_dict(state)
    assert restored.version == 3
    for version, grad in enumerate(grads[3:], start=3):
        original.push(0, version, grad)
        restored.push(0, version, grad)
    assert torch.equal(original.pull()[1], restored.pull()[1])
    assert torch.equal(original.average(), restored.average())


def test_load_state_dict_refuses_another_range():
    state = ServerShard(torch.zeros(4), shard=ShardRange(0, 0, 4)).state_dict()
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        ServerShard(torch.zeros(4), shard=ShardRange(1, 4, 8)).load_state_dict(state)


def test_load_state_dict_wakes_waiting_pulls():
    shard = ServerShard(torch.zeros(2), optimizer=sgd())
    state = shard.state_dict()
    state["version"] = 5
    got = []
    waiter = threading.Thread(target=lambda: got.append(shard.pull(wait_version=5, timeout=30)))
    waiter.start()
    wait_until(lambda: waiting_pulls(shard) == 1, what="the pull waiting on the shard")
    shard.load_state_dict(state)
    waiter.join(timeout=30)
    assert got and got[0][0] == 5


# -- threads ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [
        ApplyAtOnce(),
        Synchronous(num_required=3),
        Synchronous(num_required=3, late="fold"),
        BoundedStaleness(max_staleness=2),
    ],
    ids=["downpour", "sync", "sync-fold", "ssp"],
)
def test_concurrent_pushes_keep_the_counts_consistent(policy):
    shard = ServerShard(torch.zeros(64), optimizer=sgd(0.01), policy=policy)
    num_workers, pushes_each = 6, 60
    errors = []

    def worker(rank: int) -> None:
        try:
            version = 0
            for step in range(pushes_each):
                try:
                    shard.push(rank, version, torch.ones(64))
                except StaleUpdate:
                    pass
                if step % 3 == 0:
                    version = shard.version
        except Exception as error:  # noqa: BLE001 - surfaced below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(num_workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    status = shard.status()
    assert status["pushes"] == num_workers * pushes_each
    assert (
        status["pushes"]
        == status["applied"] + status["dropped"] + status["refused"] + status["pending"]
    )
    assert status["version"] == status["updates"]
    assert sum(status["staleness"].values()) == status["applied"]
    if isinstance(policy, BoundedStaleness):
        assert max(status["staleness"]) <= 2
    if isinstance(policy, ApplyAtOnce):
        # Every push applied exactly once: SGD on a constant gradient is a count.
        assert torch.allclose(
            shard.pull()[1], torch.full((64,), -0.01 * status["applied"]), rtol=1e-4
        )
