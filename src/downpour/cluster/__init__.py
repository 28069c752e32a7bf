"""Starting roles: local processes (the default), and shutting them down with no orphans.

A role is a plain picklable object with ``kind``, ``rank`` and ``run(ctx)``.
The cluster runs each in its own process and hands it a :class:`RoleContext`
(metrics sink, stop event, a way to publish values such as its address).
"""

from downpour.cluster.local import LocalCluster, RoleHandle
from downpour.cluster.role import Role, RoleContext

__all__ = ["LocalCluster", "Role", "RoleContext", "RoleHandle"]
