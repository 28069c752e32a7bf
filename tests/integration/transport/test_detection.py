"""A peer that dies or goes silent is noticed by the detection pings, not at the call's deadline.

How soon (the detection window against the deadline) is a measurement:
``benchmarks/transport.py --parts detection`` prints it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading

import pytest
import torch

from downpour.errors import PeerUnavailable
from downpour.server import ServerShard
from downpour.transport import ShardClient, new_token, serve_shard
from tests.waiting import wait_until, waiting_pulls

pytestmark = pytest.mark.integration


def _serve(token: str, conn) -> None:
    shard = ServerShard(torch.zeros(8), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    server = serve_shard(shard, host="127.0.0.1", port=0, token=token)
    conn.send(server.address)
    # Say when a pull waits on the shard, so the test's fault strikes in the middle of that call.
    wait_until(lambda: waiting_pulls(shard), timeout=120, what="a pull waiting on the shard")
    conn.send("waiting")
    server.wait_for_termination()


@pytest.fixture
def server_process():
    """A shard served by a process of its own: ``(process, address, token, receiver)``; killed at teardown.

    ``receiver`` gets ``"waiting"`` once a pull waits on the shard.
    """
    token = new_token()
    receiver, sender = mp.Pipe(duplex=False)
    process = mp.get_context("spawn").Process(target=_serve, args=(token, sender), daemon=True)
    process.start()
    try:
        assert receiver.poll(60), "the server process did not start"
        yield process, receiver.recv(), token, receiver
    finally:
        if process.is_alive():
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
        process.join(10)


# The client's deadline is 60 s; a hang guard well past it. Without pings a frozen peer's pull would
# run out that deadline and fail as a PeerTimeout, not as the PeerUnavailable asked for below.
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_a_long_call_to_a_peer_that_goes_silent_or_dies_fails_as_unavailable(server_process, fault):
    process, address, token, receiver = server_process
    client = ShardClient(address, token, 0, timeout=60.0, detect_seconds=4.0, shared_memory=False)

    struck = threading.Event()

    def strike() -> None:
        # A frozen process still holds its connection open: only the pings can tell.
        if receiver.poll(60) and receiver.recv() == "waiting":
            os.kill(process.pid, getattr(signal, fault))
            struck.set()

    striker = threading.Thread(target=strike, daemon=True)
    try:
        client.pull()  # connected; the next pull waits for a version that never comes
        striker.start()
        with pytest.raises(PeerUnavailable, match="shard 0 at .* is unavailable"):
            client.pull(wait_version=10**6)
        striker.join(timeout=10)
        assert struck.is_set()  # the fault struck while the pull waited on the shard
    finally:
        client.close()
