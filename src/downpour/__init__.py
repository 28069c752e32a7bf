"""downpour: distributed SGD training under one API.

Example:
    >>> import downpour as dp
    >>> result = dp.train(model="mlp", data="mnist", strategy=dp.Single(), epochs=1)  # doctest: +SKIP
"""

import os

# gRPC Python builds its core with fork handlers on while its Python layer keeps its own off
# (grpc/grpc#41455): a process forked while gRPC's threads are busy, such as a training worker's
# DataLoader process, then runs half of them and can crash (a loader killed by SIGSEGV mid-epoch,
# seen in a test run). No child of a downpour process uses its parent's gRPC, so they are off
# before gRPC starts, unless the environment already says otherwise.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from downpour import data, models, strategies  # noqa: E402  (after the fork setting)
from downpour.api import train  # noqa: E402
from downpour.cluster.ray import RayCluster  # noqa: E402
from downpour.compare import compare  # noqa: E402
from downpour.errors import DownpourError  # noqa: E402
from downpour.metrics import TrainResult  # noqa: E402
from downpour.optim import optim  # noqa: E402
from downpour.strategies import (  # noqa: E402
    Allreduce,
    Boost,
    Dane,
    Decentralized,
    Downpour,
    Faults,
    Hogwild,
    HotPotato,
    LocalSGD,
    Sandblaster,
    SelfieBoost,
    Single,
    Sync,
)

__version__ = "0.1.0"

__all__ = [
    "Allreduce",
    "Boost",
    "Dane",
    "Decentralized",
    "Downpour",
    "DownpourError",
    "Faults",
    "Hogwild",
    "HotPotato",
    "LocalSGD",
    "RayCluster",
    "Sandblaster",
    "SelfieBoost",
    "Single",
    "Sync",
    "TrainResult",
    "compare",
    "data",
    "models",
    "optim",
    "strategies",
    "train",
]
