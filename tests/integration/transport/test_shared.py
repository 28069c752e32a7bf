"""The same-host path: tensors through a shared-memory segment, headers through gRPC (or the
session's Unix socket, see test_local_socket.py).

Equal bits to the network path, honest byte counters, forged headers refused,
and no segment left in /dev/shm (the ``segments`` fixture checks every test).
"""

from __future__ import annotations

import os
import threading

import grpc
import numpy as np
import pytest
import torch

from downpour.errors import PeerTimeout, TransportError
from downpour.flat import SparseUpdate
from downpour.server import ServerShard, Synchronous
from downpour.transport import ShardClient, shared
from downpour.transport import downpour_pb2 as pb
from downpour.transport.assembly import BufferPool, PushAssembly, Reject
from downpour.transport.local import METHODS
from tests.integration.transport.test_validation import rejection
from tests.optimizers import sgd

pytestmark = pytest.mark.integration

SIZE = 20_000  # 80 KB as float32: above shared.SHARED_MIN_BYTES


@pytest.fixture
def shared_memory() -> str:
    """``connect``'s clients here ask for shared memory as they do by default."""
    return "auto"


def awkward(numel: int) -> torch.Tensor:
    """Random values with the bit patterns a copy could get wrong."""
    values = torch.randn(numel)
    values[::7] = -0.0
    values[1] = torch.finfo(torch.float32).tiny / 4  # subnormal
    values[2] = torch.finfo(torch.float32).max
    values[3] = torch.finfo(torch.float32).min
    return values


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32)


@pytest.fixture
def twins(serve, connect):
    """Two equal shards, one reached over the network, one through shared memory."""

    def make(initial: torch.Tensor, **kwargs):
        shards = [ServerShard(initial, **kwargs) for _ in range(2)]
        network = connect(serve(shards[0]).address, shared_memory=False)
        local = connect(serve(shards[1]).address, shared_memory=True)
        return shards, network, local

    return make


@pytest.mark.timeout(60)
def test_the_two_paths_move_equal_bits(twins):
    initial = awkward(1_500_000)  # 6 MB: a stream of chunks on the network path
    shards, network, local = twins(initial)
    for client in (network, local):
        version, params = client.pull()
        assert version == 0 and torch.equal(bits(params), bits(initial))
    assert local.uses_shared_memory and not network.uses_shared_memory
    delta = awkward(1_500_000)
    for client in (network, local):
        assert client.push(0, 0, delta, kind="delta").applied
    pulled = [client.pull()[1] for client in (network, local)]
    assert torch.equal(bits(pulled[0]), bits(pulled[1]))
    assert torch.equal(bits(pulled[1]), bits(initial + delta))
    assert torch.equal(bits(shards[0].pull()[1]), bits(shards[1].pull()[1]))


@pytest.mark.timeout(60)
def test_half_and_sparse_through_shared_memory_equal_the_network(twins):
    shards, network, local = twins(awkward(SIZE))
    halves = [client.pull(half=True)[1] for client in (network, local)]
    assert torch.equal(bits(halves[0]), bits(halves[1]))
    assert torch.equal(halves[1], shards[0].pull()[1].half().float())
    half_delta = torch.randn(SIZE * 2).half()[:SIZE].contiguous()  # 40 KB: gRPC
    indices = torch.arange(0, SIZE, 2)  # 10 000 pairs of int32 + float32 = 80 KB: a segment
    sparse = SparseUpdate(indices, torch.randn(indices.numel()), SIZE)
    for client in (network, local):
        before = client.bytes_shared_sent
        client.push(0, 0, sparse, kind="delta")
        assert (client.bytes_shared_sent - before > 0) == (client is local)
        client.push(0, 1, half_delta, kind="delta")
    pulled = [client.pull()[1] for client in (network, local)]
    assert torch.equal(bits(pulled[0]), bits(pulled[1]))


