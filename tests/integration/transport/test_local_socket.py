"""A shared-memory session's calls through its Unix socket: the same answers and refusals as
through gRPC, forged frames refused, and a server that goes away noticed.

The raw-socket tests speak the framing as ``downpour.proto`` describes it, not through
:mod:`downpour.transport.local`, as a client written from the .proto alone would.
"""

from __future__ import annotations

import os
import socket
import struct

import grpc
import numpy as np
import pytest
import torch

from downpour.errors import PeerUnavailable, StaleUpdate
from downpour.server import BoundedStaleness, ServerShard
from downpour.transport import downpour_pb2 as pb
from downpour.transport import shared
from tests.integration.transport.test_shared import SIZE, awkward, bits, push_header, write
from tests.optimizers import sgd

pytestmark = pytest.mark.integration


@pytest.fixture
def twins(serve, connect):
    """Two equal shards, one reached over the network, one through its session's socket; the
    latter's gRPC session stubs fail the test if called."""

    def make(initial: torch.Tensor, **kwargs):
        shards = [ServerShard(initial, **kwargs) for _ in range(2)]
        network = connect(serve(shards[0]).address, shared_memory=False)
        local = connect(serve(shards[1]).address, shared_memory=True)
        grpc_calls: list[str] = []
        for name in ("push_shared", "pull_shared", "push_pull_shared"):
            stub = getattr(local._rpc, name)

            def counted(*args, _stub=stub, _name=name, **kw):
                grpc_calls.append(_name)
                return _stub(*args, **kw)

            setattr(local._rpc, name, counted)
        return shards, network, local, grpc_calls

    return make


@pytest.mark.timeout(60)
def test_the_session_calls_go_through_the_socket_and_equal_the_network(twins):
    shards, network, local, grpc_calls = twins(awkward(SIZE), optimizer=sgd(0.5))
    for client in (network, local):
        client.push(0, 0, torch.ones(SIZE))
    gradient = awkward(SIZE)
    answers = [client.push_pull(0, 1, gradient) for client in (network, local)]
    (net_result, net_version, net_params), (result, version, params) = answers
    assert result == net_result and version == net_version == 2
    assert torch.equal(bits(params), bits(net_params))
    pulled = [client.pull()[1] for client in (network, local)]
    assert torch.equal(bits(pulled[0]), bits(pulled[1]))
    assert local.uses_shared_memory and local._session.line is not None
    assert grpc_calls == []  # all three through the socket
    assert local.bytes_shared_sent == 2 * 4 * SIZE and local.bytes_shared_received == 2 * 4 * SIZE
    sent, received = local.bytes_sent, local.bytes_received
    local.push_pull(0, 2, gradient)
    assert 0 < local.bytes_sent - sent < 200 and 0 < local.bytes_received - received < 200


@pytest.mark.timeout(60)
def test_a_refusal_through_the_socket_raises_what_grpc_raises_and_keeps_the_session(twins):
    shards, network, local, grpc_calls = twins(
        torch.zeros(SIZE), optimizer=sgd(0.1), policy=BoundedStaleness(max_staleness=0)
    )
    for client in (network, local):
        client.push(0, 0, torch.ones(SIZE))
    errors = []
    for client in (network, local):
        with pytest.raises(StaleUpdate) as caught:
            client.push_pull(1, 0, torch.ones(SIZE))  # computed on version 0, the shard is at 1
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "1 versions ago" in errors[1]
    session = local._session
    assert local.push_pull(1, 1, torch.ones(SIZE))[1] == 2
    assert local._session is session and grpc_calls == []  # refused, answered: kept


@pytest.mark.timeout(60)
def test_a_pull_that_waits_for_a_version_goes_through_grpc(twins):
    shards, network, local, grpc_calls = twins(torch.zeros(SIZE), optimizer=sgd(0.1))
    version, params = local.pull(wait_version=0, timeout=10)
    assert version == 0 and torch.equal(params, torch.zeros(SIZE))
    assert grpc_calls == ["pull_shared"]


def ask(conn: socket.socket, method: int, body: bytes) -> tuple[int, int, bytes]:
    """One call as downpour.proto frames it: (kind, gRPC status code, answer bytes)."""
    conn.sendall(struct.pack("<IB", len(body), method) + body)
    length, kind, status = struct.unpack("<IBB", receive(conn, 6))
    return kind, status, receive(conn, length)


