"""The unary fast paths (PullSmall, PushSmall, PushPull): chosen on their own, checked the same."""

from __future__ import annotations

import collections

import grpc
import numpy as np
import pytest
import torch

from downpour.flat import SparseUpdate
from downpour.server import ServerShard, Synchronous
from downpour.transport import Refused, ShardService, codec
from downpour.transport import downpour_pb2 as pb
from tests.integration.transport.test_validation import FORGED, SIZE, header, rejection
from tests.optimizers import sgd

pytestmark = pytest.mark.integration

METHODS = ("Pull", "Push", "PullSmall", "PushSmall", "PushPull", "Hello")


@pytest.fixture
def calls(monkeypatch) -> collections.Counter:
    """How often each RPC was served, by name (for servers started after this fixture)."""
    counted: collections.Counter = collections.Counter()
    for name in METHODS:
        method = getattr(ShardService, name)

        def counting(self, request, context, _method=method, _name=name):
            counted[_name] += 1
            return _method(self, request, context)

        monkeypatch.setattr(ShardService, name, counting)
    return counted


@pytest.mark.timeout(60)
def test_tensors_in_one_chunk_travel_in_unary_calls(serve, connect, calls):
    initial = torch.randn(1024)  # 4 KB
    client = connect(serve(ServerShard(initial, optimizer=sgd())).address)
    grad = torch.randn(1024)
    assert client.push(0, 0, grad).applied
    version, params = client.pull()
    assert version == 1 and torch.equal(params, initial - grad)
    assert client.pull(half=True)[1].dtype == torch.float32
    assert calls == {"Hello": 1, "PushSmall": 1, "PullSmall": 2}
    assert (client.pushes, client.pulls) == (1, 2)


@pytest.mark.timeout(60)
def test_tensors_over_one_chunk_still_stream(serve, connect, calls):
    initial = torch.randn(10_001)
    server = serve(ServerShard(initial), chunk_bytes=4096)  # pulls: 10 chunks
    client = connect(server.address, chunk_bytes=1000)  # pushes: 41 chunks
    client.push(0, 0, torch.ones(10_001), kind="delta")
    assert torch.equal(client.pull()[1], initial + 1)
    assert calls == {"Hello": 1, "Push": 1, "Pull": 1}
    # A sparse push of a few pairs fits in one chunk again.
    update = SparseUpdate(torch.tensor([3, 70]), torch.tensor([1.0, 2.0]), 10_001)
    client.push(0, 1, update, kind="delta")
    assert calls["PushSmall"] == 1


@pytest.mark.timeout(60)
def test_push_pull_is_a_push_then_a_pull_in_one_call(serve, connect, calls):
    initial = torch.randn(1024)
    shard = ServerShard(initial, optimizer=sgd(0.5), ema_decay=0.5)
    client = connect(serve(shard).address)
    grad = torch.randn(1024)
    out = torch.empty(1024)
    result, version, params = client.push_pull(3, 0, grad, out=out)
    expected = initial - 0.5 * grad
    assert result == (True, False, 0, 1) and version == 1
    assert params is out and torch.equal(out, expected)
    assert calls == {"Hello": 1, "PushPull": 1}
    assert (client.pushes, client.pulls) == (1, 1)
    _, _, average = client.push_pull(3, 1, grad, average=True)
    assert torch.equal(average, shard.average())
    _, _, half = client.push_pull(3, 2, torch.zeros(1024), half=True)
    assert torch.equal(half, shard.pull()[1].half().float())
    assert calls["PushPull"] == 3


@pytest.mark.timeout(60)
def test_push_pull_of_large_tensors_is_a_push_and_a_pull(serve, connect, calls):
    initial = torch.randn(300_000)  # 1.2 MB: more than a chunk
    client = connect(serve(ServerShard(initial)).address)
    delta = torch.randn(300_000)
    result, version, params = client.push_pull(0, 0, delta, kind="delta")
    assert result.applied and version == 1
    assert torch.equal(params, initial + delta)
    assert calls == {"Hello": 1, "Push": 1, "Pull": 1}


@pytest.mark.timeout(60)
def test_push_pull_waits_for_a_synchronous_round(serve, connect):
    shard = ServerShard(torch.zeros(8), optimizer=sgd(), policy=Synchronous(num_required=2))
    server = serve(shard)
    first, second = connect(server.address), connect(server.address)
    assert not first.push(0, 0, torch.ones(8)).applied
    result, version, params = second.push_pull(1, 0, torch.ones(8), wait_version=1)
    assert result.applied and version == 1 and torch.equal(params, -torch.ones(8))


