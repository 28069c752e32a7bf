"""TCP sessions: tensors raw on a connection of the session's, with the same answers and
refusals as gRPC; forged, short and stray requests refused; a broken connection ends the
session.

The raw-socket tests speak the framing as ``downpour.proto`` describes it, not through
:mod:`downpour.transport.tcp`, as a client written from the .proto alone would. The round-trip,
validation and TLS modules run again here with every client on a TCP session (the
``tcp_session`` fixture below overrides conftest's).
"""

from __future__ import annotations

import socket
import ssl
import struct
import time

import grpc
import numpy as np
import pytest
import torch

from downpour.errors import PeerUnavailable, StaleUpdate
from downpour.flat import SparseUpdate
from downpour.server import BoundedStaleness, ServerShard
from downpour.transport import Refused, Security, tcp
from downpour.transport import downpour_pb2 as pb
from tests.integration.transport.test_local_socket import receive, refusal
from tests.integration.transport.test_roundtrip import *  # noqa: F403 - run again over TCP
from tests.integration.transport.test_shared import awkward, bits
from tests.integration.transport.test_tls import *  # noqa: F403
from tests.integration.transport.test_validation import *  # noqa: F403
from tests.optimizers import sgd
from tests.waiting import wait_until

SIZE = 20_000  # 80 KB: several gRPC chunks' worth of small ones, one of a session's calls

pytestmark = pytest.mark.integration


@pytest.fixture
def tcp_session() -> bool:
    return True


@pytest.fixture
def grpc_session_calls(monkeypatch) -> list[str]:
    """The session calls any client made through gRPC (none should, in a TCP session)."""
    from downpour.transport.channel import Stubs

    made: list[str] = []
    original = Stubs.__init__

    def counting_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for name in ("push_shared", "pull_shared", "push_pull_shared", "push", "pull",
                     "push_small", "pull_small", "push_pull"):
            stub = getattr(self, name)

            def counted(*a, _stub=stub, _name=name, **kw):
                made.append(_name)
                return _stub(*a, **kw)

            setattr(self, name, counted)

    monkeypatch.setattr(Stubs, "__init__", counting_init)
    return made


@pytest.mark.timeout(60)
def test_tensors_of_any_size_go_raw_and_equal_grpc(serve, connect, grpc_session_calls):
    initial = awkward(SIZE)
    shards = [ServerShard(initial, optimizer=sgd(0.5)) for _ in range(2)]
    over_grpc = connect(serve(shards[0]).address, tcp_session=False)
    over_tcp = connect(serve(shards[1]).address)
    gradient = awkward(SIZE)
    for client in (over_grpc, over_tcp):
        client.push(0, 0, torch.ones(SIZE))
    answers = [client.push_pull(0, 1, gradient) for client in (over_grpc, over_tcp)]
    (grpc_result, grpc_version, grpc_params), (result, version, params) = answers
    assert result == grpc_result and version == grpc_version == 2
    assert torch.equal(bits(params), bits(grpc_params))
    pulled = [client.pull()[1] for client in (over_grpc, over_tcp)]
    assert torch.equal(bits(pulled[0]), bits(pulled[1]))
    sparse = SparseUpdate(torch.tensor([3, SIZE - 1]), torch.tensor([1.5, -2.0]), SIZE)
    for client in (over_grpc, over_tcp):
        client.push(0, 2, sparse)
    assert torch.equal(bits(over_grpc.pull()[1]), bits(over_tcp.pull()[1]))
    assert over_tcp.uses_tcp_session and not over_tcp.uses_shared_memory
    assert not over_grpc.uses_tcp_session
    grpc_made = list(grpc_session_calls)
    assert {"push_small", "push_pull", "pull_small"} <= set(grpc_made)  # unary calls of gRPC
    grpc_session_calls.clear()
    sent, received = over_tcp.bytes_sent, over_tcp.bytes_received
    over_tcp.push_pull(0, 3, gradient)
    assert grpc_session_calls == []  # every call of the TCP client went through its connection
    # the bytes on the wire: the tensor each way, and headers of a few dozen bytes
    assert 4 * SIZE < over_tcp.bytes_sent - sent < 4 * SIZE + 200
    assert 4 * SIZE < over_tcp.bytes_received - received < 4 * SIZE + 200
    assert over_tcp.bytes_shared == 0


