"""The parameter server: one shard of the flat vector, its optimizer and its update policy.

One :class:`ServerShard` serves every strategy; the :class:`UpdatePolicy`
decides whether pushes are applied at once (Downpour), in synchronous rounds
of N of N+b (sync SGD with backup workers) or within a staleness bound (SSP), or summed into Sandblaster's batch
gradient, which the coordinator then works on with vector ops.
No gRPC here: ``downpour.transport.serve_shard`` puts a shard on the network.
"""

from downpour.server.policy import ApplyAtOnce
from downpour.server.policy import BoundedStaleness
from downpour.server.policy import Push
from downpour.server.policy import Step
from downpour.server.policy import SumPortions
from downpour.server.policy import Synchronous
from downpour.server.policy import UpdatePolicy
from downpour.server.policy import Verdict
from downpour.server.shard import OptimizerFactory
from downpour.server.shard import ServerShard
from downpour.transport.protocol import InvalidUpdate
from downpour.transport.protocol import PushResult

__all__ = [
    "ApplyAtOnce",
    "BoundedStaleness",
    "InvalidUpdate",
    "OptimizerFactory",
    "Push",
    "PushResult",
    "ServerShard",
    "Step",
    "SumPortions",
    "Synchronous",
    "UpdatePolicy",
    "Verdict",
]