@pytest.mark.timeout(60)
def test_byte_counters_say_which_way_the_bytes_went(twins):
    numel = 2 * SIZE  # so that even float16 pulls take the segment
    _, network, local = twins(torch.randn(numel))
    for client in (network, local):
        client.pull()
        client.push(0, 0, torch.ones(numel), kind="delta")
        client.pull(half=True)
    assert network.bytes_shared == 0
    assert network.bytes_received > numel * 6 and network.bytes_sent > numel * 4
    assert local.bytes_shared_received == numel * 6  # float32, then float16
    assert local.bytes_shared_sent == numel * 4
    assert local.bytes_shared == local.bytes_shared_sent + local.bytes_shared_received
    assert local.bytes_sent < 1000 and local.bytes_received < 1000  # headers only
    assert (local.pushes, local.pulls) == (1, 2)


@pytest.mark.timeout(60)
def test_a_push_pull_through_shared_memory_is_one_call_and_equals_the_network(twins):
    shards, network, local = twins(awkward(SIZE), optimizer=sgd(0.5))
    calls: list[str] = []
    session_call = local._session_call

    def counted(session, method, *args):
        calls.append(METHODS[method])
        return session_call(session, method, *args)

    local._session_call = counted
    gradient = awkward(SIZE)
    answers = [client.push_pull(0, 0, gradient) for client in (network, local)]
    assert calls == ["PushPullShared"]  # one call, not a push and a pull
    (net_result, net_version, net_params), (result, version, params) = answers
    assert result == net_result and result.applied and version == net_version == 1
    assert torch.equal(bits(params), bits(net_params))
    assert torch.equal(bits(params), bits(shards[1].pull()[1]))
    assert local.bytes_shared_sent == local.bytes_shared_received == 4 * SIZE
    assert (local.pushes, local.pulls) == (1, 1)
    sparse = SparseUpdate(torch.arange(0, SIZE, 2), torch.randn(SIZE // 2), SIZE)
    answers = [client.push_pull(0, 1, sparse, average=False) for client in (network, local)]
    assert torch.equal(bits(answers[0][2]), bits(answers[1][2])) and answers[1][1] == 2
    assert calls == ["PushPullShared"] * 2


@pytest.mark.timeout(60)
def test_pull_semantics_hold_through_shared_memory(serve, connect):
    shard = ServerShard(
        torch.zeros(SIZE), optimizer=sgd(), policy=Synchronous(num_required=2), ema_decay=0.5
    )
    server = serve(shard)
    waiter, pusher = connect(server.address, shared_memory=True), connect(server.address)
    assert waiter.pull(newer_than=0) is None
    got = []
    thread = threading.Thread(target=lambda: got.append(waiter.pull(wait_version=1, timeout=20)))
    thread.start()
    pusher.push(0, 0, torch.ones(SIZE))
    pusher.push(1, 0, torch.ones(SIZE))
    thread.join(timeout=20)
    version, params = got[0]
    assert version == 1 and torch.equal(params, -torch.ones(SIZE))
    out = torch.empty(SIZE)
    version, average = waiter.pull(average=True, out=out)
    assert average is out and torch.equal(average, shard.average())
    with pytest.raises(ValueError, match="contiguous float32 tensor of 20000"):
        waiter.pull(out=torch.empty(10))
    assert waiter.uses_shared_memory


@pytest.mark.timeout(60)
def test_concurrent_calls_on_one_client_share_the_session_safely(serve, connect):
    shard = ServerShard(torch.zeros(SIZE))
    client = connect(serve(shard).address, shared_memory=True)
    client.pull()
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            for _ in range(20):
                client.push(rank, 0, torch.ones(SIZE), kind="delta")
                client.pull()
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(rank,)) for rank in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=50)
    assert not errors, errors
    assert torch.equal(shard.pull()[1], torch.full((SIZE,), 60.0))
    assert client.uses_shared_memory  # the ones that found it busy took the network


@pytest.mark.timeout(60)
def test_a_pull_that_times_out_drops_its_session_and_the_next_gets_a_fresh_one(serve, connect):
    shard = ServerShard(torch.zeros(SIZE))
    server = serve(shard)
    client = connect(server.address, shared_memory=True)
    client.pull()
    with pytest.raises(PeerTimeout):
        client.pull(wait_version=1, timeout=0.3)
    shard.push(0, 0, torch.ones(SIZE), kind="delta")
    version, params = client.pull()
    assert version == 1 and torch.equal(params, torch.ones(SIZE))
    assert client.uses_shared_memory and len(server.service.sessions) == 1


