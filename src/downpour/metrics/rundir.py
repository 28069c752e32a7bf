"""The run directory: configuration, event log, final model, plots, summary."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from downpour.metrics.sinks import JsonlSink


def new_run_id(strategy: str) -> str:
    """A sortable, unique run id such as ``20261123-221530-downpour-3fa2``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{strategy}-{secrets.token_hex(2)}"


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class RunDir:
    """A run's directory (``runs/<id>/`` by default).

    Files: ``config.json``, ``events.jsonl``, ``model.safetensors``,
    ``loss.png`` / ``accuracy.png``, ``summary.json``.
    """

    CONFIG = "config.json"
    EVENTS = "events.jsonl"
    MODEL = "model.safetensors"
    SUMMARY = "summary.json"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | Path | None, strategy: str, root: str | Path = "runs") -> "RunDir":
        target = Path(path) if path is not None else Path(root) / new_run_id(strategy)
        if (target / cls.EVENTS).exists():
            raise FileExistsError(f"run directory {target} already holds a run; choose another --run-dir")
        target.mkdir(parents=True, exist_ok=True)
        return cls(target)

    @classmethod
    def reopen(cls, path: str | Path) -> "RunDir":
        """An existing run directory, to resume the run in it (its events are appended to)."""
        target = Path(path)
        if not (target / cls.CONFIG).is_file():
            raise FileNotFoundError(f"{target} is not a run directory (it has no {cls.CONFIG})")
        return cls(target)

    def events_sink(self) -> JsonlSink:
        return JsonlSink(self.path / self.EVENTS)

    def write_config(self, config: dict[str, Any]) -> None:
        _write_json_atomic(self.path / self.CONFIG, config)

    def read_config(self) -> dict[str, Any]:
        return json.loads((self.path / self.CONFIG).read_text(encoding="utf-8"))

    def write_summary(self, summary: dict[str, Any]) -> None:
        _write_json_atomic(self.path / self.SUMMARY, summary)

    def read_summary(self) -> dict[str, Any]:
        return json.loads((self.path / self.SUMMARY).read_text(encoding="utf-8"))

    def save_model(self, model: nn.Module) -> Path:
        # Parameters may be views into one flat buffer; safetensors refuses
        # shared storage, so each tensor is saved as its own contiguous copy.
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        path = self.path / self.MODEL
        save_file(tensors, str(path))
        return path

    def load_model_(self, model: nn.Module) -> nn.Module:
        state = load_file(str(self.path / self.MODEL))
        model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()})
        return model
