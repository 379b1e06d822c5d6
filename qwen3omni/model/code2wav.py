"""Code2Wav: 16 codebooks per 80 ms frame -> 24 kHz waveform (1920 samples per frame).

    codes [B, 16, T] -> mean of the 16 codebook embeddings [B, T, C]
      -> pre_transformer: causal sliding-window (72 frames) transformer with LayerScale, plain RoPE
      -> upsample: per ratio (2, 2) a transposed conv + a causal ConvNeXt block            [B, C, 4T]
      -> decoder: causal conv, per rate (8, 5, 4, 3) SnakeBeta + transposed conv + 3 residual units
         (dilations 1, 3, 9), SnakeBeta, causal conv to one channel, clamp to [-1, 1]

Every layer is causal, so the whole model streams exactly: `streaming_decoder()` carries per-layer state
(a rolling window of keys/values, each conv's history, each transposed conv's last input) and emits every
sample as soon as the frames it depends on have arrived.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Code2WavConfig
from ..errors import InputError, describe
from ..modules.attention import Attention, decoder_mask, position_mask, set_attention_backend
from ..modules.causal_conv import (
    CausalConv1d,
    CausalConvTranspose1d,
    CausalSequential,
    ConvNeXtBlock1d,
    SnakeBeta,
    StreamState,
)
from ..modules.mlp import SwiGLU
from ..modules.norms import RMSNorm
from ..modules.rotary import RotaryEmbedding

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# ---- the sliding-window transformer ---------------------------------------------------------------------------
class LayerScale(nn.Module):
    """A learned per-channel gain on a residual branch."""

    def __init__(self, dim: int, init: float = 0.01):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Code2WavLayer(nn.Module):
    """Pre-norm attention and SwiGLU blocks whose residual branches go through LayerScale."""

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.self_attn = Attention(dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                   bias=cfg.attention_bias, qk_norm=False, eps=cfg.rms_norm_eps)
        self.mlp = SwiGLU(dim, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(dim, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(dim, cfg.rms_norm_eps)
        self.self_attn_layer_scale = LayerScale(dim, cfg.layer_scale_initial_scale)
        self.mlp_layer_scale = LayerScale(dim, cfg.layer_scale_initial_scale)

    def forward(self, x_BTC, rope, mask, kv=None):
        attn = self.self_attn(self.input_layernorm(x_BTC), rope, mask, kv)
        x_BTC = x_BTC + self.self_attn_layer_scale(attn)
        return x_BTC + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x_BTC)))


class SlidingKVCache:
    """Per layer, the keys/values of the last `keep` frames, in buffers of a fixed size.

    `update` returns the kept keys followed by the new ones, then copies the last `keep` of those into the
    buffers in place. The buffers start as zeros standing for frames before the stream's start, which the
    mask hides (`Code2WavTransformer.forward`), and the absolute position of the next frame is a device
    tensor: so every push of n frames runs the same kernels on the same addresses from the first frame on,
    which is what lets a push be replayed from a CUDA graph (`generation.graphs.GraphedStreamingDecoder`).
    Keys carry their rotary positions already, so nothing about them changes as the window slides.
    """

    def __init__(self, layers: int, keep: int):
        self.keep = keep
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.position: torch.Tensor | None = None  # [1] long: absolute frame index of the next input

    def positions(self, device) -> torch.Tensor:
        if self.position is None:
            self.position = torch.zeros(1, dtype=torch.long, device=device)
        return self.position

    def layer(self, index: int) -> _SlidingLayerKV:
        return _SlidingLayerKV(self, index)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is None:
            B, H, _, D = k.shape
            self.keys[layer] = k.new_zeros(B, H, self.keep, D)
            self.values[layer] = v.new_zeros(B, H, self.keep, D)
        k = torch.cat([self.keys[layer], k], dim=2)
        v = torch.cat([self.values[layer], v], dim=2)
        tail = k.shape[2] - self.keep
        self.keys[layer].copy_(k[:, :, tail:])
        self.values[layer].copy_(v[:, :, tail:])
        return k, v

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (*self.keys, *self.values, self.position) if t is not None]


class _SlidingLayerKV:
    """One layer's view of a `SlidingKVCache` (the `kv` an attention layer updates)."""

    def __init__(self, cache: SlidingKVCache, index: int):
        self.cache, self.index = cache, index

    def update(self, k: torch.Tensor, v: torch.Tensor):
        return self.cache.update(self.index, k, v)


