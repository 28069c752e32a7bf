"""Synchronous rounds over gRPC with a backup worker, and ParameterClient over several shards."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from downpour.errors import StaleUpdate, TransportError
from downpour.flat import SparseUpdate, shard_ranges
from downpour.server import ApplyAtOnce, BoundedStaleness, ServerShard, Synchronous
from downpour.transport import ParameterClient, Refused
from tests.optimizers import sgd

pytestmark = pytest.mark.integration


@pytest.mark.timeout(60)
def test_synchronous_rounds_with_three_workers_and_one_backup(serve, connect):
    rounds, num_required, numel = 6, 3, 50_000
    shard = ServerShard(
        torch.zeros(numel), optimizer=sgd(0.5), policy=Synchronous(num_required=num_required)
    )
    server = serve(shard, max_workers=8)
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        client = connect(server.address)
        try:
            version, _ = client.pull()
            while version < rounds:
                if rank == 3:
                    time.sleep(0.02)  # the straggler: usually the one left out
                # Every worker computes the same gradient, so any 3 of 4 give the same step.
                client.push(rank, version, torch.ones(numel))
                version, _ = client.pull(wait_version=version + 1, timeout=20)
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(num_required + 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=50)
    assert not errors, errors
    status = shard.status()
    assert status["version"] == rounds
    assert status["applied"] == num_required * rounds
    assert status["staleness"] == {0: num_required * rounds}
    assert status["pushes"] == status["applied"] + status["dropped"] + status["pending"]
    assert status["dropped"] >= 1
    assert torch.equal(shard.pull()[1], torch.full((numel,), -0.5 * rounds))


@pytest.fixture(params=[False, True], ids=["network", "shared"])
def shared_memory(request) -> bool:
    return request.param


def received(client) -> int:
    """Tensor bytes in, whichever way they came (on the network path, ``bytes_received``)."""
    return client.bytes_received + client.bytes_shared_received


def sent(client) -> int:
    return client.bytes_sent + client.bytes_shared_sent


@pytest.fixture
def two_shards(serve, token, shared_memory):
    numel = 300_001
    initial = torch.randn(numel)
    ranges = shard_ranges(numel, 2)
    shards = [
        ServerShard(initial[r.start : r.stop], shard=r, optimizer=sgd(1.0), policy=ApplyAtOnce())
        for r in ranges
    ]
    servers = [serve(shard) for shard in shards]
    params = ParameterClient(
        [s.address for s in servers], ranges, token, timeout=20, shared_memory=shared_memory
    )
    yield params, shards, initial
    assert all(c.uses_shared_memory == shared_memory for c in params.clients)
    if not shared_memory:
        assert params.bytes_shared == 0
    params.close()


@pytest.mark.timeout(60)
def test_parameter_client_pulls_the_full_vector(two_shards):
    params, _, initial = two_shards
    versions, vector = params.pull_all()
    assert versions == [0, 0]
    assert torch.equal(vector, initial)
    assert params.pulls == 2
    assert received(params) >= initial.numel() * 4


@pytest.mark.timeout(60)
def test_parameter_client_pushes_each_shard_its_slice(two_shards):
    params, _, initial = two_shards
    grad = torch.randn(initial.numel())
    results = params.push_all(worker=0, versions=[0, 0], update=grad)
    assert [r.version for r in results] == [1, 1]
    versions, vector = params.pull_all()
    assert versions == [1, 1]
    assert torch.equal(vector, initial - grad)
    assert params.pushes == 2


@pytest.mark.timeout(60)
def test_parameter_client_sends_sparse_only_where_it_is_smaller(two_shards):
    params, shards, initial = two_shards
    numel, boundary = initial.numel(), shards[1].start
    # Shard 0 gets 3 entries (sparse pays), shard 1 gets 80% of its entries (dense pays).
    dense_part = torch.arange(boundary, numel)[torch.rand(numel - boundary) < 0.8]
    indices = torch.cat([torch.tensor([5, 10, 99]), dense_part])
    values = torch.randn(indices.numel())
    shuffle = torch.randperm(indices.numel())  # unsorted input is fine
    update = SparseUpdate(indices[shuffle], values[shuffle], numel)
    before = [sent(c) for c in params.clients]
    params.push_all(worker=1, versions=[0, 0], update=update, kind="delta")
    pushed = [sent(c) - b for c, b in zip(params.clients, before)]
    assert pushed[0] < 200  # three (int32, float32) pairs
    assert (
        (numel - boundary) * 4 <= pushed[1] < (numel - boundary) * 4 + 4096
    )  # dense beats 80% sparse
    expected = initial.clone()
    expected[indices] += values
    _, vector = params.pull_all()
    assert torch.equal(vector, expected)


@pytest.mark.timeout(60)
def test_parameter_client_newer_than_keeps_the_parts_not_pulled(two_shards):
    params, shards, initial = two_shards
    out = torch.empty(initial.numel())
    versions, _ = params.pull_all(out=out)
    shards[1].push(0, 0, torch.ones(shards[1].size))
    before = received(params)
    versions, vector = params.pull_all(newer_than=versions, out=out)
    assert versions == [0, 1]
    assert vector is out
    assert received(params) - before < shards[1].size * 4 + 4096  # shard 0 sent nothing
    expected = initial.clone()
    expected[shards[1].start :] -= 1
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="needs out="):
        params.pull_all(newer_than=versions)


@pytest.mark.timeout(60)
def test_parameter_client_waits_on_every_shard_and_reports_errors(two_shards):
    params, shards, _ = two_shards
    for shard in shards:
        shard.push(0, 0, torch.zeros(shard.size))
    versions, _ = params.pull_all(wait_versions=[1, 1], timeout=10)
    assert versions == [1, 1]
    with pytest.raises(Refused, match="shard 1"):
        params.push_all(0, [0, 9], torch.zeros(shards[0].size + shards[1].size))
    assert shards[1].status()["pushes"] == 1
    with pytest.raises(ValueError, match="one version per shard"):
        params.push_all(0, [0], torch.zeros(3))
    status = params.status_all()
    assert [s["shard"] for s in status] == [0, 1]


@pytest.mark.timeout(60)
def test_unreachable_shard_is_a_transport_error(token):
    params = ParameterClient(["127.0.0.1:1"], shard_ranges(4, 1), token, timeout=2)
    try:
        with pytest.raises(TransportError, match="127.0.0.1:1"):
            params.pull_all()
    finally:
        params.close()


@pytest.mark.timeout(60)
def test_parameter_client_checks_its_ranges(token):
    ranges = shard_ranges(10, 2)
    with pytest.raises(ValueError, match="one address per shard"):
        ParameterClient(["127.0.0.1:1"], ranges, token)
    with pytest.raises(ValueError, match="contiguous from 0"):
        ParameterClient(["a:1", "b:2"], ranges[::-1], token)


@pytest.mark.timeout(60)
def test_stale_update_crosses_parameter_client(serve, token):
    shard = ServerShard(torch.zeros(4), optimizer=sgd(), policy=BoundedStaleness(max_staleness=0))
    server = serve(shard)
    with ParameterClient([server.address], shard_ranges(4, 1), token) as params:
        params.push_all(0, [0], torch.ones(4))
        with pytest.raises(StaleUpdate):
            params.push_all(1, [0], torch.ones(4))
