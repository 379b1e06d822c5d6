"""Vision encoder (`thinker.visual`): SigLIP2-style ViT with 2-D RoPE, patch merger and deepstack mergers.

Input rows are patches of 2 frames x 16 x 16 pixels (the processor's `pixel_values`), ordered per image or
video frame in 2x2 merge blocks: block row, block column, then the 4 patches of the block in raster order.
Attention never crosses a frame (nor an image), so every frame is one packed segment for `attend_segments`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import VisionEncoderConfig
from ..errors import InputError, describe
from ..modules.activations import activation
from ..modules.attention import attend_segments
from ..modules.rotary import RotaryEmbedding, apply_rotary


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=True)

    def forward(self, patches_NP: torch.Tensor) -> torch.Tensor:
        # The kernel covers the whole patch with stride = kernel: the convolution is one matmul per patch.
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)
        return F.linear(patches_NP.to(weight.dtype), weight, self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_NC, rope, cu_seqlens, backend: str) -> torch.Tensor:
        N = x_NC.shape[0]
        q, k, v = self.qkv(x_NC).view(N, 3, self.num_heads, -1).unbind(1)
        cos, sin = (t[:, None, :] for t in rope)  # float32 tables: the rotation runs in float32
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.proj(attend_segments(q, k, v, cu_seqlens, backend).reshape(N, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg)

    def forward(self, x_NC, rope, cu_seqlens, backend: str) -> torch.Tensor:
        x_NC = x_NC + self.attn(self.norm1(x_NC), rope, cu_seqlens, backend)
        return x_NC + self.mlp(self.norm2(x_NC))


class PatchMerger(nn.Module):
    """Concatenate each 2x2 group of patches and project to the thinker width."""

    def __init__(self, cfg: VisionEncoderConfig, norm_after_merge: bool):
        super().__init__()
        self.merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.norm_after_merge = norm_after_merge
        self.ln_q = nn.LayerNorm(self.merged if norm_after_merge else cfg.hidden_size, eps=1e-6)
        self.mlp = nn.ModuleList(
            [nn.Linear(self.merged, self.merged), nn.GELU(), nn.Linear(self.merged, cfg.out_hidden_size)]
        )

    def forward(self, x_NC: torch.Tensor) -> torch.Tensor:
        if self.norm_after_merge:
            x = self.ln_q(x_NC.reshape(-1, self.merged))
        else:
            x = self.ln_q(x_NC).reshape(-1, self.merged)
        for layer in self.mlp:
            x = layer(x)
        return x


# ---- per-patch geometry ------------------------------------------------------------------------------------
def patch_rows_cols(grid_thw: torch.Tensor, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every patch in one frame of each grid, in merge-block order; frames repeat.

    Returns two LongTensors [sum t*h*w].
    """
    rows, cols = [], []
    for t, h, w in grid_thw.tolist():
        shape = (h // merge, w // merge, merge, merge)
        r = torch.arange(h).view(h // merge, 1, merge, 1).expand(shape).flatten()
        c = torch.arange(w).view(1, w // merge, 1, merge).expand(shape).flatten()
        rows.append(r.repeat(t))
        cols.append(c.repeat(t))
    return torch.cat(rows), torch.cat(cols)


def _hat_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolation along one axis from `size` target cells onto a `side`-cell table, corners
    aligned (first and last cells land on the table's first and last entries): the two neighbouring
    table entries of each target cell [n, 2] and their weights [n, 2]."""
    src = index.float() * (side - 1) / (size - 1).clamp(min=1)
    lower = src.floor()
    taps = lower.long()[:, None] + torch.arange(2)
    weights = (1 - (src[:, None] - lower[:, None] - torch.arange(2)).abs()).clamp(min=0)
    return taps.clamp(0, side - 1), weights


def position_embedding_taps(grid_thw: torch.Tensor, merge: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear resampling of the learned `side` x `side` position table to each grid: per patch, 4 table
    indices [N, 4] and weights [N, 4] (align_corners=True)."""
    rows, cols = patch_rows_cols(grid_thw, merge)
    counts = grid_thw.prod(-1).cpu()
    heights = grid_thw[:, 1].cpu().repeat_interleave(counts)
    widths = grid_thw[:, 2].cpu().repeat_interleave(counts)
    row_taps, row_w = _hat_taps(rows, heights, side)
    col_taps, col_w = _hat_taps(cols, widths, side)
    index = (row_taps[:, :, None] * side + col_taps[:, None, :]).flatten(1)
    weight = (row_w[:, :, None] * col_w[:, None, :]).flatten(1)
    return index, weight


def frame_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """cu_seqlens with one segment per frame of every image / video."""
    per_frame = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0])
    return F.pad(per_frame.cumsum(0), (1, 0)).to(torch.int32)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.rotary = RotaryEmbedding.axial_2d(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, norm_after_merge=False)
        self.merger_list = nn.ModuleList(PatchMerger(cfg, norm_after_merge=True) for _ in cfg.deepstack_visual_indexes)
        self.side = int(cfg.num_position_embeddings**0.5)
        self.backend = "sdpa"  # "flash" uses flash-attn varlen on CUDA when it is installed
        self.gradient_checkpointing = False  # see qwen3omni.training.set_gradient_checkpointing

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, names=("pixel_values", "grid_thw")):
        """Patches [N, C*2*16*16] of images / videos with grids [n, 3] -> (merged [N/4, out_hidden], deepstack
        features: one [N/4, out_hidden] per deepstack layer, in layer order). `names`: what the caller calls
        the two inputs, for error messages (the thinker: the image or the video arguments)."""
        grid_thw = self._check(pixel_values, grid_thw, *names)
        merge = self.config.spatial_merge_size
        x = self.patch_embed(pixel_values)
        x = x + self._position_embedding(grid_thw, merge).to(x.dtype)
        rows, cols = patch_rows_cols(grid_thw, merge)
        rope = self.rotary(torch.stack([rows, cols]).to(x.device), dtype=torch.float32)
        cu_seqlens = frame_seqlens(grid_thw)
        deepstack = []
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, rope, cu_seqlens, self.backend, use_reentrant=False)
            else:
                x = block(x, rope, cu_seqlens, self.backend)
            if i in self.config.deepstack_visual_indexes:
                deepstack.append(self.merger_list[self.config.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack

    def _position_embedding(self, grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
        # Computed for the first frame of each grid only and repeated: the table does not depend on time.
        firsts = grid_thw.clone()
        firsts[:, 0] = 1
        index, weight = position_embedding_taps(firsts, merge, self.side)
        device = self.pos_embed.weight.device
        pos = (self.pos_embed(index.to(device)) * weight.to(device)[..., None]).sum(1)  # float32 weights
        per_frame = list(pos.split(firsts.prod(-1).tolist()))
        return torch.cat([p.repeat(t, 1) for p, t in zip(per_frame, grid_thw[:, 0].tolist())])

    def _check(self, pixel_values: torch.Tensor, grid_thw, pixels_name: str, grid_name: str) -> torch.Tensor:
        cfg = self.config
        width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 2 or pixel_values.shape[1] != width:
            raise InputError(f"{pixels_name}: expected [patches, {width}], got {describe(pixel_values)}")
        grid_thw = torch.as_tensor(grid_thw).long().cpu()
        if grid_thw.ndim != 2 or grid_thw.shape[1] != 3 or bool((grid_thw < 1).any()):
            raise InputError(
                f"{grid_name}: expected [n, 3] positive (t, h, w) patch counts, got {describe(grid_thw)}"
            )
        m = cfg.spatial_merge_size
        if bool((grid_thw[:, 1:] % m).any()):
            raise InputError(f"{grid_name}: heights and widths must be multiples of {m}, got {grid_thw.tolist()}")
        total = int(grid_thw.prod(-1).sum())
        if total != pixel_values.shape[0]:
            raise InputError(
                f"{pixels_name}: {grid_name} {grid_thw.tolist()} describes {total} patches but "
                f"{pixel_values.shape[0]} rows were given"
            )
        return grid_thw
