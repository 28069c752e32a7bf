"""Reference models: linear models, an MLP, a CNN, a small ResNet, and function models.

Example:
    >>> import torch
    >>> from downpour.models import backward, build, default_loss
    >>> model = build("logistic", (1, 28, 28), 10)
    >>> x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    >>> loss = backward(model, default_loss("logistic"), x, y)
"""

from downpour.models.evaluate import evaluate as evaluate
from downpour.models.function import FunctionModel as FunctionModel
from downpour.models.gradients import backward as backward
from downpour.models.registry import MODELS as MODELS
from downpour.models.registry import build as build
from downpour.models.registry import default_loss as default_loss
from downpour.models.registry import options_of as options_of

__all__ = [
    "MODELS",
    "FunctionModel",
    "backward",
    "build",
    "default_loss",
    "evaluate",
    "options_of",
]
