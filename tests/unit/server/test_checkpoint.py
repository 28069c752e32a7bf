"""Shard checkpoints: safetensors files that round-trip a shard exactly, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from downpour.checkpoint import Checkpointing, VersionFile, load_shard, save_shard, write_atomic
from downpour.flat import ShardRange
from downpour.server import ServerShard


def _trained_shard(optimizer) -> ServerShard:
    shard = ServerShard(torch.linspace(-1, 1, 10), shard=ShardRange(1, 10, 20), optimizer=optimizer, ema_decay=0.9)
    for version in range(5):
        shard.push(worker=0, version=version, update=torch.full((10,), 0.1 * (version + 1)))
    return shard


@pytest.mark.parametrize("optimizer", [
    lambda ps: torch.optim.Adam(ps, lr=0.01),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.Adagrad(ps, lr=0.1),
])
def test_a_restored_shard_goes_on_exactly_as_the_original(tmp_path, optimizer):
    original = _trained_shard(optimizer)
    save_shard(tmp_path / "shard.safetensors", original.state_dict())
    restored = ServerShard(torch.zeros(10), shard=ShardRange(1, 10, 20), optimizer=optimizer, ema_decay=0.9)
    restored.load_state_dict(load_shard(tmp_path / "shard.safetensors"))
    assert restored.version == original.version == 5
    for shard in (original, restored):
        shard.push(worker=1, version=5, update=torch.arange(10.0))
    assert torch.equal(original.pull()[1], restored.pull()[1])
    assert torch.equal(original.average(), restored.average())


def test_a_checkpoint_file_holds_no_pickle_and_a_bad_one_is_named(tmp_path):
    save_shard(tmp_path / "s.safetensors", _trained_shard(lambda ps: torch.optim.Adam(ps)).state_dict())
    assert b"\x80\x04" not in (tmp_path / "s.safetensors").read_bytes()[:64]  # a safetensors header, not a pickle
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="bad.safetensors is not a downpour shard checkpoint"):
        load_shard(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="no shard checkpoint"):
        load_shard(tmp_path / "missing.safetensors")


def test_a_shard_of_another_range_refuses_the_checkpoint(tmp_path):
    save_shard(tmp_path / "s.safetensors", _trained_shard(lambda ps: torch.optim.SGD(ps, lr=0.1)).state_dict())
    other = ServerShard(torch.zeros(10), shard=ShardRange(0, 0, 10), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    with pytest.raises(ValueError, match=r"checkpoint holds \[10, 20\)"):
        other.load_state_dict(load_shard(tmp_path / "s.safetensors"))


def test_write_atomic_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    path = tmp_path / "f"
    write_atomic(path, b"old")

    def failing_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"


def test_the_version_file_outlives_its_writer(tmp_path):
    file = VersionFile(tmp_path / "v", 7)
    file.set(1234)
    assert VersionFile.read(tmp_path / "v") == 1234  # what a coordinator reads after the shard is killed
    file.close()
    assert VersionFile.read(tmp_path / "missing") is None


@pytest.mark.parametrize("text, versions, seconds", [("200", 200, None), ("30s", None, 30.0), ("0.5s", None, 0.5)])
def test_checkpoint_intervals_parse(text, versions, seconds):
    every = Checkpointing.parse(text, Path("ck"))
    assert (every.every_versions, every.every_seconds) == (versions, seconds)


@pytest.mark.parametrize("text", ["", "0", "-3", "10m", "s", "0s"])
def test_bad_checkpoint_intervals_are_refused(text):
    with pytest.raises(ValueError, match="checkpoint"):
        Checkpointing.parse(text, Path("ck"))


def test_the_shard_observer_sees_every_version_with_a_matching_state():
    shard = ServerShard(torch.zeros(3), optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    seen = []
    shard.observe(lambda version, state: seen.append((version, state()["version"], state()["params"].tolist())))
    shard.push(worker=0, version=0, update=torch.ones(3))
    shard.push(worker=0, version=1, update=torch.ones(3))
    assert seen == [(1, 1, [-1.0, -1.0, -1.0]), (2, 2, [-2.0, -2.0, -2.0])]