def receive(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        assert chunk, "the server closed the connection"
        data += chunk
    return data


def unix_address(name: str) -> str:
    """As downpour.proto says: "@name" is name in the abstract namespace."""
    assert name.startswith("@downpour-"), name
    return "\0" + name[1:]


@pytest.fixture
def raw(serve, token, stub):
    """A shard, a session opened by hand through gRPC's Hello, and a raw connection to its
    socket."""
    shard = ServerShard(torch.randn(SIZE), optimizer=sgd(0.1))
    server = serve(shard)
    calls, metadata = stub(server.address), (("downpour-token", token),)
    reply = calls.Hello(pb.HelloRequest(shard_id=0, shared_memory=True), metadata=metadata)
    assert reply.segment.socket, "a server with sessions names its socket"
    segment = shared.Segment.attach(reply.segment.name, reply.segment.size)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect(unix_address(reply.segment.socket))
    yield shard, server, reply.segment, segment, conn
    conn.close()
    segment.close()


def refusal(answer: tuple[int, int, bytes]) -> tuple[grpc.StatusCode, str, str]:
    kind, status, body = answer
    assert kind == 1, "a refusal carries a Reject"
    reject = pb.Reject.FromString(body)
    code = next(c for c in grpc.StatusCode if c.value[0] == status)
    return code, pb.RejectCode.Name(reject.code), reject.message


@pytest.mark.timeout(60)
def test_a_client_from_the_proto_alone_trains_through_the_socket(raw):
    shard, _, offer, segment, conn = raw
    before = shard.pull()[1]
    write(segment, np.ones(SIZE, np.float32))
    request = pb.SharedPushPullRequest(
        session=offer.session, seq=1, push=push_header(), pull=pb.PullRequest(shard_id=0)
    )
    kind, status, body = ask(conn, 3, request.SerializeToString())
    assert (kind, status) == (0, 0)
    reply = pb.SharedPushPullReply.FromString(body)
    assert reply.seq == 1 and reply.push.applied and reply.pull.version == 1
    params = np.frombuffer(segment.view, "<f4", count=SIZE)
    assert np.allclose(params, (before - 0.1).numpy())
    assert torch.equal(torch.from_numpy(params.copy()), shard.pull()[1])


@pytest.mark.timeout(60)
def test_forged_calls_through_the_socket_are_refused_and_change_nothing(raw):
    shard, _, offer, segment, conn = raw
    before = shard.pull()
    write(segment, np.full(SIZE, np.nan, np.float32))
    cases = [
        # (method, request bytes, status, reject code)
        (1, b"\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED"),
        (1, pb.SharedPushRequest(session=b"x" * 16, seq=1, header=push_header())
         .SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT, "BAD_SESSION"),
        (1, pb.SharedPushRequest(session=offer.session, seq=1, header=push_header())
         .SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT, "NON_FINITE"),
        (1, pb.SharedPushRequest(session=offer.session, seq=1, header=push_header())
         .SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT, "BAD_SESSION"),  # seq reused
        (2, pb.SharedPullRequest(session=offer.session, seq=5,
                                 request=pb.PullRequest(shard_id=0, wait_version=3))
         .SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT, "BAD_REQUEST"),
        (2, pb.SharedPullRequest(session=offer.session, seq=6, request=pb.PullRequest(shard_id=4))
         .SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT, "BAD_SHARD"),
    ]
    for method, body, status, code in cases:
        got_status, got_code, message = refusal(ask(conn, method, body))
        assert (got_status, got_code) == (status, code), message
    version, params = shard.pull()
    assert version == before[0] and torch.equal(params, before[1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("frame", [struct.pack("<IB", 3, 9) + b"abc",
                                   struct.pack("<IB", 1 << 20, 3)])
def test_an_unknown_method_or_an_oversized_frame_closes_the_connection(raw, frame):
    shard, *_, conn = raw
    conn.sendall(frame)
    try:
        assert conn.recv(16) == b""  # closed, nothing answered
    except ConnectionResetError:
        pass  # closed with the frame's rest unread
    assert shard.status()["pushes"] == 0


@pytest.mark.timeout(60)
def test_the_socket_leaves_no_file_and_goes_with_the_server(raw):
    _, server, offer, _, conn = raw
    server.stop(grace=None)
    assert conn.recv(16) == b""  # the server ended the connection
    late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(ConnectionRefusedError):
        late.connect(unix_address(offer.socket))
    late.close()


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to try the socket as another user")
def test_another_user_gets_no_answer_from_the_socket(raw):
    shard, _, offer, _, _ = raw
    request = pb.SharedPullRequest(session=offer.session, seq=1, request=pb.PullRequest(shard_id=0))
    body = request.SerializeToString()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, then ask with the right session key
        code = 2
        try:
            os.setgid(65534)
            os.setuid(65534)
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(5)
            probe.connect(unix_address(offer.socket))
            probe.sendall(struct.pack("<IB", len(body), 2) + body)
            code = 0 if probe.recv(16) == b"" else 1
        except (ConnectionResetError, BrokenPipeError):
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "a process of another user got an answer"
    assert shard.status()["pulls"] == 0


@pytest.mark.timeout(60)
def test_a_server_that_goes_away_fails_the_socket_call_as_unavailable(serve, connect):
    shard = ServerShard(torch.zeros(SIZE), optimizer=sgd(0.1))
    server = serve(shard)
    client = connect(server.address, shared_memory=True, timeout=5.0)
    client.push_pull(0, 0, torch.ones(SIZE))
    assert client._session.line is not None
    server.stop(grace=None)
    with pytest.raises(PeerUnavailable):
        client.push_pull(0, 1, torch.ones(SIZE))
    assert client._session is None  # dropped: the next call asks Hello again
    with pytest.raises(PeerUnavailable):
        client.push_pull(0, 1, torch.ones(SIZE))