@pytest.mark.timeout(60)
def test_a_refusal_comes_back_as_through_grpc_and_keeps_the_session(serve, connect):
    policy = dict(optimizer=sgd(0.1), policy=BoundedStaleness(max_staleness=0))
    clients = [
        connect(serve(ServerShard(torch.zeros(SIZE), **policy)).address, tcp_session=flag)
        for flag in (False, True)
    ]
    errors = []
    for client in clients:
        client.push(0, 0, torch.ones(SIZE))
        with pytest.raises(StaleUpdate) as caught:
            client.push_pull(1, 0, torch.ones(SIZE))
        errors.append(str(caught.value).replace(clients[0].address, clients[1].address))
    assert errors[0] == errors[1]
    session = clients[1]._session
    with pytest.raises(Refused, match="NON_FINITE"):
        clients[1].push(0, 1, torch.full((SIZE,), float("nan")))
    assert clients[1].push_pull(1, 1, torch.ones(SIZE))[1] == 2
    assert clients[1]._session is session


@pytest.mark.timeout(60)
def test_a_pull_that_waits_for_a_version_goes_through_grpc(serve, connect, grpc_session_calls):
    client = connect(serve(ServerShard(torch.zeros(SIZE), optimizer=sgd(0.1))).address)
    client.pull()
    grpc_session_calls.clear()
    version, params = client.pull(wait_version=0, timeout=10)
    assert version == 0 and torch.equal(params, torch.zeros(SIZE))
    assert grpc_session_calls == ["pull_small"] and client.uses_tcp_session


@pytest.mark.timeout(60)
def test_a_server_without_tcp_sessions_leaves_grpc(serve, connect):
    server = serve(ServerShard(torch.zeros(SIZE)), tcp_sessions=False)
    client = connect(server.address)
    assert client.pull() is not None and not client.uses_tcp_session
    assert server.service.tcp is None


# -- the framing, spoken by hand ----------------------------------------------


def push_header(version: int) -> pb.PushHeader:
    return pb.PushHeader(shard_id=0, version=version, kind=pb.GRADIENT, encoding=pb.DENSE,
                         dtype=pb.FLOAT32, shape=[SIZE], num_chunks=1)


def ask(conn: socket.socket, method: int, body: bytes, data: bytes = b"",
        declared: int | None = None) -> tuple[int, int, bytes, bytes]:
    """One call as downpour.proto frames it: (kind, gRPC status code, answer, answer's data)."""
    size = len(data) if declared is None else declared
    conn.sendall(struct.pack("<IBQ", len(body), method, size) + body + data)
    length, kind, status, tail = struct.unpack("<IBBQ", receive(conn, 14))
    return kind, status, receive(conn, length), receive(conn, tail)


def closed(conn: socket.socket) -> bool:
    """Whether the server closed ``conn`` (within its timeout)."""
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:  # closed with bytes of ours unread
        return True
    except TimeoutError:
        return False


@pytest.fixture
def raw(serve, token, stub):
    """A shard, a TCP session opened by hand through gRPC's Hello, and a raw connection to it."""
    shard = ServerShard(torch.randn(SIZE), optimizer=sgd(0.1))
    server = serve(shard)
    calls, metadata = stub(server.address), (("downpour-token", token),)
    reply = calls.Hello(pb.HelloRequest(shard_id=0, tcp_session=True), metadata=metadata)
    offer = reply.segment
    assert offer.port and not offer.name and not offer.socket and offer.size == 4 * SIZE
    conn = socket.create_connection(("127.0.0.1", offer.port), timeout=10)
    yield shard, server, offer, conn, calls, metadata
    conn.close()


