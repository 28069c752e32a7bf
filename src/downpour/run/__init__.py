"""The run layer: the one Coordinator that runs every strategy's plan."""

from downpour.run.config import RunConfig
from downpour.run.coordinator import Coordinator, Divergence, Evaluator

__all__ = ["Coordinator", "Divergence", "Evaluator", "RunConfig"]
