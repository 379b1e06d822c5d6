"""Vision encoder (`thinker.visual`): SigLIP2-style ViT with 2-D RoPE, patch merger and deepstack mergers."""

from __future__ import annotations

import torch
from torch import nn

from ..config import VisionEncoderConfig
from ..modules.activations import activation


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=True)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg)


class PatchMerger(nn.Module):
    """Concatenate each 2x2 group of patches and project to the thinker width."""

    def __init__(self, cfg: VisionEncoderConfig, norm_after_merge: bool):
        super().__init__()
        merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(merged if norm_after_merge else cfg.hidden_size, eps=1e-6)
        self.mlp = nn.ModuleList([nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, cfg.out_hidden_size)])


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, norm_after_merge=False)
        self.merger_list = nn.ModuleList(PatchMerger(cfg, norm_after_merge=True) for _ in cfg.deepstack_visual_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        raise NotImplementedError("vision encoder forward: perception issue")
