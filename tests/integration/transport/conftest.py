"""Real gRPC on 127.0.0.1, server and client in this process, port 0."""

from __future__ import annotations

import os

import grpc
import pytest

from downpour.server import ServerShard
from downpour.transport import ShardClient, downpour_pb2_grpc, new_token, serve_shard, shared


@pytest.fixture
def token() -> str:
    return new_token()


@pytest.fixture
def serve(token, segments):
    """``serve(shard, **kwargs) -> ShardServer``; every server is stopped at teardown.

    After which no shared-memory segment of theirs may be left (see ``segments``).
    """
    servers = []

    def start(shard: ServerShard, **kwargs):
        kwargs.setdefault("token", token)
        server = serve_shard(shard, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=None)


@pytest.fixture
def shared_memory() -> bool:
    """How ``connect``'s clients move tensors: the network, unless a module overrides this."""
    return False


@pytest.fixture
def tcp_session() -> bool:
    """Whether ``connect``'s clients off shared memory ask for TCP sessions: gRPC alone, unless a
    module overrides this (``test_tcp_session.py`` runs other modules' tests over TCP sessions)."""
    return False


@pytest.fixture
def connect(token, shared_memory, tcp_session):
    """``connect(address, shard_id=0, **kwargs) -> ShardClient``; closed at teardown."""
    clients = []

    def open_client(address: str, shard_id: int = 0, **kwargs):
        kwargs.setdefault("timeout", 20.0)
        kwargs.setdefault("shared_memory", shared_memory)
        kwargs.setdefault("tcp_session", tcp_session)
        client = ShardClient(address, kwargs.pop("token", token), shard_id, **kwargs)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()


@pytest.fixture
def segments(monkeypatch):
    """The names of the shared-memory segments made during the test; none may be left after it.

    Recorded where they are made, so segments of other processes on this host do not count.
    """
    made: list[str] = []
    create = shared.Segment.create.__func__

    def recording(cls, size: int):
        segment = create(cls, size)
        made.append(segment.name)
        return segment

    monkeypatch.setattr(shared.Segment, "create", classmethod(recording))
    yield made
    left = [name for name in made if os.path.exists(os.path.join(shared.SHM_DIR, name))]
    assert not left, f"segments left in {shared.SHM_DIR}: {left}"


@pytest.fixture
def stub():
    """``stub(address) -> ParameterServerStub``: the generated stub, for hand-built messages."""
    channels = []

    def make(address: str):
        channel = grpc.insecure_channel(address)
        channels.append(channel)
        return downpour_pb2_grpc.ParameterServerStub(channel)

    yield make
    for channel in channels:
        channel.close()
