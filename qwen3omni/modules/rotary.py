"""Rotary position embeddings: plain 1-D, sectioned multi-axis (TM-RoPE) and 2-D axial (vision).

All three are the same computation: every frequency pair `p` of a head rotates by
`position[axis_of_pair[p]] * inv_freq[p]`. They differ only in how many position axes there are and which
axis drives which pair, so one module covers them; the constructors below say which layout each model uses.
Pairs are in the "rotate half" layout: pair `p` couples dims `p` and `p + head_dim / 2`.
"""

from __future__ import annotations

import torch
from torch import nn


def inverse_frequencies(dim: int, theta: float) -> torch.Tensor:
    """theta ** (-2i / dim) for i < dim / 2, in float32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def interleaved_axes(sections: list[int]) -> torch.Tensor:
    """Axis of each pair for Qwen3's interleaved TM-RoPE.

    Pairs cycle temporal, height, width (t h w t h w ...) while each axis still has sections left, and the
    remaining pairs are temporal: with [24, 20, 20], pairs 0..59 cycle t/h/w and pairs 60..63 are temporal.
    """
    axes = torch.zeros(sum(sections), dtype=torch.long)
    for axis in (1, 2):
        axes[axis : 3 * sections[axis] : 3] = axis
    return axes


def contiguous_axes(sections: list[int]) -> torch.Tensor:
    """Axis of each pair for the Qwen2-VL layout: `sections[0]` temporal pairs, then height, then width."""
    return torch.cat([torch.full((n,), axis, dtype=torch.long) for axis, n in enumerate(sections)])


class RotaryEmbedding(nn.Module):
    """cos/sin tables [*batch, head_dim] for `position_ids` of shape [axes, *batch] (axes = 1 for plain RoPE).

    Each of the head_dim/2 frequency pairs is driven by one position axis (`axis_of_pair`). Angles are
    computed in float32 and returned in `dtype`, repeated over both halves of the head. The tables are
    non-persistent buffers rebuilt by `reset_buffers` (the checkpoint loader calls it after materialising a
    model that was built on the meta device).
    """

    def __init__(self, layout: str, head_dim: int, theta: float, sections: list[int] | None = None):
        super().__init__()
        if layout not in ("plain", "interleaved", "contiguous", "axial_2d"):
            raise ValueError(f"unknown rotary layout {layout!r}")
        self.layout, self.head_dim, self.theta, self.sections = layout, head_dim, theta, sections
        pairs = head_dim // 2
        self.register_buffer("inv_freq", torch.empty(pairs, dtype=torch.float32), persistent=False)
        self.register_buffer("axis_of_pair", torch.empty(pairs, dtype=torch.long), persistent=False)
        self.num_axes = {"plain": 1, "axial_2d": 2}.get(layout, 3)
        self.reset_buffers()

    @classmethod
    def plain(cls, head_dim: int, theta: float) -> RotaryEmbedding:
        return cls("plain", head_dim, theta)

    @classmethod
    def sectioned(cls, head_dim: int, theta: float, sections: list[int], interleaved: bool) -> RotaryEmbedding:
        return cls("interleaved" if interleaved else "contiguous", head_dim, theta, list(sections))

    @classmethod
    def axial_2d(cls, head_dim: int, theta: float) -> RotaryEmbedding:
        """Vision layout: the first half of the pairs follow the row, the second half the column, each with
        the frequencies of a head of size head_dim / 2."""
        return cls("axial_2d", head_dim, theta)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.device("cpu"):
            if self.layout == "axial_2d":
                inv = inverse_frequencies(self.head_dim // 2, self.theta)
                n = inv.shape[0]
                axes = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
                return torch.cat([inv, inv]), axes
            inv = inverse_frequencies(self.head_dim, self.theta)
            if self.layout == "plain":
                return inv, torch.zeros(inv.shape[0], dtype=torch.long)
            axes = interleaved_axes(self.sections) if self.layout == "interleaved" else contiguous_axes(self.sections)
            if axes.shape != inv.shape:
                raise ValueError(f"sections {self.sections} do not cover head_dim {self.head_dim} / 2")
            return inv, axes

    def reset_buffers(self) -> None:
        inv, axes = self._tables()
        device = self.inv_freq.device
        self.inv_freq, self.axis_of_pair = inv.to(device), axes.to(device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32):
        if position_ids.shape[0] < self.num_axes:
            raise ValueError(f"position_ids has {position_ids.shape[0]} axes; this rotary needs {self.num_axes}")
        # [axes, *batch] -> [*batch, pairs]: each pair reads the position of its own axis.
        pos = position_ids.float().movedim(0, -1)[..., self.axis_of_pair]
        angles = pos * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (last dim = head_dim) by tables already broadcastable to it; math in the tables' dtype."""
    xc = x.to(cos.dtype)
    # x * cos + cat(-x2, x1) * sin, written into one buffer (no concatenated copy of x: at prefill sizes the
    # temporaries cost more than the arithmetic).
    half = xc.shape[-1] // 2
    out = xc * cos
    out[..., :half].addcmul_(xc[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(xc[..., :half], sin[..., half:])
    return out.to(x.dtype)