@pytest.mark.timeout(60)
def test_a_client_from_the_proto_alone_pushes_and_pulls(raw):
    shard, server, offer, conn, _, _ = raw
    before = shard.snapshot(lambda version, view: view.clone())
    gradient = awkward(SIZE)
    request = pb.SharedPushPullRequest(
        session=offer.session, seq=1, push=push_header(version=0), pull=pb.PullRequest()
    )
    kind, _, answer, data = ask(
        conn, 3, request.SerializeToString(), gradient.numpy().tobytes()
    )
    assert kind == 0, pb.Reject.FromString(answer)
    reply = pb.SharedPushPullReply.FromString(answer)
    assert reply.seq == 1 and reply.push.applied and reply.pull.version == 1
    pulled = torch.from_numpy(np.frombuffer(data, dtype=np.float32).copy())
    assert list(reply.pull.shape) == [SIZE] and len(data) == 4 * SIZE
    assert torch.allclose(pulled, before - 0.1 * gradient)
    pull = pb.SharedPullRequest(session=offer.session, seq=2, request=pb.PullRequest())
    kind, _, answer, data = ask(conn, 2, pull.SerializeToString())
    assert kind == 0 and torch.equal(torch.from_numpy(np.frombuffer(data, np.float32).copy()),
                                     pulled)


@pytest.mark.timeout(60)
def test_a_push_short_of_its_header_is_refused_and_the_connection_kept(raw):
    shard, server, offer, conn, _, _ = raw
    header = push_header(version=0)
    request = pb.SharedPushRequest(session=offer.session, seq=1, header=header)
    answer = ask(conn, 1, request.SerializeToString(), b"\0" * (4 * SIZE - 4))
    code, reason, message = refusal(answer[:3])
    assert reason == "BAD_LENGTH" and shard.status()["version"] == 0
    request = pb.SharedPushRequest(session=offer.session, seq=2, header=header)
    kind, _, answer, _ = ask(conn, 1, request.SerializeToString(), b"\0" * (4 * SIZE))
    assert kind == 0 and pb.PushReply.FromString(answer).applied


@pytest.mark.timeout(60)
def test_forged_and_stray_requests_close_the_connection(raw, serve, token, stub, monkeypatch):
    shard, server, offer, conn, calls, metadata = raw
    port = offer.port
    pull = pb.SharedPullRequest(session=b"forged-key-16byt", seq=1, request=pb.PullRequest())
    stranger = socket.create_connection(("127.0.0.1", port), timeout=10)
    stranger.sendall(struct.pack("<IBQ", pull.ByteSize(), 2, 0) + pull.SerializeToString())
    assert closed(stranger), "a key the server never gave"
    # the real key binds the first connection; a second one naming it is closed
    pull = pb.SharedPullRequest(session=offer.session, seq=1, request=pb.PullRequest())
    assert ask(conn, 2, pull.SerializeToString())[0] == 0
    second = socket.create_connection(("127.0.0.1", port), timeout=10)
    pull.seq = 2
    second.sendall(struct.pack("<IBQ", pull.ByteSize(), 2, 0) + pull.SerializeToString())
    assert closed(second)
    # more data than the session holds, or a frame over 64 KiB: closed, and the session ends
    pull.seq = 3
    conn.sendall(struct.pack("<IBQ", pull.ByteSize(), 2, 4 * SIZE + 1) + pull.SerializeToString())
    assert closed(conn)
    wait_until(lambda: len(server.service.sessions) == 0, timeout=10)
    # gRPC refuses a TCP session's calls: its buffer is filled only through its connection
    reply = calls.Hello(pb.HelloRequest(shard_id=0, tcp_session=True), metadata=metadata)
    request = pb.SharedPullRequest(session=reply.segment.session, seq=1, request=pb.PullRequest())
    with pytest.raises(grpc.RpcError) as caught:
        calls.PullShared(request, metadata=metadata)
    assert "through its TCP connection" in caught.value.details()
    # a connection that sends nothing is closed once its first request is overdue
    monkeypatch.setattr(tcp, "FIRST_REQUEST_S", 0.3)
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    started = time.monotonic()
    assert closed(idle) and time.monotonic() - started < 5