@pytest.mark.timeout(60)
def test_push_pull_refused_before_the_push_changes_anything(serve, connect):
    shard = ServerShard(torch.zeros(8), optimizer=sgd())  # keeps no moving average
    client = connect(serve(shard).address)
    with pytest.raises(Refused, match="moving average") as caught:
        client.push_pull(0, 0, torch.ones(8), average=True)
    assert caught.value.reason == "BAD_REQUEST"
    with pytest.raises(Refused) as caught:
        client.push_pull(0, 5, torch.ones(8))
    assert caught.value.reason == "BAD_VERSION"
    assert shard.status()["pushes"] == 0 and torch.equal(shard.pull()[1], torch.zeros(8))


# -- forged messages on the unary RPCs --------------------------------------


def single(values: np.ndarray | None = None, **overrides) -> pb.PushChunk:
    """A whole dense push of SIZE float32 values in one chunk."""
    values = np.ones(SIZE, np.float32) if values is None else values
    fields = {"num_chunks": 1, **overrides}
    return pb.PushChunk(seq=0, header=header(**fields), values=values.astype("<f4").tobytes())


def with_value(index: int, value: float) -> np.ndarray:
    values = np.ones(SIZE, np.float32)
    values[index] = value
    return values


FORGED_SMALL = {
    # name: (the one chunk, reject code, words the message must contain)
    **{
        name: (chunks[0], code, words)
        for name, (chunks, code, words) in FORGED.items()
        if len(chunks) == 1
    },
    "announces-two-chunks": (single(num_chunks=2), "BAD_CHUNK_COUNT", "after 1 of 2 chunks"),
    "no-header": (pb.PushChunk(seq=0, values=b"\0" * 4000), "BAD_HEADER", "carries no header"),
    "seq-1": (
        pb.PushChunk(seq=1, header=header(num_chunks=1), values=b"\0" * 4000),
        "BAD_CHUNK_ORDER",
        "chunk 1 arrived where chunk 0 was due",
    ),
    "short": (
        pb.PushChunk(seq=0, header=header(num_chunks=1), values=b"\0" * 3996),
        "BAD_LENGTH",
        "values carried 3996 of the 4000 bytes",
    ),
    "oversized": (
        pb.PushChunk(seq=0, header=header(num_chunks=1), values=b"\0" * 4004),
        "BAD_LENGTH",
        "values exceed the 4000 bytes",
    ),
    "nan": (single(with_value(7, np.nan)), "NON_FINITE", "1 NaN or infinite"),
    "inf": (single(with_value(SIZE - 1, -np.inf)), "NON_FINITE", "1 NaN or infinite"),
    "wrong-length": (single(shape=[SIZE - 1]), "BAD_LENGTH", "does not match shard 0 of 1000"),
    "wrong-dtype": (single(dtype=pb.INT64), "BAD_DTYPE", "FLOAT32 or FLOAT16, got INT64"),
    "bad-shard": (single(shard_id=1), "BAD_SHARD", "the push is for shard 1"),
    "bad-kind": (single(kind=9), "BAD_KIND", "GRADIENT or DELTA"),
    "future-version": (single(version=3), "BAD_VERSION", "only at version 0"),
}


@pytest.fixture
def target(serve, token, stub):
    """A served shard, its stub, the token's metadata and its address."""
    shard = ServerShard(torch.randn(SIZE), optimizer=sgd(0.1))
    address = serve(shard).address
    return shard, stub(address), (("downpour-token", token),), address


def assert_unchanged(shard: ServerShard, before: tuple[int, torch.Tensor]) -> None:
    version, params = shard.pull()
    assert version == before[0] and torch.equal(params, before[1])
    assert shard.status()["pushes"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(FORGED_SMALL))
def test_a_forged_unary_push_is_refused_like_a_streamed_one(target, name):
    shard, stub, metadata, _ = target
    chunk, code, words = FORGED_SMALL[name]
    before = shard.pull()
    with pytest.raises(grpc.RpcError) as caught:
        stub.PushSmall(chunk, metadata=metadata, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rejection(caught.value)[0] == code and words in caught.value.details()
    assert_unchanged(shard, before)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["nan", "bad-shard", "announces-two-chunks", "no-header"])
