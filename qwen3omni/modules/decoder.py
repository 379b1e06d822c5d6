"""A pre-norm transformer decoder stack: attention + (dense or MoE) MLP per layer, a final RMSNorm.

The thinker's text model, the talker and the code predictor are all this stack with different widths,
MLPs, rotary layouts and input embeddings; they own the embeddings, the stack owns the layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, decoder_mask
from .kv_cache import KVCache
from .moe import MoeBlock
from .norms import RMSNorm
from .rotary import RotaryEmbedding


@dataclass
class DecoderOutput:
    last_hidden_state: torch.Tensor  # [B, T, C], after the final norm
    hidden_states: tuple[torch.Tensor, ...] | None = None  # input, then each layer's output; last one normed
    router_logits: tuple[torch.Tensor, ...] | None = None  # one [B*T, E] per MoE layer


class DecoderLayer(nn.Module):
    def __init__(self, attention: Attention, mlp: nn.Module, dim: int, eps: float):
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)

    def forward(self, x, rope, mask, cache: KVCache | None = None, layer: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, layer)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoeBlock):
            h, router_logits = self.mlp(h)
        else:
            h, router_logits = self.mlp(h), None
        return x + h, router_logits


LayerHook = Callable[[int, torch.Tensor], torch.Tensor]


class DecoderStack(nn.Module):
    """`layers` + `norm` + the rotary table shared by all layers."""

    def __init__(self, layers: list[DecoderLayer], dim: int, eps: float, rotary: RotaryEmbedding):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(dim, eps)
        self.rotary = rotary
        self.gradient_checkpointing = False

    def new_cache(self, batch: int, capacity: int, dtype=None, device=None) -> KVCache:
        attn = self.layers[0].self_attn
        param = self.norm.weight
        return KVCache(
            len(self.layers), batch, attn.num_kv_heads, attn.head_dim, capacity,
            dtype or param.dtype, device or param.device,
        )

    def set_attention_backend(self, backend: str) -> None:
        for layer in self.layers:
            layer.self_attn.backend = backend

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer_hook: LayerHook | None = None,
        output_hidden_states: bool = False,
        output_router_logits: bool = False,
        window: int | None = None,
    ) -> DecoderOutput:
        """`position_ids` [axes, B, T]; `attention_mask` [B, T] for these tokens (0 = left padding)."""
        x = inputs_embeds
        B, T, _ = x.shape
        start = 0 if cache is None else cache.length
        if cache is not None:
            cache.reserve(T)
            if attention_mask is not None:
                cache.mark_padding(attention_mask)
            key_valid = cache.valid_keys(T)
        else:
            key_valid = attention_mask.bool() if attention_mask is not None else None
        if cache is not None and cache.static:
            mask = cache.static_mask(T, window)  # keys past the device-side offset are masked, not sliced off
        else:
            mask = decoder_mask(key_valid, T, start, window, x.device)
        rope = self.rotary(position_ids, dtype=x.dtype)
        hidden, routers = [x] if output_hidden_states else None, [] if output_router_logits else None
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x, logits = checkpoint(layer, x, rope, mask, None, i, use_reentrant=False)
            else:
                x, logits = layer(x, rope, mask, cache, i)
            if hidden is not None:
                hidden.append(x)
            if routers is not None and logits is not None:
                routers.append(logits)
            if layer_hook is not None:
                x = layer_hook(i, x)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x
        return DecoderOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden) if hidden is not None else None,
            router_logits=tuple(routers) if routers is not None else None,
        )
