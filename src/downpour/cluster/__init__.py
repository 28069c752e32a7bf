"""Starting roles: local processes (the default) or Ray actors, and shutting them down with no orphans.

A role is a plain picklable object with ``kind``, ``rank`` and ``run(ctx)``.
The cluster runs each in its own process and hands it a :class:`RoleContext`
(metrics sink, stop event, a way to publish values such as its address).
Strategies ask :func:`open_cluster` for one, so every strategy runs on
every kind of cluster unchanged.
"""

from __future__ import annotations

from typing import Any

from downpour.cluster.local import LocalCluster, RoleHandle
from downpour.cluster.ray import RayCluster
from downpour.cluster.role import Role, RoleContext
from downpour.metrics import Metrics

__all__ = ["LocalCluster", "RayCluster", "Role", "RoleContext", "RoleHandle", "open_cluster", "parse_cluster"]


def parse_cluster(spec: Any) -> Any:
    """A cluster spec as given by a user: ``None`` or ``"local"``, ``"ray"``, ``"ray:ADDRESS"``, or a
    ``RayCluster``; returns ``None`` (local) or a ``RayCluster``. A bad spec raises, naming it."""
    if spec is None or spec == "local":
        return None
    if isinstance(spec, str):
        kind, _, address = spec.partition(":")
        if kind != "ray":
            raise ValueError(f"cluster must be 'local', 'ray' or 'ray:ADDRESS', got {spec!r}")
        return RayCluster(address=address or None)
    if callable(getattr(spec, "open", None)):
        return spec
    raise TypeError(f"cluster must be a string or a RayCluster, got {type(spec).__name__}")


def open_cluster(spec: Any, metrics: Metrics, *, tolerate_worker_deaths: bool = True) -> Any:
    """The cluster a strategy's roles run on: local processes unless ``spec`` names Ray.

    The result is a context manager with :class:`LocalCluster`'s methods.
    """
    spec = parse_cluster(spec)
    if spec is None:
        return LocalCluster(metrics, tolerate_worker_deaths=tolerate_worker_deaths)
    return spec.open(metrics, tolerate_worker_deaths=tolerate_worker_deaths)
