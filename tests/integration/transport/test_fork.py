"""A process that forks while its gRPC threads are busy (a worker starting its DataLoader
processes mid-run) runs no gRPC fork handlers: gRPC's core would run half of them, which can crash
the child."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, threading, time
    import downpour  # before gRPC starts: it turns gRPC's fork handlers off
    import grpc
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(2))
    handler = grpc.method_handlers_generic_handler(
        "t.T", {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    echo = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary("/t.T/Echo")
    stop = threading.Event()

    def calls():
        while not stop.is_set():
            echo(b"x", timeout=10)

    caller = threading.Thread(target=calls)
    caller.start()
    time.sleep(0.2)
    failed = 0
    for _ in range(20):
        pid = os.fork()
        if pid == 0:
            sum(range(10_000))
            os._exit(0)
        failed += os.waitpid(pid, 0)[1] != 0
    stop.set()
    caller.join(timeout=10)
    server.stop(grace=None)
    print("failed children:", failed)
""")


def test_forking_during_grpc_calls_runs_no_grpc_fork_handlers():
    env = {"PATH": "/usr/bin:/bin", "GRPC_VERBOSITY": "INFO"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "failed children: 0" in done.stdout
    # With gRPC's fork handlers on, every fork here logs that it skips them.
    assert "fork() handlers" not in done.stderr, done.stderr
