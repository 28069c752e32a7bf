"""Pull and push through real gRPC: dense, chunked, sparse, half, waits, status, shutdown."""

from __future__ import annotations

import threading

import pytest
import torch

from downpour.errors import PeerTimeout, StaleUpdate
from downpour.flat import SparseUpdate
from downpour.server import BoundedStaleness, ServerShard, Synchronous
from downpour.transport import CHUNK_BYTES, MAX_MESSAGE_BYTES, Refused
from tests.waiting import waiting_pulls, wait_until
from tests.optimizers import sgd

pytestmark = pytest.mark.integration


@pytest.mark.timeout(60)
def test_pull_and_push_round_trip(serve, connect):
    initial = torch.randn(1000)
    shard = ServerShard(initial, optimizer=sgd(0.5))
    client = connect(serve(shard).address)
    version, params = client.pull()
    assert version == 0 and torch.equal(params, initial)
    grad = torch.randn(1000)
    assert client.push(worker=3, version=0, update=grad) == (True, False, 0, 1)
    version, params = client.pull()
    expected = initial.clone()
    expected.add_(grad, alpha=-0.5)
    assert version == 1 and torch.equal(params, expected)
    assert (client.pushes, client.pulls) == (1, 2)
    assert client.bytes_sent > 4000 and client.bytes_received > 8000


@pytest.mark.timeout(60)
def test_a_vector_over_4_mib_streams_in_chunks_with_equal_bits(serve, connect):
    numel = 1_500_000  # 6 MB: above gRPC's 4 MiB message limit, so it must be chunked
    initial = torch.randn(numel)
    initial[::7] = float("-0.0")  # sign of zero, subnormals and extremes must survive
    initial[1] = torch.finfo(torch.float32).tiny / 4
    initial[2] = torch.finfo(torch.float32).max
    shard = ServerShard(initial)
    client = connect(serve(shard).address)
    _, params = client.pull()
    assert torch.equal(params.view(torch.int32), initial.view(torch.int32))
    assert client.bytes_received > numel * 4 > MAX_MESSAGE_BYTES
    delta = torch.randn(numel)
    assert client.push(0, 0, delta, kind="delta").applied
    _, params = client.pull()
    assert torch.equal(params.view(torch.int32), (initial + delta).view(torch.int32))
    assert client.bytes_sent > numel * 4
    assert numel * 4 // CHUNK_BYTES >= 5


@pytest.mark.timeout(60)
def test_small_chunks_and_a_preallocated_out(serve, connect):
    initial = torch.randn(10_001)
    server = serve(ServerShard(initial), chunk_bytes=4096)
    client = connect(server.address, chunk_bytes=1000)
    out = torch.empty(10_001)
    _, params = client.pull(out=out)
    assert params is out and torch.equal(out, initial)
    client.push(0, 0, torch.ones(10_001), kind="delta")
    assert torch.equal(client.pull()[1], initial + 1)
    with pytest.raises(ValueError, match="contiguous float32 tensor of 10001"):
        client.pull(out=torch.empty(10))


@pytest.mark.timeout(60)
def test_sparse_push(serve, connect):
    shard = ServerShard(torch.zeros(100_000), optimizer=sgd(1.0))
    client = connect(serve(shard).address)
    indices = torch.tensor([0, 17, 4_096, 99_999])
    values = torch.tensor([1.0, -2.0, 3.0, 4.0])
    before = client.bytes_sent
    assert client.push(0, 0, SparseUpdate(indices, values, 100_000)).applied
    assert client.bytes_sent - before < 200  # 4 pairs of int32 + float32, not 400 KB
    expected = torch.zeros(100_000)
    expected[indices] = -values
    assert torch.equal(client.pull()[1], expected)


@pytest.mark.timeout(60)
def test_half_precision_on_the_wire(serve, connect):
    initial = torch.randn(5000)
    client = connect(serve(ServerShard(initial)).address)
    _, params = client.pull(half=True)
    assert params.dtype == torch.float32
    assert torch.equal(params, initial.half().float())
    delta = torch.randn(5000).half()
    client.push(0, 0, delta, kind="delta")
    assert torch.equal(client.pull()[1], initial + delta.float())


@pytest.mark.timeout(60)
def test_pull_newer_than_returns_nothing_when_not_newer(serve, connect):
    client = connect(serve(ServerShard(torch.zeros(10), optimizer=sgd())).address)
    assert client.pull(newer_than=0) is None
    received = client.bytes_received
    assert client.pull(newer_than=0) is None
    assert client.bytes_received - received < 64  # a header, no data
    client.push(0, 0, torch.ones(10))
    version, params = client.pull(newer_than=0)
    assert version == 1 and torch.equal(params, -torch.ones(10))


