"""downpour: distributed SGD training under one API.

Example:
    >>> import downpour as dp
    >>> result = dp.train(model="mlp", data="mnist", strategy=dp.Single(), epochs=1)  # doctest: +SKIP
"""

from downpour import data, models, strategies
from downpour.api import train
from downpour.cluster.ray import RayCluster
from downpour.compare import compare
from downpour.errors import DownpourError
from downpour.metrics import TrainResult
from downpour.optim import optim
from downpour.strategies import (
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