@pytest.mark.timeout(60)
def test_a_client_whose_connection_breaks_fails_the_call_and_starts_afresh(serve, connect):
    server = serve(ServerShard(torch.zeros(SIZE), optimizer=sgd(0.1)))
    client = connect(server.address)
    client.push(0, 0, torch.ones(SIZE))
    assert client.uses_tcp_session and len(server.service.sessions) == 1
    server.service.tcp.close()  # every connection of the server's ends
    with pytest.raises(PeerUnavailable):
        client.push(0, 1, torch.ones(SIZE))
    wait_until(lambda: len(server.service.sessions) == 0, timeout=10)
    # the session was dropped; the next call asks Hello again, and the server has no port now
    assert client.push(0, 1, torch.ones(SIZE)).version == 2


@pytest.mark.timeout(60)
def test_a_client_that_cannot_reach_the_port_uses_grpc(serve, connect, monkeypatch):
    server = serve(ServerShard(torch.zeros(SIZE), optimizer=sgd(0.1)))

    def refuse(*args, **kwargs):
        raise ConnectionRefusedError("firewalled")

    monkeypatch.setattr(tcp.socket, "create_connection", refuse)
    client = connect(server.address)
    assert client.push(0, 0, torch.ones(SIZE)).applied and not client.uses_tcp_session
    wait_until(lambda: len(server.service.sessions) == 0, timeout=10)  # offer handed back


@pytest.mark.timeout(60)
def test_a_tls_server_keeps_its_tcp_sessions_in_tls(serve, connect, self_signed):
    certificate, key = self_signed
    server = serve(
        ServerShard(torch.zeros(SIZE), optimizer=sgd(0.1)),
        security=Security.with_tls(certificate_chain=certificate, private_key=key),
    )
    client = connect(server.address, security=Security.with_tls(root_certificates=certificate))
    assert client.push(0, 0, torch.ones(SIZE)).applied and client.uses_tcp_session
    assert isinstance(client._session.line._conn, ssl.SSLSocket)
    plain = socket.create_connection(("127.0.0.1", server.service.tcp.port), timeout=10)
    pull = pb.SharedPullRequest(session=client._session.key, seq=99, request=pb.PullRequest())
    plain.sendall(struct.pack("<IBQ", pull.ByteSize(), 2, 0) + pull.SerializeToString())
    assert closed(plain), "plaintext on a TLS port"
    assert torch.allclose(client.pull()[1], torch.full((SIZE,), -0.1))


@pytest.mark.timeout(60)
def test_mutual_tls_tcp_sessions_want_the_client_certificate(mutual_server, connect, pki):
    security = Security.with_tls(root_certificates=pki.ca, certificate_chain=pki.client_cert,
                                 private_key=pki.client_key)
    client = connect(mutual_server.address, security=security)
    assert client.push(0, 0, torch.ones(1000)).applied and client.uses_tcp_session
    context = ssl.create_default_context(cadata=pki.ca.decode())
    port = mutual_server.service.tcp.port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw_conn:
        try:
            with context.wrap_socket(raw_conn, server_hostname="127.0.0.1") as tls:
                tls.sendall(struct.pack("<IBQ", 0, 2, 0))
                assert tls.recv(1) == b""
        except (ssl.SSLError, ConnectionResetError):
            pass  # refused in the handshake: no certificate of its CA
    assert mutual_server.service.shard.pull()[0] == 1
