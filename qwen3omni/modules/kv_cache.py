"""A preallocated key/value cache for one decoder stack."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer in one buffer, written in place as tokens arrive.

    Shapes: keys/values [layers, batch, kv_heads, capacity, head_dim]; `key_valid` [batch, capacity] is False
    at left-padding positions so batched decoding can mask them. All layers of a forward write at the same
    offset (`length`); the stack calls `advance` once after its last layer. The buffer grows by doubling only
    if a caller writes past `capacity` (generation sizes it up front, so decoding never reallocates).
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype, device=None):
        shape = (layers, batch, kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.ones(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0
        self.has_padding = False

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def reserve(self, new_tokens: int) -> None:
        needed = self.length + new_tokens
        if needed <= self.capacity:
            return
        grow = max(needed, 2 * self.capacity) - self.capacity
        pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:3], grow, t.shape[4])], dim=3)  # noqa: E731
        self.keys, self.values = pad(self.keys), pad(self.values)
        self.key_valid = torch.cat([self.key_valid, self.key_valid.new_ones(self.key_valid.shape[0], grow)], 1)

    def mark_padding(self, attention_mask: torch.Tensor) -> None:
        """Record which of the next `attention_mask.shape[1]` positions are real (1) or padding (0)."""
        t = attention_mask.shape[1]
        self.reserve(t)
        self.key_valid[:, self.length : self.length + t] = attention_mask.bool()
        self.has_padding = self.has_padding or not bool(attention_mask.bool().all())

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k/v [B, H, T, D] at the current offset; return all keys/values so far for this layer."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, tokens: int) -> None:
        self.length += tokens

    def valid_keys(self, new_tokens: int) -> torch.Tensor | None:
        """key_valid up to the end of the next write, or None when nothing is padded."""
        return self.key_valid[:, : self.length + new_tokens] if self.has_padding else None
