"""Fixtures for downpour.data tests: the shared real datasets and a local HTTP mirror."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest

# shared/ sits beside the repository root: <root>/../shared/data.
SHARED_DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real datasets (MNIST, Fashion-MNIST, w8a); skips if absent."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA.resolve()} (offline data folder)")
    return SHARED_DATA.resolve()


@pytest.fixture(autouse=True)
def _no_user_mirror(monkeypatch):
    """Keep a developer's $DOWNPOUR_MIRROR from reaching the download tests."""
    monkeypatch.delenv("DOWNPOUR_MIRROR", raising=False)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def http_root(tmp_path: Path):
    """``(folder, base_url)``: a real HTTP server on 127.0.0.1 serving ``folder``."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
