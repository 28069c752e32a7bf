"""Strategies: one module each, registered here one line at a time."""

from __future__ import annotations

from typing import Any

from downpour.errors import choose
from downpour.strategies.base import Faults, Job, Strategy
from downpour.strategies.single import Single

STRATEGIES: dict[str, type] = {}


def register(cls: type) -> type:
    """Add a strategy class to the registry under its ``name``."""
    STRATEGIES[cls.name] = cls
    return cls


register(Single)


def get(name: str, **options: Any) -> Strategy:
    """The strategy registered as ``name``, configured with ``options``."""
    choose("strategy", name, STRATEGIES)
    return STRATEGIES[name](**options)


__all__ = ["STRATEGIES", "Faults", "Job", "Single", "Strategy", "get", "register"]
