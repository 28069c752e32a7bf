"""Checkpoints: a shard's slice, optimizer state and version; the coordinator's run state.

Files are written atomically (a temporary file in the same folder, fsync,
rename, fsync of the folder), so a process killed mid-write leaves the last
good checkpoint in place. A shard's checkpoint is a safetensors file: its
tensors (parameters, moving average, optimizer state) as tensors, everything
else (version, range, optimizer hyper-parameters) as JSON in the header. No
pickle anywhere: a checkpoint read back can only hold tensors and JSON.

A shard also keeps a *version file*, an 8-byte counter it updates after
every applied update (a store to the page cache, no fsync). It survives
the shard's process, so when a shard is killed the coordinator reads how
far it had got, and counts exactly the updates its restart from the last
checkpoint loses.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from downpour.errors import check_range

# The run state the coordinator writes beside the shards' checkpoints.
RUN_STATE = "run.json"


@dataclass(frozen=True, kw_only=True)
class Checkpointing:
    """Where and how often server shards checkpoint.

    Args:
        directory: the folder of the checkpoints (``<run dir>/checkpoints``).
        every_versions: a shard checkpoints each time its version advances by this.
        every_seconds: a shard checkpoints this often, whatever its version.
        resume: start the shards from the checkpoints in ``directory``.

    Example:
        >>> Checkpointing.parse("200", Path("ck")).every_versions
        200
        >>> Checkpointing.parse("30s", Path("ck")).every_seconds
        30.0
    """

    directory: Path
    every_versions: int | None = None
    every_seconds: float | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if (self.every_versions is None) == (self.every_seconds is None):
            raise ValueError("checkpoint every N versions or every S seconds: give exactly one")
        if self.every_versions is not None:
            check_range("checkpoint interval (versions)", self.every_versions, 1)
        if self.every_seconds is not None:
            check_range("checkpoint interval (seconds)", self.every_seconds, 0.0, low_open=True)

    @classmethod
    def parse(cls, text: str, directory: Path, *, resume: bool = False) -> "Checkpointing":
        """``"N"`` (versions) or ``"Ss"`` (seconds), as ``--checkpoint-every`` takes it."""
        match = re.fullmatch(r"\s*(\d+)\s*|\s*(\d+(?:\.\d*)?|\.\d+)\s*s\s*", str(text))
        if match is None:
            raise ValueError(f"--checkpoint-every expects N (versions) or Ss (seconds, e.g. 30s), got {text!r}")
        if match.group(1) is not None:
            return cls(directory=Path(directory), every_versions=int(match.group(1)), resume=resume)
        return cls(directory=Path(directory), every_seconds=float(match.group(2)), resume=resume)

    def shard_path(self, shard: int) -> Path:
        return self.directory / f"shard-{shard}.safetensors"

    def version_path(self, shard: int) -> Path:
        return self.directory / f"shard-{shard}.version"

    def due(self, version: int, saved_version: int, saved_at: float) -> bool:
        """Whether a shard at ``version``, last saved at ``saved_version`` and time ``saved_at``, saves now."""
        if self.every_versions is not None:
            return version - saved_version >= self.every_versions
        assert self.every_seconds is not None
        return version != saved_version and time.monotonic() - saved_at >= self.every_seconds


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


# ------------------------------------------------------------------ states
def pack_state(tensors: dict[str, torch.Tensor], header: dict[str, Any], optimizer: dict[str, Any] | None) -> bytes:
    """Tensors, a JSON header and an optimizer's ``state_dict`` as one safetensors blob (no pickle).

    The optimizer's tensors go beside the others as ``optimizer.<slot>.<name>``;
    its scalars and parameter groups into the header.
    """
    tensors = {name: value.detach().contiguous() for name, value in tensors.items()}
    header = dict(header)
    if optimizer is not None:
        slots: dict[str, dict[str, Any]] = {}
        for index, slot in optimizer["state"].items():
            slots[str(index)] = {}
            for name, value in slot.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{index}.{name}"] = value.detach().contiguous()
                else:
                    slots[str(index)][name] = value
        header["optimizer"] = {"param_groups": optimizer["param_groups"], "scalars": slots}
    return save_tensors(tensors, metadata={"downpour": json.dumps(header)})


def unpack_state(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """What :func:`pack_state` packed: the tensors (less the optimizer's), the header and the optimizer state.

    Raises ValueError when ``blob`` is not such a blob.
    """
    try:
        tensors = load_tensors(blob)
        header = json.loads(_metadata(blob)["downpour"])
    except (SafetensorError, ValueError, KeyError, UnicodeDecodeError) as error:
        raise ValueError(f"not a downpour state: {error}") from None
    saved = header.pop("optimizer", None)
    optimizer = None
    if saved is not None:
        slots: dict[int, dict[str, Any]] = {int(i): dict(scalars) for i, scalars in saved["scalars"].items()}
        for key in [key for key in tensors if key.startswith("optimizer.")]:
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = tensors.pop(key)
        optimizer = {"state": slots, "param_groups": saved["param_groups"]}
    return tensors, header, optimizer


# ------------------------------------------------------------------ shards
def save_shard(path: Path, state: dict[str, Any]) -> None:
    """Write a :meth:`ServerShard.state_dict` as a safetensors file, atomically."""
    tensors = {"params": state["params"]}
    if state.get("average") is not None:
        tensors["average"] = state["average"]
    header = {key: state[key] for key in ("shard", "start", "stop", "version")}
    write_atomic(path, pack_state(tensors, header, state.get("optimizer")))


def load_shard(path: Path) -> dict[str, Any]:
    """Read back what :func:`save_shard` wrote, as a state dict for :meth:`ServerShard.load_state_dict`."""
    if not path.is_file():
        raise FileNotFoundError(f"no shard checkpoint at {path}")
    try:
        tensors, header, optimizer = unpack_state(path.read_bytes())
        state: dict[str, Any] = {key: header[key] for key in ("shard", "start", "stop", "version")}
        state["params"] = tensors["params"]
    except (ValueError, KeyError) as error:
        raise ValueError(f"{path} is not a downpour shard checkpoint: {error}") from None
    state["average"] = tensors.get("average")
    state["optimizer"] = optimizer
    return state


def _metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its header is 8 bytes of length, then JSON)."""
    length = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + length].decode("utf-8")).get("__metadata__", {})


class VersionFile:
    """A shard's live version: an 8-byte little-endian counter in a memory-mapped file."""

    def __init__(self, path: Path, version: int = 0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(int(version).to_bytes(8, "little"))
        self._map = np.memmap(path, dtype="<i8", mode="r+", shape=(1,))

    def set(self, version: int) -> None:
        self._map[0] = version

    def close(self) -> None:
        self._map.flush()
        del self._map

    @staticmethod
    def read(path: Path) -> int | None:
        """The version last written, or None when there is no such file."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return int.from_bytes(data[:8], "little") if len(data) >= 8 else None


# --------------------------------------------------------------- run state
def save_run_state(directory: Path, state: dict[str, Any]) -> None:
    """The coordinator's state (steps and samples per worker, RNG state, ...) as JSON, atomically."""
    write_atomic(directory / RUN_STATE, json.dumps(state, indent=1).encode("utf-8"))


def load_run_state(directory: Path) -> dict[str, Any]:
    path = directory / RUN_STATE
    if not path.is_file():
        raise FileNotFoundError(f"no run state at {path}: the run wrote no checkpoint to resume from")
    return json.loads(path.read_text(encoding="utf-8"))
