"""downpour: distributed SGD training under one API.

Example:
    >>> import downpour as dp
    >>> result = dp.train(model="mlp", data="mnist", strategy=dp.Single(), epochs=1)  # doctest: +SKIP
"""

from downpour import data
from downpour import models
from downpour.api import train
from downpour.errors import DownpourError
from downpour.metrics import TrainResult
from downpour.optim import optim
from downpour import strategies
from downpour.strategies import Allreduce
from downpour.strategies import Downpour
from downpour.strategies import Faults
from downpour.strategies import Hogwild
from downpour.strategies import Decentralized
from downpour.strategies import HotPotato
from downpour.strategies import LocalSGD
from downpour.strategies import Sandblaster
from downpour.strategies import Single
from downpour.strategies import Sync

__version__ = "0.1.0"

__all__ = [
    "Allreduce",
    "Hogwild",
    "Decentralized",
    "HotPotato",
    "LocalSGD",
    "Sandblaster",
    "Downpour",
    "DownpourError",
    "Faults",
    "Single",
    "Sync",
    "TrainResult",
    "data",
    "models",
    "strategies",
    "optim",
    "train",
]
