"""Small pieces several test files share."""

from __future__ import annotations

import torch
from torch import nn


class OutLogits(nn.Module):
    """The ``"out"`` tensor of a segmentation model, for ONNX export and tracing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]
