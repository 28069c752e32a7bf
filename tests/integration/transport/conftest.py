"""Real gRPC on 127.0.0.1, server and client in this process, port 0."""

from __future__ import annotations

import grpc
import pytest

from downpour.server import ServerShard
from downpour.transport import ShardClient, downpour_pb2_grpc, new_token, serve_shard


@pytest.fixture
def token() -> str:
    return new_token()


@pytest.fixture
def serve(token):
    """``serve(shard, **kwargs) -> ShardServer``; every server is stopped at teardown."""
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
def connect(token):
    """``connect(address, shard_id=0, **kwargs) -> ShardClient``; closed at teardown."""
    clients = []

    def open_client(address: str, shard_id: int = 0, **kwargs):
        kwargs.setdefault("timeout", 20.0)
        client = ShardClient(address, kwargs.pop("token", token), shard_id, **kwargs)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()


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