@pytest.mark.timeout(60)
def test_which_clients_ask_and_which_servers_offer(serve, connect):
    big = serve(ServerShard(torch.zeros(SIZE)))
    assert connect(big.address, shared_memory="auto").pull() is not None
    port = big.port
    for address, mode, expected in [
        (big.address, "auto", True),
        (f"localhost:{port}", "auto", True),
        (big.address, False, False),
    ]:
        client = connect(address, shared_memory=mode)
        client.pull()
        assert client.uses_shared_memory == expected, (address, mode)
    off = serve(ServerShard(torch.zeros(SIZE)), shared_memory=False)
    client = connect(off.address, shared_memory=True)  # declined: the network it is
    assert client.pull() is not None and not client.uses_shared_memory
    assert off.service.local is None and len(off.service.sessions) == 0
    # 400 bytes: through gRPC not worth a segment, through the session's socket it is
    tiny = serve(ServerShard(torch.zeros(100)))
    client = connect(tiny.address, shared_memory=True)
    assert client.pull() is not None and client.uses_shared_memory
    assert client._session.line is not None and client.bytes_shared_received == 400
    with pytest.raises(ValueError, match="'auto', True or False"):
        connect(big.address, shared_memory="yes")
    with pytest.raises(ValueError, match="'auto', True or False"):
        connect(big.address, shared_memory=1)


@pytest.mark.timeout(60)
def test_sessions_are_capped_and_freed_on_close(serve, connect):
    shard = ServerShard(torch.zeros(SIZE))
    server = serve(shard, max_sessions=1)
    first, second = connect(server.address), connect(server.address)
    for client in (first, second):
        client.push(0, 0, torch.ones(SIZE), kind="delta")
    assert first.uses_shared_memory and not second.uses_shared_memory
    assert torch.equal(second.pull()[1], torch.full((SIZE,), 2.0))
    first.close()
    assert len(server.service.sessions) == 0
    third = connect(server.address)
    third.pull()
    assert third.uses_shared_memory


@pytest.mark.timeout(60)
def test_no_segment_has_a_name_once_mapped_and_stop_frees_the_rest(serve, connect, segments):
    server = serve(ServerShard(torch.zeros(SIZE)))
    client = connect(server.address)
    client.pull()
    assert len(segments) == 1
    assert not os.path.exists(os.path.join(shared.SHM_DIR, segments[0]))  # unlinked once mapped
    server.stop(grace=None)
    with pytest.raises(TransportError):
        client.pull(timeout=2)


@pytest.mark.timeout(60)
def test_a_client_on_another_host_cannot_map_and_says_so(serve, connect, monkeypatch):
    server = serve(ServerShard(torch.zeros(SIZE)))

    def elsewhere(name: str, size: int):
        raise FileNotFoundError(f"no {name} here")  # what another host's /dev/shm says

    monkeypatch.setattr(shared.Segment, "attach", staticmethod(elsewhere))
    with pytest.raises(TransportError, match="another host"):
        connect(server.address, shared_memory=True).pull()
    fallback = connect(server.address, shared_memory="auto")
    assert fallback.pull() is not None and not fallback.uses_shared_memory
    assert len(server.service.sessions) == 0  # both offers were handed back


# -- forged headers on the shared-memory RPCs ---------------------------------


@pytest.fixture
def session(serve, token, stub):
    """A shard, a stub, the token's metadata, and a session opened by hand with its segment."""
    shard = ServerShard(torch.randn(SIZE), optimizer=sgd(0.1))
    server = serve(shard)
    calls, metadata = stub(server.address), (("downpour-token", token),)
    reply = calls.Hello(pb.HelloRequest(shard_id=0, shared_memory=True), metadata=metadata)
    assert reply.size == SIZE and reply.HasField("segment")
    segment = shared.Segment.attach(reply.segment.name, reply.segment.size)
    yield shard, calls, metadata, reply.segment.session, segment
    segment.close()