def test_a_forged_push_inside_a_push_pull_is_refused(target, name):
    shard, stub, metadata, _ = target
    chunk, code, _ = FORGED_SMALL[name]
    before = shard.pull()
    request = pb.PushPullRequest(push=chunk, pull=pb.PullRequest(shard_id=0))
    with pytest.raises(grpc.RpcError) as caught:
        stub.PushPull(request, metadata=metadata, timeout=10)
    assert rejection(caught.value)[0] == code
    assert_unchanged(shard, before)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "pull, code, words",
    [
        (pb.PullRequest(shard_id=4), "BAD_SHARD", "not shard 4"),
        (pb.PullRequest(shard_id=0, dtype=pb.INT32), "BAD_DTYPE", "not INT32"),
        (pb.PullRequest(shard_id=0, average=True), "BAD_REQUEST", "no moving average"),
    ],
)
def test_a_bad_pull_inside_a_push_pull_leaves_the_push_unapplied(target, pull, code, words):
    shard, stub, metadata, _ = target
    before = shard.pull()
    request = pb.PushPullRequest(push=single(), pull=pull)
    with pytest.raises(grpc.RpcError) as caught:
        stub.PushPull(request, metadata=metadata, timeout=10)
    assert rejection(caught.value)[0] == code and words in caught.value.details()
    assert_unchanged(shard, before)


@pytest.mark.timeout(60)
def test_a_pull_too_large_for_one_chunk_is_refused_before_anything(serve, token, stub):
    shard = ServerShard(torch.zeros(5000), optimizer=sgd())
    server = serve(shard, chunk_bytes=4096)
    calls, metadata = stub(server.address), (("downpour-token", token),)
    with pytest.raises(grpc.RpcError) as caught:
        calls.PullSmall(pb.PullRequest(shard_id=0), metadata=metadata, timeout=10)
    assert rejection(caught.value)[0] == "BAD_LENGTH" and "use Pull" in caught.value.details()
    push = pb.PushChunk(
        seq=0,
        header=pb.PushHeader(
            shard_id=0,
            kind=pb.DELTA,
            encoding=pb.DENSE,
            dtype=pb.FLOAT16,
            shape=[5000],
            num_chunks=1,
        ),
        values=b"\0" * 10_000,
    )
    request = pb.PushPullRequest(push=push, pull=pb.PullRequest(shard_id=0))
    with pytest.raises(grpc.RpcError) as caught:
        calls.PushPull(request, metadata=metadata, timeout=10)
    assert rejection(caught.value)[0] == "BAD_LENGTH"
    status = shard.status()
    assert (status["pushes"], status["pulls"]) == (0, 0)
    # What fits is counted in the dtype asked for: 1000 values as float16 take 2000 bytes.
    small = ServerShard(torch.arange(1000.0))
    chunk = stub(serve(small, chunk_bytes=4096).address).PullSmall(
        pb.PullRequest(shard_id=0, dtype=pb.FLOAT16), metadata=metadata, timeout=10
    )
    assert chunk.header.num_chunks == 1 and len(chunk.data) == 2000


@pytest.mark.timeout(60)
@pytest.mark.parametrize("raw", [b"\x08", b"\x0b", b"\x12\x03\xff\xff\xff"])
def test_unary_bytes_that_do_not_parse_are_malformed(target, raw):
    shard, _, metadata, address = target
    before = shard.pull()
    with grpc.insecure_channel(address) as channel:
        for method, reply in (
            (codec.PUSH_SMALL, pb.PushReply),
            (codec.PUSH_PULL, pb.PushPullReply),
        ):
            call = channel.unary_unary(method, lambda b: b, reply.FromString)
            with pytest.raises(grpc.RpcError) as caught:
                call(raw, metadata=metadata, timeout=10)
            assert rejection(caught.value)[0] == "MALFORMED"
    assert_unchanged(shard, before)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "metadata", [(), (("downpour-token", "not-the-token"),)], ids=["missing", "wrong"]
)
def test_the_unary_rpcs_want_the_token(target, metadata):
    shard, stub, _, _ = target
    before = shard.pull()
    calls = [
        lambda: stub.PullSmall(pb.PullRequest(shard_id=0), metadata=metadata, timeout=10),
        lambda: stub.PushSmall(single(), metadata=metadata, timeout=10),
        lambda: stub.PushPull(
            pb.PushPullRequest(push=single(), pull=pb.PullRequest()),
            metadata=metadata,
            timeout=10,
        ),
        lambda: stub.Hello(pb.HelloRequest(shared_memory=True), metadata=metadata, timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert rejection(caught.value)[0] == "BAD_TOKEN"
    assert shard.status()["pulls"] == 1  # the test's own, above
    assert_unchanged(shard, before)
