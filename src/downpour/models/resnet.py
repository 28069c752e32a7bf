"""A small ResNet for CIFAR-10-shaped input.

He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016, section 4.2: a 3x3 stem, three stages of BasicBlocks with 16, 32
and 64 channels (stride 2 between stages), global average pooling and one
dense layer; ``depth = 6n + 2``. Normalization defaults to group norm (Wu &
He, "Group Normalization", ECCV 2018) rather than the paper's batch norm,
because group norm keeps no running statistics: the flat parameter vector is
then the whole model, so a model rebuilt from a server's parameters evaluates
correctly and workers never need to agree on buffers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from downpour.errors import check_range, choose
from downpour.models.cnn import image_shape

Norm = Callable[[int], nn.Module]


def group_norm(channels: int) -> nn.Module:
    """Group norm with 8 groups (fewer when ``channels`` is not a multiple of 8)."""
    return nn.GroupNorm(math.gcd(8, channels), channels)


NORMS: dict[str, Norm] = {"group": group_norm, "batch": nn.BatchNorm2d}


class BasicBlock(nn.Module):
    """Two normalized 3x3 convolutions and an identity (or 1x1 projection) shortcut.

    Example:
        >>> BasicBlock(16, 32, stride=2)(torch.zeros(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, norm: Norm = group_norm
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.norm1 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.norm2 = norm(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            # Projection shortcut (the paper's option B) keeps the code short; it
            # adds only 3 small 1x1 convolutions to the whole network.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                norm(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet-``depth`` (8, 14, 20, 32, 44, 56, 110, ...).

    With ``norm="batch"`` the running statistics are buffers, not parameters:
    each worker keeps its own and the flat vector does not carry them.

    Args:
        input_shape: ``(H, W)`` or ``(C, H, W)``, e.g. ``(3, 32, 32)``.
        num_classes: number of outputs.
        depth: total number of weighted layers, ``6n + 2``.
        width: channels of the first stage (doubled at each later stage).
        norm: "group" (default) or "batch".

    Example:
        >>> ResNet((3, 32, 32), 10, depth=8)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        depth: int = 20,
        width: int = 16,
        norm: str = "group",
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth!r}"
            )
        check_range("width", width, 1)
        make_norm = NORMS[choose("norm", norm, NORMS)]
        in_channels, _, _ = image_shape(input_shape)
        self._image = image_shape(input_shape)
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            make_norm(width),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        channels = width
        for stage in range(3):
            out_channels = width * 2**stage
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(BasicBlock(channels, out_channels, stride, make_norm))
                channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(x.reshape(x.shape[0], *self._image)))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))
