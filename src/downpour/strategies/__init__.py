"""Strategies: one module each, registered here one line at a time."""

from __future__ import annotations

from typing import Any

from downpour.errors import choose
from downpour.strategies.allreduce import Allreduce
from downpour.strategies.base import Faults, Job, Strategy
from downpour.strategies.boost import Boost, SelfieBoost
from downpour.strategies.dane import Dane
from downpour.strategies.decentralized import Decentralized
from downpour.strategies.downpour import Downpour
from downpour.strategies.hogwild import Hogwild
from downpour.strategies.hot_potato import HotPotato
from downpour.strategies.local_sgd import LocalSGD
from downpour.strategies.sandblaster import Sandblaster
from downpour.strategies.single import Single
from downpour.strategies.sync import Sync

STRATEGIES: dict[str, type] = {}


def register(cls: type) -> type:
    """Add a strategy class to the registry under its ``name``."""
    STRATEGIES[cls.name] = cls
    return cls


register(Single)
register(Downpour)
register(Sync)
register(Allreduce)
register(LocalSGD)
register(Hogwild)
register(HotPotato)
register(Decentralized)
register(Sandblaster)
register(Dane)
register(Boost)
register(SelfieBoost)


def get(name: str, **options: Any) -> Strategy:
    """The strategy registered as ``name``, configured with ``options``."""
    choose("strategy", name, STRATEGIES)
    return STRATEGIES[name](**options)


__all__ = [
    "STRATEGIES",
    "Allreduce",
    "Boost",
    "Dane",
    "Decentralized",
    "Downpour",
    "Faults",
    "Hogwild",
    "HotPotato",
    "Job",
    "LocalSGD",
    "Sandblaster",
    "SelfieBoost",
    "Single",
    "Strategy",
    "Sync",
    "get",
    "register",
]