def push_header(**overrides) -> pb.PushHeader:
    fields = {
        "shard_id": 0,
        "kind": pb.GRADIENT,
        "encoding": pb.DENSE,
        "dtype": pb.FLOAT32,
        "shape": [SIZE],
        "num_chunks": 1,
    }
    return pb.PushHeader(**{**fields, **overrides})


def write(segment: shared.Segment, values: np.ndarray) -> None:
    raw = values.astype("<f4").view(np.uint8)
    np.frombuffer(segment.view, np.uint8, count=raw.size)[:] = raw


def with_value(index: int, value: float) -> np.ndarray:
    values = np.ones(SIZE, np.float32)
    values[index] = value
    return values


FORGED = {
    # name: (values written to the segment, header, reject code, words in the message)
    "nan": (with_value(SIZE - 1, np.nan), push_header(), "NON_FINITE", "1 NaN or infinite"),
    "inf": (with_value(0, np.inf), push_header(), "NON_FINITE", "1 NaN or infinite"),
    "more-than-the-segment": (
        np.ones(SIZE, np.float32),
        push_header(
            encoding=pb.SPARSE,
            index_dtype=pb.INT64,
            nnz=SIZE,  # 12 bytes a pair
        ),
        "BAD_LENGTH",
        "the shared segment holds 80000",
    ),
    "wrong-length": (np.ones(SIZE, np.float32), push_header(shape=[SIZE * 2]), "BAD_LENGTH", ""),
    "wrong-dtype": (np.ones(SIZE, np.float32), push_header(dtype=pb.INT32), "BAD_DTYPE", ""),
    "bad-shard": (np.ones(SIZE, np.float32), push_header(shard_id=2), "BAD_SHARD", ""),
    "two-chunks": (np.ones(SIZE, np.float32), push_header(num_chunks=2), "BAD_CHUNK_COUNT", ""),
    "bad-kind": (np.ones(SIZE, np.float32), push_header(kind=0), "BAD_KIND", ""),
    "future-version": (np.ones(SIZE, np.float32), push_header(version=4), "BAD_VERSION", ""),
    "sparse-out-of-range": (
        np.concatenate([np.ones(2, np.float32), np.array([3, SIZE], "<i4").view(np.float32)]),
        push_header(encoding=pb.SPARSE, index_dtype=pb.INT32, nnz=2),
        "BAD_INDEX",
        "[0, 20000)",
    ),
}


def refused(call) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    code, message = rejection(caught.value)
    return caught.value.code(), code, message


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(FORGED))
def test_a_forged_shared_push_is_refused_and_changes_nothing(session, name):
    shard, calls, metadata, key, segment = session
    values, header, code, words = FORGED[name]
    before = shard.pull()
    write(segment, values)
    request = pb.SharedPushRequest(session=key, seq=1, header=header)
    status, reason, message = refused(lambda: calls.PushShared(request, metadata=metadata))
    assert (status, reason) == (grpc.StatusCode.INVALID_ARGUMENT, code) and words in message
    version, params = shard.pull()
    assert version == before[0] and torch.equal(params, before[1])