class Code2WavTransformer(nn.Module):
    """The `pre_transformer`: causal attention limited to the last `sliding_window` frames (self included)."""

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.window = cfg.sliding_window
        self.layers = nn.ModuleList(Code2WavLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding.plain(cfg.head_dim, cfg.rope_theta)

    def new_cache(self) -> SlidingKVCache:
        return SlidingKVCache(len(self.layers), max(self.window - 1, 0))

    def forward(self, x_BTC: torch.Tensor, cache: SlidingKVCache | None = None) -> torch.Tensor:
        T, device = x_BTC.shape[1], x_BTC.device
        if cache is None:
            positions = torch.arange(T, device=device)
            # While every key is within the window the mask is plain causal, and SDPA takes its fast path.
            mask = decoder_mask(None, T, 0, self.window, device) if T > self.window else None
        else:
            # Keys: the `keep` buffered frames, then the T new ones; buffered slots before the stream's start
            # (negative positions) are zeros and masked out. Positions live on the device (see SlidingKVCache).
            start = cache.positions(device)
            positions = start + torch.arange(T, device=device)
            key_positions = start - cache.keep + torch.arange(cache.keep + T, device=device)
            mask = position_mask(positions, key_positions, self.window, (key_positions >= 0)[None])
        rope = self.rotary(positions.view(1, 1, T), dtype=x_BTC.dtype)
        for i, layer in enumerate(self.layers):
            x_BTC = layer(x_BTC, rope, mask, cache.layer(i) if cache is not None else None)
        if cache is not None:
            start.add_(T)
        return self.norm(x_BTC)


# ---- the convolutional decoder --------------------------------------------------------------------------------
class ResidualUnit(nn.Module):
    """x + conv1x1(snake(dilated causal conv7(snake(x))))."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConv1d(dim, dim, 7, dilation=dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConv1d(dim, dim, 1)

    def forward(self, x_BCT: torch.Tensor) -> torch.Tensor:
        # In place on the fresh conv output (its backward does not need it): saves a 24 kHz buffer.
        return self.conv2(self.act2(self.conv1(self.act1(x_BCT)))).add_(x_BCT)

    def step(self, x_BCT: torch.Tensor, state: StreamState) -> torch.Tensor:
        return self.conv2(self.act2(self.conv1.step(self.act1(x_BCT), state))).add_(x_BCT)


class DecoderBlock(nn.Module):
    """SnakeBeta, a ×rate causal transposed conv halving the channels, residual units with dilations 1/3/9."""

    def __init__(self, in_dim: int, out_dim: int, rate: int):
        super().__init__()
        units = [ResidualUnit(out_dim, dilation) for dilation in (1, 3, 9)]
        self.block = CausalSequential(SnakeBeta(in_dim), CausalConvTranspose1d(in_dim, out_dim, 2 * rate, rate), *units)

    def forward(self, x_BCT: torch.Tensor) -> torch.Tensor:
        return self.block(x_BCT)

    def step(self, x_BCT: torch.Tensor, state: StreamState) -> torch.Tensor:
        return self.block.step(x_BCT, state)


def _build_upsample(cfg: Code2WavConfig) -> CausalSequential:
    dim = cfg.hidden_size
    return CausalSequential(
        *(CausalSequential(CausalConvTranspose1d(dim, dim, r, r), ConvNeXtBlock1d(dim)) for r in cfg.upsampling_ratios)
    )


def _build_decoder(cfg: Code2WavConfig) -> CausalSequential:
    dims = [cfg.decoder_dim // 2**i for i in range(len(cfg.upsample_rates) + 1)]
    blocks = [DecoderBlock(dims[i], dims[i + 1], rate) for i, rate in enumerate(cfg.upsample_rates)]
    return CausalSequential(
        CausalConv1d(cfg.hidden_size, dims[0], 7), *blocks, SnakeBeta(dims[-1]), CausalConv1d(dims[-1], 1, 7)
    )


# ---- the model --------------------------------------------------------------------------------------------------
class Code2Wav(nn.Module):
    """The vocoder (`code2wav.*` in the checkpoint): `forward`, the reference's `chunked_decode`, and an exact
    incremental `streaming_decoder()`."""

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.config = cfg
        self.code_embedding = nn.Embedding(cfg.codebook_size * cfg.num_quantizers, cfg.hidden_size)
        self.register_buffer("code_offset", torch.empty(1, cfg.num_quantizers, 1, dtype=torch.long), persistent=False)
        self.pre_transformer = Code2WavTransformer(cfg)
        self.upsample = _build_upsample(cfg)
        self.decoder = _build_decoder(cfg)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Quantizer q's codes live in rows [q * codebook_size, (q + 1) * codebook_size) of the one table."""
        with torch.device("cpu"):
            offset = torch.arange(self.config.num_quantizers).view(1, -1, 1) * self.config.codebook_size
        self.code_offset = offset.to(self.code_offset.device)

    def set_attention_backend(self, backend: str) -> None:
        set_attention_backend(self, backend, "backend")

    @property
    def samples_per_frame(self) -> int:
        return self.config.samples_per_frame

    def num_samples(self, frames: int) -> int:
        """Length of `forward`'s waveform for `frames` frames: each transposed conv drops the output of its
        last `lookahead` inputs (555 samples in all for the released config: 1920 * T - 555)."""
        n = frames
        for module in (*self.upsample.modules(), *self.decoder.modules()):
            if isinstance(module, CausalConvTranspose1d):
                n = max(n - module.lookahead, 0) * module.stride
        return n

    # ---- offline ----------------------------------------------------------------------------------------------
    def check_codes(self, codes, name: str = "codes", allow_empty: bool = False) -> None:
        """Raise InputError unless `codes` is an integer tensor [B, num_quantizers, T] of valid code ids."""
        q, size = self.config.num_quantizers, self.config.codebook_size
        if not isinstance(codes, torch.Tensor) or codes.dtype not in _INTEGER_DTYPES:
            raise InputError(f"{name}: expected an integer tensor [batch, {q}, frames], got {describe(codes)}")
        if codes.dim() != 3 or codes.shape[1] != q:
            raise InputError(f"{name}: expected shape [batch, {q}, frames] ({q} quantizers), got {list(codes.shape)}")
        if codes.shape[0] == 0:
            raise InputError(f"{name}: expected at least one row, got shape {list(codes.shape)}")
        if codes.shape[-1] == 0:
            if allow_empty:
                return
            raise InputError(f"{name}: expected at least one frame, got shape {list(codes.shape)}")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= size:
            bad = low if low < 0 else high
            raise InputError(f"{name}: code values must lie in [0, {size}), got {bad}")

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Mean of the quantizers' embeddings: [B, Q, T] -> [B, T, C]."""
        B, Q, T = codes.shape
        rows_BTQ = (codes + self.code_offset).transpose(1, 2).reshape(B * T, Q)
        return F.embedding_bag(rows_BTQ, self.code_embedding.weight, mode="mean").view(B, T, -1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, num_quantizers, T] (integers) -> waveform [B, 1, num_samples(T)] in [-1, 1]."""
        self.check_codes(codes)
        h_BTC = self.pre_transformer(self.embed(codes))
        wav = self.decoder(self.upsample(h_BTC.transpose(1, 2)))
        return wav.clamp(-1.0, 1.0)

    def chunked_decode(self, codes: torch.Tensor, chunk_size: int = 300, left_context_size: int = 25) -> torch.Tensor:
        """Decode `chunk_size` frames at a time, each with up to `left_context_size` earlier frames of context
        whose samples are then discarded, exactly as the reference (and its `generate`) does.

        Each chunk's wave lacks the tail that `forward` drops (555 samples for the released config), so every
        seam between chunks skips those samples and the result is shorter than `forward`'s; attention and
        convs also see only `left_context_size` frames back across a seam. `streaming_decoder()` has neither
        gap nor cut-off context.
        """
        self.check_codes(codes)
        for arg, value, least in (("chunk_size", chunk_size, 1), ("left_context_size", left_context_size, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise InputError(f"{arg}: expected an integer >= {least}, got {describe(value)}")
        pieces, start, total = [], 0, codes.shape[-1]
        while start < total:
            end = min(start + chunk_size, total)
            context = left_context_size if start > left_context_size else start
            wav = self(codes[..., start - context : end])
            pieces.append(wav[..., context * self.samples_per_frame :])
            start = end
        return torch.cat(pieces, dim=-1)

    def streaming_decoder(self) -> StreamingDecoder:
        """A fresh incremental decoder: `push(codes)` returns new samples, `flush()` ends the stream."""
        return StreamingDecoder(self)


class StreamingDecoder:
    """Incremental Code2Wav: `push(codes [B, Q, n])` returns the new final samples [B, m]; `flush()` ends it.

    The concatenation of everything returned equals `Code2Wav.forward` on all the codes pushed. State, all of
    fixed size whatever the stream's length:
    - the attention keys/values of the last `sliding_window - 1` frames per layer (RoPE positions keep
      counting from the start of the stream, as in the offline pass);
    - for every causal conv, its last `(kernel - 1) * dilation` input samples (zeros at the start, which is
      exactly the offline left padding; stride 1 everywhere, so there is no right padding to wait for);
    - for every `kernel = 2 * stride` transposed conv of the decoder, its last input sample: the output block
      of an input needs the next input too, so each such conv holds back one block. After t >= 1 frames,
      `num_samples(t)` = 1920 t - 555 samples have been emitted (released config); the 555 held back
      (8 * 60 + 5 * 12 + 4 * 3 + 3) come out as soon as the next frame is pushed.
    The offline forward drops those same samples at the end of the sequence (the transposed convs' right
    trim), so they are never final: `flush()` returns nothing new and resets the decoder for a new stream.
    Each push costs what its new frames cost offline plus a fixed overhead (the window and the histories),
    independent of how many frames came before.

    The state is allocated in full by the first push and then updated in place (a reset zeroes it), so after
    the first push every push of n frames reads and writes the same addresses: `steady` says so, and
    `generation.graphs.GraphedStreamingDecoder` replays such pushes from CUDA graphs.
    """

    def __init__(self, model: Code2Wav):
        self.model = model
        self.cache = model.pre_transformer.new_cache()
        self.conv_state: StreamState = {}
        self.batch: int | None = None
        self.frames = 0
        self.emitted = 0

    def reset(self) -> None:
        """Start a new stream: the state goes back to zeros, in place (its buffers are kept for reuse)."""
        with torch.no_grad():
            for t in self.state_tensors():
                t.zero_()
        for module, value in self.conv_state.items():
            if isinstance(value, tuple):  # a transposed conv: it drops its first `trim` outputs again
                self.conv_state[module] = (value[0], module.trim)
        self.batch = None
        self.frames = 0
        self.emitted = 0

    @property
    def held_back(self) -> int:
        """Samples of the frames pushed so far that are not yet final (waiting for the next frame)."""
        return self.frames * self.model.samples_per_frame - self.emitted

    @property
    def steady(self) -> bool:
        """Whether the next push of n frames runs exactly what every later push of n frames runs: the state
        exists and no transposed conv still has start-up outputs to drop (true after the first push)."""
        return self.frames > 0 and all(v[1] == 0 for v in self.conv_state.values() if isinstance(v, tuple))

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor the stream carries (updated in place by each push)."""
        convs = [v[0] if isinstance(v, tuple) else v for v in self.conv_state.values()]
        return self.cache.tensors() + convs

    def state_numel(self) -> int:
        """Number of elements of all carried state: fixed from the first push on."""
        return sum(t.numel() for t in self.state_tensors())

    @torch.no_grad()  # state carried across calls must not hold autograd graphs (they would grow with the stream)
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        """Decode the next `n` frames [B, Q, n] (n may be 0); return every sample that became final, [B, m]."""
        self.check(codes)
        if codes.shape[-1] == 0:
            return self._empty()
        return self.record(codes.shape[-1], self.decode(codes))

    def check(self, codes: torch.Tensor) -> None:
        """Raise InputError unless `codes` can be this stream's next push; a new stream adopts its batch size."""
        self.model.check_codes(codes, allow_empty=True)
        if self.batch is not None and codes.shape[0] != self.batch:
            raise InputError(f"codes: this stream has batch size {self.batch}, got {list(codes.shape)}")
        kept = self.cache.keys[0] if self.cache.keys else None
        if self.frames == 0 and kept is not None:  # a new stream on the buffers of an earlier one: new buffers
            weight = self.model.code_embedding.weight  # if its batch size differs or the model has moved
            if (kept.shape[0], kept.device, kept.dtype) != (codes.shape[0], weight.device, weight.dtype):
                self.cache, self.conv_state = self.model.pre_transformer.new_cache(), {}
        self.batch = codes.shape[0]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The device work of a push of checked codes: the new samples [B, m], clamped. The state advances."""
        model = self.model
        h_BTC = model.pre_transformer(model.embed(codes), cache=self.cache)
        wav = model.decoder.step(model.upsample.step(h_BTC.transpose(1, 2), self.conv_state), self.conv_state)
        return wav[:, 0].clamp(-1.0, 1.0)

    def record(self, frames: int, samples: torch.Tensor) -> torch.Tensor:
        """Host-side bookkeeping of a push of `frames` frames that returned `samples`."""
        self.frames += frames
        self.emitted += samples.shape[-1]
        return samples

    def flush(self) -> torch.Tensor:
        """End the stream: return the samples still owed (none: see the class note) and reset for a new one."""
        tail = self._empty()
        self.reset()
        return tail

    def _empty(self) -> torch.Tensor:
        weight = self.model.code_embedding.weight
        return torch.zeros(self.batch or 0, 0, dtype=weight.dtype, device=weight.device)
