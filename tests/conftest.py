"""Shared fixtures: the datasets beside the repo (loaded once a session), and a reaper for child processes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import downpour as dp
from tests.processes import child_processes

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: MNIST, Fashion-MNIST and w8a, as the data README lists them."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"the shared datasets are not at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mnist(shared_data):
    """MNIST from the shared datasets, loaded once a session."""
    return dp.data.load("mnist", data_dir=shared_data, download=False)


@pytest.fixture(autouse=True)
def no_orphans():
    """Every test must leave no process behind; leftovers are killed and the test fails."""
    yield
    deadline = time.monotonic() + 5.0
    left = child_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = child_processes()
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes left behind: {left}"