@pytest.mark.timeout(60)
def test_sessions_refuse_unknown_keys_old_seqs_and_missing_headers(session):
    shard, calls, metadata, key, segment = session
    write(segment, np.ones(SIZE, np.float32))
    push = pb.SharedPushRequest(session=key, seq=5, header=push_header())
    assert calls.PushShared(push, metadata=metadata).applied
    bad = [
        (pb.SharedPushRequest(session=b"x" * 16, seq=6, header=push_header()), "no such"),
        (pb.SharedPushRequest(session=key, seq=5, header=push_header()), "not above"),  # replay
        (pb.SharedPushRequest(session=key, seq=2, header=push_header()), "not above"),
        (pb.SharedPushRequest(session=key, seq=9), "carries no header"),
    ]
    for request, words in bad:
        _, reason, message = refused(lambda r=request: calls.PushShared(r, metadata=metadata))
        assert reason in ("BAD_SESSION", "BAD_HEADER") and words in message
    pulls = [
        (pb.SharedPullRequest(session=key, seq=3, request=pb.PullRequest()), "BAD_SESSION"),
        (
            pb.SharedPullRequest(session=key, seq=10, request=pb.PullRequest(shard_id=1)),
            "BAD_SHARD",
        ),
        (
            pb.SharedPullRequest(session=key, seq=11, request=pb.PullRequest(dtype=pb.INT64)),
            "BAD_DTYPE",
        ),
    ]
    for request, code in pulls:
        assert refused(lambda r=request: calls.PullShared(r, metadata=metadata))[1] == code
    reply = calls.PullShared(pb.SharedPullRequest(session=key, seq=12), metadata=metadata)
    assert reply.seq == 12 and reply.header.version == 1
    assert shard.status()["pushes"] == 1
    calls.Goodbye(pb.GoodbyeRequest(session=key), metadata=metadata)
    gone = pb.SharedPullRequest(session=key, seq=13)
    assert refused(lambda: calls.PullShared(gone, metadata=metadata))[1] == "BAD_SESSION"
    calls.Goodbye(pb.GoodbyeRequest(session=key), metadata=metadata)  # twice is fine


@pytest.mark.timeout(60)
def test_a_forged_shared_push_pull_is_refused_and_changes_nothing(session):
    shard, calls, metadata, key, segment = session
    write(segment, np.ones(SIZE, np.float32))
    before = shard.pull()

    def request(seq: int, **fields) -> pb.SharedPushPullRequest:
        return pb.SharedPushPullRequest(session=key, seq=seq, **fields)

    forged = [
        (request(1, pull=pb.PullRequest()), "BAD_HEADER", "no push header"),
        (request(2, push=push_header(), pull=pb.PullRequest(shard_id=3)), "BAD_SHARD", ""),
        (request(3, push=push_header(), pull=pb.PullRequest(dtype=pb.INT32)), "BAD_DTYPE", ""),
        (request(4, push=push_header(), pull=pb.PullRequest(average=True)), "BAD_REQUEST",
         "no moving average"),
        (request(5, push=push_header(version=7)), "BAD_VERSION", ""),
        (request(6, push=push_header(shape=[SIZE + 1])), "BAD_LENGTH", ""),
        (request(7, push=push_header(), pull=pb.PullRequest()), "", ""),  # the valid one
        (request(7, push=push_header(), pull=pb.PullRequest()), "BAD_SESSION", "not above"),
        (pb.SharedPushPullRequest(session=b"k" * 16, seq=8, push=push_header()), "BAD_SESSION",
         "no such"),
    ]
    for message, code, words in forged:
        if not code:
            reply = calls.PushPullShared(message, metadata=metadata)
            assert reply.seq == 7 and reply.push.applied and reply.pull.version == 1
            pulled = np.frombuffer(segment.view, "<f4", count=SIZE)
            assert np.array_equal(pulled, shard.pull()[1].numpy())
            before = shard.pull()
            continue
        _, reason, message_text = refused(
            lambda m=message: calls.PushPullShared(m, metadata=metadata)
        )
        assert reason == code and words in message_text
        version, params = shard.pull()
        assert version == before[0] and torch.equal(params, before[1])
    assert shard.status()["pushes"] == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "metadata", [(), (("downpour-token", "not-the-token"),)], ids=["missing", "wrong"]
)
def test_the_shared_rpcs_want_the_token(session, metadata):
    shard, calls, good, key, segment = session
    write(segment, np.ones(SIZE, np.float32))
    requests = [
        lambda: calls.PushShared(
            pb.SharedPushRequest(session=key, seq=1, header=push_header()), metadata=metadata
        ),
        lambda: calls.PullShared(pb.SharedPullRequest(session=key, seq=2), metadata=metadata),
        lambda: calls.PushPullShared(
            pb.SharedPushPullRequest(session=key, seq=3, push=push_header()), metadata=metadata
        ),
        lambda: calls.Goodbye(pb.GoodbyeRequest(session=key), metadata=metadata),
    ]
    for call in requests:
        status, reason, _ = refused(call)
        assert (status, reason) == (grpc.StatusCode.UNAUTHENTICATED, "BAD_TOKEN")
    assert shard.status()["pushes"] == 0
    # Nothing was consumed: the session still takes seq 1.
    push = pb.SharedPushRequest(session=key, seq=1, header=push_header())
    assert calls.PushShared(push, metadata=good).applied


