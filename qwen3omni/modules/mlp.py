"""Dense feed-forward blocks."""

from __future__ import annotations

import torch
from torch import nn

from .activations import activation
from .few_rows import FewRowLinear


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)), the dense MLP of every Qwen decoder."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = FewRowLinear(dim, hidden, bias=bias)
        self.up_proj = FewRowLinear(dim, hidden, bias=bias)
        self.down_proj = FewRowLinear(hidden, dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