@pytest.mark.timeout(60)
def test_wait_version_blocks_then_returns(serve, connect):
    shard = ServerShard(torch.zeros(10), optimizer=sgd(), policy=Synchronous(num_required=2))
    server = serve(shard)
    waiter, pusher = connect(server.address), connect(server.address)
    got = []
    thread = threading.Thread(target=lambda: got.append(waiter.pull(wait_version=1, timeout=20)))
    thread.start()
    # The service waits in slices; parked at least once means the pull reached the shard.
    wait_until(lambda: waiting_pulls(shard), what="the pull waiting on the shard")
    pusher.push(0, 0, torch.ones(10))
    # One of two: the version has not moved, so the pull must still be waiting.
    assert shard.version == 0 and not got and thread.is_alive()
    wait_until(lambda: waiting_pulls(shard), what="the pull still waiting after one push")
    pusher.push(1, 0, torch.ones(10))
    thread.join(timeout=20)
    version, params = got[0]
    assert version == 1 and torch.equal(params, -torch.ones(10))


@pytest.mark.timeout(60)
def test_wait_version_past_the_deadline_is_a_peer_timeout(serve, connect):
    server = serve(ServerShard(torch.zeros(10)))
    client = connect(server.address)
    with pytest.raises(PeerTimeout, match=server.address):
        client.pull(wait_version=5, timeout=0.5)


@pytest.mark.timeout(60)
def test_stale_push_raises_stale_update(serve, connect):
    shard = ServerShard(torch.zeros(4), optimizer=sgd(), policy=BoundedStaleness(max_staleness=1))
    client = connect(serve(shard).address)
    for version in range(3):
        client.push(0, version, torch.ones(4))
    with pytest.raises(StaleUpdate, match="pull and recompute"):
        client.push(1, 0, torch.ones(4))
    assert client.status()["refused"] == 1


@pytest.mark.timeout(60)
def test_moving_average_is_served_on_request(serve, connect):
    shard = ServerShard(torch.zeros(8), optimizer=sgd(), ema_decay=0.5)
    client = connect(serve(shard).address)
    client.push(0, 0, torch.ones(8))
    version, average = client.pull(average=True)
    assert version == 1 and torch.equal(average, torch.full((8,), -0.5))
    plain = connect(serve(ServerShard(torch.zeros(8))).address)
    with pytest.raises(Refused, match="ema_decay") as error:
        plain.pull(average=True)
    assert error.value.reason == "BAD_REQUEST"


@pytest.mark.timeout(60)
def test_status_reports_the_shard_counters(serve, connect):
    shard = ServerShard(torch.zeros(8), optimizer=sgd(), policy=Synchronous(num_required=2))
    client = connect(serve(shard).address)
    client.push(0, 0, torch.ones(8))
    client.push(1, 0, torch.ones(8))
    client.push(2, 0, torch.ones(8))
    status = client.status()
    assert status == shard.status()
    assert (status["applied"], status["dropped"], status["version"]) == (2, 1, 1)
    assert status["policy"].startswith("Synchronous(num_required=2")


@pytest.mark.timeout(60)
def test_shutdown_rpc_sets_the_event(serve, connect):
    server = serve(ServerShard(torch.zeros(4)))
    client = connect(server.address)
    assert not server.shutdown_requested.is_set()
    client.shutdown("test over")
    assert server.shutdown_requested.wait(5)
    server.stop(grace=None)
    assert server.wait_for_termination(timeout=5)


@pytest.mark.timeout(60)
def test_a_stopped_server_is_a_transport_error_and_stop_wakes_waiting_pulls(serve, connect):
    shard = ServerShard(torch.zeros(4))
    server = serve(shard)
    client = connect(server.address)
    errors = []

    def wait() -> None:
        try:
            client.pull(wait_version=3, timeout=30)
        except Exception as error:  # noqa: BLE001 - recorded for the assertion below
            errors.append(error)

    thread = threading.Thread(target=wait)
    thread.start()
    wait_until(lambda: waiting_pulls(shard), what="the pull waiting on the shard")
    server.stop(grace=0.5)
    thread.join(timeout=45)  # a hang guard, past the pull's own 30 s deadline
    # Woken by the stop, not run out: the error is the server going away, not a deadline.
    assert errors and "shard 0" in str(errors[0])
    assert not isinstance(errors[0], PeerTimeout), errors[0]
    with pytest.raises(Exception, match="unavailable"):
        client.pull(timeout=2)


@pytest.mark.timeout(60)
def test_server_binds_loopback_and_picks_a_free_port(serve):
    first = serve(ServerShard(torch.zeros(2)))
    second = serve(ServerShard(torch.zeros(2)))
    assert first.address.startswith("127.0.0.1:") and first.port > 0
    assert first.port != second.port


@pytest.mark.timeout(60)
def test_the_client_refuses_sparse_indices_that_would_wrap(serve, connect):
    client = connect(serve(ServerShard(torch.zeros(10))).address)
    wraps_to_3 = SparseUpdate(torch.tensor([2**32 + 3]), torch.ones(1), 10)
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        client.push(0, 0, wraps_to_3, kind="delta")
    assert torch.equal(client.pull()[1], torch.zeros(10))