@pytest.mark.timeout(60)
def test_a_server_without_shared_memory_refuses_sessions(serve, token, stub):
    server = serve(ServerShard(torch.zeros(SIZE)), shared_memory=False)
    calls, metadata = stub(server.address), (("downpour-token", token),)
    reply = calls.Hello(pb.HelloRequest(shard_id=0, shared_memory=True), metadata=metadata)
    assert not reply.HasField("segment") and reply.size == SIZE
    request = pb.SharedPullRequest(session=b"k" * 16, seq=1)
    _, reason, message = refused(lambda: calls.PullShared(request, metadata=metadata))
    assert reason == "BAD_SESSION" and "no such session" in message


# -- the pieces, without a server ----------------------------------------------


def test_a_session_serves_one_call_at_a_time():
    sessions = shared.ServerSessions(4096)
    try:
        key, _ = sessions.open()
        with sessions.use(key, 1):
            busy = sessions.use(key, 2)
            with pytest.raises(Reject, match="another call"):
                busy.__enter__()
        with sessions.use(key, 3) as region:
            assert len(region) == 4096
        assert sessions.close(key) and not sessions.close(key)
    finally:
        sessions.close_all()


def test_the_assembly_copies_the_segment_before_checking_it():
    region = memoryview(bytearray(np.ones(4, np.float32).tobytes()))
    header = pb.PushHeader(
        shard_id=0, kind=pb.DELTA, encoding=pb.DENSE, dtype=pb.FLOAT32, shape=[4], num_chunks=1
    )
    assembly = PushAssembly(0, 4, BufferPool(4))
    assembly.feed_region(header, region)
    region[:4] = np.float32(np.nan).tobytes()  # a peer rewriting the segment afterwards
    _, update = assembly.finish()
    assert torch.equal(update, torch.ones(4))


def test_attach_maps_only_private_downpour_segments(tmp_path):
    made = shared.Segment.create(4096)
    try:
        with pytest.raises(ValueError, match="not the name"):
            shared.Segment.attach("../../etc/passwd", 4096)
        with pytest.raises(ValueError, match="not the name"):
            shared.Segment.attach("downpour-zz", 4096)
        with pytest.raises(ValueError, match="4095 bytes"):
            shared.Segment.attach(made.name, 4095)
        os.chmod(os.path.join(shared.SHM_DIR, made.name), 0o644)
        with pytest.raises(ValueError, match="private regular file"):
            shared.Segment.attach(made.name, 4096)
        os.chmod(os.path.join(shared.SHM_DIR, made.name), 0o600)
        other = shared.Segment.attach(made.name, 4096)
        other.view[:3] = b"abc"
        assert bytes(made.view[:3]) == b"abc"
        other.close()
    finally:
        made.unlink()
        made.close()
    assert not os.path.exists(os.path.join(shared.SHM_DIR, made.name))


@pytest.mark.parametrize(
    "address, loopback",
    [
        ("127.0.0.1:50051", True),
        ("127.3.4.5:1", True),
        ("localhost:7", True),
        ("[::1]:7", True),
        ("unix:/tmp/socket", True),
        ("10.0.0.2:7", False),
        ("example.com:443", False),
        ("[2001:db8::1]:7", False),
    ],
)
def test_is_loopback(address, loopback):
    assert shared.is_loopback(address) == loopback


def test_shard_client_checks_shared_memory_eagerly():
    with pytest.raises(ValueError, match="'auto', True or False"):
        ShardClient("127.0.0.1:1", "token", 0, shared_memory="always")
