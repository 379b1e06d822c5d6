"""Attention: one call signature over three backends (SDPA, flash-attn, an eager reference).

Tensors are [batch, heads, time, head_dim]. Keys and values may have fewer heads than queries (GQA).
Masks are boolean, True where a query may attend, broadcastable to [batch, 1, q_len, k_len].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .few_rows import FewRowLinear
from .norms import RMSNorm
from .rotary import apply_rotary

BACKENDS = ("sdpa", "eager", "flash")

try:  # flash-attn is an optional CUDA extra
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except Exception:  # noqa: BLE001 - any import failure just means "not available"
    flash_attn_func = flash_attn_varlen_func = None


def flash_usable(q: torch.Tensor) -> bool:
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def check_backend(backend: str, name: str = "attention") -> str:
    """`backend` if it names an attention backend usable here; else an InputError naming `name`."""
    if backend not in BACKENDS:
        raise InputError(f"{name}: expected one of {list(BACKENDS)}, got {backend!r}")
    if backend == "flash" and flash_attn_func is None:
        raise InputError(f"{name}: 'flash' needs the flash-attn package (pip install 'qwen3omni[cuda]'), "
                         "which is not installed here")
    return backend


def set_attention_backend(module: nn.Module, backend: str, name: str = "attention") -> None:
    """Make every attention inside `module` use `backend`: "sdpa" (the default), "flash" or "eager".

    Each module that picks an attention kernel keeps its choice in `.backend` (decoder `Attention` layers,
    the audio and vision towers, which run flash-attn's varlen kernel over their packed windows). With
    "flash", a call flash-attn cannot take (CPU, float32, or a mask: left padding, a sliding window, a static
    cache) still runs SDPA, so the choice is safe for any input; "eager" is the slow reference.
    """
    check_backend(backend, name)
    for m in module.modules():
        if getattr(m, "backend", None) in BACKENDS:
            m.backend = backend


def _eager(q, k, v, mask, causal, scale):
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1)
    if mask is not None:  # a query with no visible key outputs zeros (as SDPA does), not NaN
        probs = probs.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return torch.matmul(probs.to(q.dtype), v)


def _one_query(q, k, v, mask, scale):
    """Attention of one query per head as plain products and sums, which inductor fuses with the norms,
    rotary and cache writes around them: inside a compiled CPU decode step this replaces SDPA's kernel call,
    whose fixed cost (~50 us a call in a decode step here) outweighs the work for one query (measured:
    compiled workload C ~8% faster per token). Query heads are grouped per key head (head h reads key head
    h // groups, as `enable_gqa` does); products and sums run in float32, as SDPA's CPU kernel accumulates;
    a query with no visible key outputs zeros, as SDPA does. CPU only: on an H200 it made a compiled speech
    frame slower (9.28 against 7.84 ms, scripts/results/gpu_check_h200_session8_experiments.log)."""
    B, H, _, D = q.shape
    groups = H // k.shape[1]
    q_BKGD = q.reshape(B, k.shape[1], groups, D)
    scores = (q_BKGD.float().unsqueeze(3) * k.float().unsqueeze(2)).sum(-1) * scale  # [B, Hkv, groups, S]
    if mask is not None:  # [B or 1, 1, 1, S]: broadcasts over key heads and groups
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return (probs.unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2).to(v.dtype).reshape(B, H, 1, D)


def _one_query_mask(mask: torch.Tensor | None) -> bool:
    """No mask, or a decoder's one-query mask: boolean [B or 1, 1, 1, S] (what `_one_query` broadcasts)."""
    return mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1:3] == (1, 1))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    backend: str = "sdpa",
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v. `causal` aligns the last query with the last key (decode-friendly)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if causal and q.shape[2] == 1:
        causal = False  # a single new query sees every cached key anyway
    if backend == "eager":
        return _eager(q, k, v, mask, causal, scale)
    if backend == "flash" and mask is None and flash_usable(q):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn wants [B, T, H, D]
        return flash_attn_func(q, k, v, causal=causal, softmax_scale=scale).transpose(1, 2)
    if q.shape[2] == 1 and q.device.type == "cpu" and torch.compiler.is_compiling() and _one_query_mask(mask):
        return _one_query(q, k, v, mask, scale)
    if causal and q.shape[2] != k.shape[2]:
        # SDPA's is_causal aligns top-left; spell out the bottom-right mask for a query block after a cache.
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
        causal = False
    # bool(): under torch.compile with symbolic head counts the comparison is a SymBool, which SDPA refuses (a
    # graph break on every call); bool() specialises the graph on it instead.
    gqa = bool(q.shape[1] != k.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


def attend_segments(
    q_NHD: torch.Tensor, k_NHD: torch.Tensor, v_NHD: torch.Tensor, cu_seqlens: torch.Tensor, backend: str = "sdpa"
) -> torch.Tensor:
    """Block-diagonal attention over packed segments (images, video frames, audio windows).

    `cu_seqlens` = [0, end_0, end_1, ...]. With flash-attn on CUDA this is one varlen kernel; otherwise the
    segments are grouped by length and each group runs as one batched SDPA call, so memory stays linear in
    the total length (a dense block mask over a 40-minute recording would not fit).
    """
    if backend == "flash" and flash_attn_varlen_func is not None and flash_usable(q_NHD):
        cu = cu_seqlens.to(device=q_NHD.device, dtype=torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        return flash_attn_varlen_func(q_NHD, k_NHD, v_NHD, cu, cu, longest, longest, causal=False)
    bounds = cu_seqlens.tolist()
    out = torch.empty_like(q_NHD)
    by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    for length, starts in by_length.items():
        device = q_NHD.device
        index = (torch.tensor(starts, device=device)[:, None] + torch.arange(length, device=device)).flatten()
        q, k, v = (t[index].unflatten(0, (len(starts), length)).transpose(1, 2) for t in (q_NHD, k_NHD, v_NHD))
        o = attend(q, k, v, backend="eager" if backend == "eager" else "sdpa")
        out[index] = o.transpose(1, 2).flatten(0, 1)
    return out


def decoder_mask(
    key_valid: torch.Tensor | None, q_len: int, start: int, window: int | None = None, device=None
) -> torch.Tensor | None:
    """Boolean [B, 1, q_len, start + q_len] mask: causal, minus left padding, optionally a sliding window.

    `key_valid` [B, >= start + q_len] is False at padded key positions. Returns None when plain causal
    attention over the whole prefix is enough (no padding, no window), so SDPA can take its fast path.
    A padded query sees no key at all; `attend` returns zeros for such rows (SDPA's behaviour, which the
    reference relies on), so they never turn into NaN.
    """
    k_len = start + q_len
    if key_valid is None and window is None:
        return None
    q_pos = torch.arange(start, k_len, device=key_valid.device if key_valid is not None else device)
    k_pos = torch.arange(k_len, device=q_pos.device)
    return position_mask(q_pos, k_pos, window, None if key_valid is None else key_valid[:, :k_len])


def position_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None, key_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean [B or 1, 1, Q, K]: a query at q_pos sees the keys at or before it, within `window` positions,
    that are not padding (`key_valid` [B, K]). Device tensors only, so it also serves a static cache whose
    query positions live on the device."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
    allowed = allowed[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    return allowed


class Attention(nn.Module):
    """Grouped-query self-attention with optional RMSNorm on q and k (per head), rotary and a KV cache."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        bias: bool = False,
        qk_norm: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = FewRowLinear(dim, num_heads * head_dim, bias=bias)
        self.k_proj = FewRowLinear(dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = FewRowLinear(dim, num_kv_heads * head_dim, bias=bias)
        self.o_proj = FewRowLinear(num_heads * head_dim, dim, bias=bias)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.backend = "sdpa"

    def forward(
        self,
        x_BTC: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        kv=None,
    ) -> torch.Tensor:
        """`kv`: this layer's cache view (`KVCache.layer(i)`), or None without a cache."""
        B, T, _ = x_BTC.shape
        q = self.q_proj(x_BTC).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x_BTC).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_BTC).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = (t.unsqueeze(1) for t in rope)  # [B, 1, T, D] against [B, H, T, D]
        q = apply_rotary(q.transpose(1, 2), cos, sin)
        k = apply_rotary(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        if kv is not None:
            k, v = kv.update(k, v)
        out = attend(q, k, v, mask=mask, causal=mask is None, backend=self.backend)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
