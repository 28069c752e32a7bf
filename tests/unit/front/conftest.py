"""What the command-line tests share: the API calls the CLI makes, caught without training."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import downpour as dp


@pytest.fixture
def trained(monkeypatch):
    """What `downpour train` hands to :func:`downpour.train`, without training."""
    calls = []

    def fake_train(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(summary={}, run_dir="runs/fake")

    monkeypatch.setattr(dp, "train", fake_train)
    return calls


@pytest.fixture
def compared(monkeypatch):
    """What `downpour compare` hands to :func:`downpour.compare.compare`, without training."""
    calls = []

    def fake_compare(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(path=Path("runs/fake"), rows=[])

    module = sys.modules["downpour.compare"]  # the package's `compare` is the function
    monkeypatch.setattr(module, "compare", fake_compare)
    monkeypatch.setattr(module, "show", lambda comparison: None)
    return calls
