"""A peer that dies or goes silent is noticed within the detection window, not at the call's deadline."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
import torch

from downpour.errors import PeerUnavailable
from downpour.server import ServerShard
from downpour.transport import ShardClient, new_token, serve_shard

pytestmark = pytest.mark.integration


def _serve(token: str, conn) -> None:
    server = serve_shard(ServerShard(torch.zeros(8), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1)),
                         host="127.0.0.1", port=0, token=token)
    conn.send(server.address)
    server.wait_for_termination()


@pytest.fixture
def server_process():
    """A shard served by a process of its own: ``(process, address, token)``; killed at teardown."""
    token = new_token()
    receiver, sender = mp.Pipe(duplex=False)
    process = mp.get_context("spawn").Process(target=_serve, args=(token, sender), daemon=True)
    process.start()
    try:
        assert receiver.poll(60), "the server process did not start"
        yield process, receiver.recv(), token
    finally:
        if process.is_alive():
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
        process.join(10)


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_a_long_call_to_a_peer_that_goes_silent_or_dies_fails_within_the_window(server_process, fault):
    process, address, token = server_process
    client = ShardClient(address, token, 0, timeout=60.0, detect_seconds=4.0, shared_memory=False)
    try:
        client.pull()  # connected; the next pull waits for a version that never comes
        # The fault strikes while that pull waits: a frozen process still holds its connection open.
        threading.Timer(0.5, os.kill, (process.pid, getattr(signal, fault))).start()
        started = time.monotonic()
        with pytest.raises(PeerUnavailable, match="shard 0 at .* is unavailable"):
            client.pull(wait_version=10**6)
        waited = time.monotonic() - started
        # Pings every 2 s, each given 2 s to be answered: measured 4.1 s for a frozen peer; a dead one
        # resets the connection at once. Without pings the pull would wait out its 60 s deadline.
        assert waited < 8.0, waited
    finally:
        client.close()
