"""A preallocated key/value cache for one decoder stack."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from .attention import position_mask


@dataclass
class LayerKV:
    """One layer's view of a `KVCache`: its key/value buffers [B, H, capacity, D] and the write offset.

    A layer gets this view rather than the cache and a layer number, so a compiled layer step sees only
    tensors (no per-layer integer to specialise on) and one compiled graph serves every layer.
    """

    keys: torch.Tensor
    values: torch.Tensor
    length: int  # host-side offset (eager mode)
    position: torch.Tensor | None  # device-side offset (static mode)

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Write k/v [B, H, T, D] at the offset; return all keys/values so far (in static mode: the whole
        buffers, to be read with `KVCache.static_mask`)."""
        if self.position is not None:
            index = self.position + torch.arange(k.shape[2], device=k.device)
            self.keys.index_copy_(2, index, k)
            self.values.index_copy_(2, index, v)
            return self.keys, self.values
        end = self.length + k.shape[2]
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Keys and values of every layer in one buffer, written in place as tokens arrive.

    Shapes: keys/values [layers, batch, kv_heads, capacity, head_dim]; `key_valid` [batch, capacity] is False
    at left-padding positions so batched decoding can mask them. All layers of a forward write at the same
    offset (`length`); the stack calls `advance` once after its last layer. The buffer grows by doubling only
    if a caller writes past `capacity` (generation sizes it up front, so decoding never reallocates).

    Static mode (`set_static(True)`, for CUDA graphs and torch.compile): the write offset also lives on the
    device (`position`, a 1-element tensor advanced in place), `LayerKV.update` writes with `index_copy_` there and
    returns the whole buffers, and the stack masks the keys past the offset (`static_mask`). A decode step then
    has the same shapes and reads no host value at every position, so it can be captured once and replayed.
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype, device=None):
        shape = (layers, batch, kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.ones(batch, capacity, dtype=torch.bool, device=device)
        self._length = 0
        self.has_padding = False
        self.position: torch.Tensor | None = None  # the device-side offset, in static mode only

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def static(self) -> bool:
        return self.position is not None

    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, value: int) -> None:  # rewinding (the code predictor reuses one cache per frame)
        self._length = value
        if self.position is not None:
            self.position.fill_(value)

    def check_fits(self, batch: int, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        """Raise an InputError unless this cache was made for such a stack and batch (metadata only: no sync)."""
        want = (layers, batch, kv_heads, head_dim, dtype)
        got = (self.keys.shape[0], self.keys.shape[1], self.keys.shape[2], self.keys.shape[4], self.keys.dtype)
        if got != want:
            raise InputError(
                f"cache: expected one from this model's new_cache({batch}, ...) (layers, batch, kv heads, head dim, "
                f"dtype = {want}), got {got}; a cache serves one stack and one batch"
            )

    def set_static(self, static: bool = True) -> None:
        """Switch static mode on (offset mirrored on the device) or off. The buffers stay where they are."""
        if static and self.position is None:
            self.position = torch.tensor([self._length], dtype=torch.long, device=self.keys.device)
        elif not static:
            self.position = None

    def reserve(self, new_tokens: int) -> None:
        needed = self._length + new_tokens
        if needed <= self.capacity:
            return
        if self.static:
            raise RuntimeError(
                f"KVCache: {needed} positions needed but a static cache holds {self.capacity} (it cannot grow: "
                "captured graphs keep its buffers' addresses); size it for prompt + new tokens up front"
            )
        grow = max(needed, 2 * self.capacity) - self.capacity
        pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:3], grow, t.shape[4])], dim=3)  # noqa: E731
        self.keys, self.values = pad(self.keys), pad(self.values)
        self.key_valid = torch.cat([self.key_valid, self.key_valid.new_ones(self.key_valid.shape[0], grow)], 1)

    def mark_padding(self, attention_mask: torch.Tensor) -> None:
        """Record which of the next `attention_mask.shape[1]` positions are real (1) or padding (0)."""
        t = attention_mask.shape[1]
        self.reserve(t)
        self.key_valid[:, self._length : self._length + t] = attention_mask.bool()
        self.has_padding = self.has_padding or not bool(attention_mask.bool().all())

    def layer(self, index: int) -> LayerKV:
        """What layer `index` reads and writes: its buffers and the current offset."""
        return LayerKV(self.keys[index], self.values[index], self._length, self.position)

    def advance(self, tokens: int, on_device: bool = True) -> None:
        """Move the offset by `tokens`. `on_device=False` updates only the host copy: for a caller replaying a
        captured step, which already advanced `position` on the device."""
        self._length += tokens
        if self.position is not None and on_device:
            self.position += tokens

    def valid_keys(self, new_tokens: int) -> torch.Tensor | None:
        """key_valid up to the end of the next write, or None when nothing is padded."""
        return self.key_valid[:, : self._length + new_tokens] if self.has_padding else None

    def static_mask(self, q_len: int, window: int | None = None) -> torch.Tensor:
        """Boolean [B or 1, 1, q_len, capacity] mask for static mode: causal up to the device-side offset,
        minus left padding, optionally a sliding window. Built from device tensors only (no host sync)."""
        device = self.keys.device
        q_pos = self.position + torch.arange(q_len, device=device)
        k_pos = torch.arange(self.capacity, device=device)
        return position_mask(q_pos, k_pos, window, self.key_valid if self.has_padding else None)
