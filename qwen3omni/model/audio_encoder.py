"""AuT audio encoder (`thinker.audio_tower`): log-mel features -> one embedding per ~80 ms of audio.

The features of each clip are cut into chunks of `2 * n_window` mel frames (1 s in the released model). Every
chunk goes through three stride-2 convolutions on its own and gets sinusoidal positions that restart at 0,
so the encoder never sees absolute time. The transformer layers then attend inside windows of
`n_window_infer` mel frames (8 s released) that are aligned with the chunks; the windows are packed segments
for `attend_segments`, so memory and time grow linearly with the length of a recording.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import AudioEncoderConfig
from ..errors import InputError, describe
from ..modules.activations import activation
from ..modules.attention import attend_segments
from .positions import audio_token_count


class AudioAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x_NC: torch.Tensor, cu_seqlens: torch.Tensor, backend: str) -> torch.Tensor:
        N = x_NC.shape[0]
        q, k, v = (proj(x_NC).view(N, self.num_heads, -1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attend_segments(q, k, v, cu_seqlens, backend).reshape(N, -1))


class AudioEncoderLayer(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.self_attn = AudioAttention(cfg.d_model, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)
        self.act = activation(cfg.activation_function)

    def forward(self, x_NC: torch.Tensor, cu_seqlens: torch.Tensor, backend: str) -> torch.Tensor:
        x_NC = x_NC + self.self_attn(self.self_attn_layer_norm(x_NC), cu_seqlens, backend)
        x_NC = x_NC + self.fc2(self.act(self.fc1(self.final_layer_norm(x_NC))))
        if x_NC.dtype == torch.float16:  # keep fp16 inference finite, as the released model was run
            limit = torch.finfo(torch.float16).max - 1000
            x_NC = x_NC.clamp(-limit, limit)
        return x_NC


def sinusoid_table(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """[length, channels] Whisper-style positions: sin of every timescale, then cos of every timescale."""
    half = channels // 2
    step = math.log(max_timescale) / (half - 1)
    inv_timescales = torch.exp(-step * torch.arange(half).float())
    angles = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def chunk_lengths(feature_lens: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per clip, its number of chunks; per chunk (all clips in order), its number of mel frames."""
    n_chunks = -(-feature_lens // chunk)
    lengths = torch.full((int(n_chunks.sum()),), chunk, dtype=torch.long, device=feature_lens.device)
    tail = feature_lens % chunk
    last = n_chunks.cumsum(0) - 1  # each clip's last chunk
    has_tail = (tail > 0) & (n_chunks > 0)
    lengths[last[has_tail]] = tail[has_tail]
    return n_chunks, lengths


def window_seqlens(tokens_per_clip: torch.Tensor, window: int) -> torch.Tensor:
    """cu_seqlens [0, end_0, ...] cutting each clip's tokens into windows of `window` (the last one shorter)."""
    full, rest = tokens_per_clip // window, tokens_per_clip % window
    n_windows = full + (rest > 0).long()
    lengths = torch.full((int(n_windows.sum()),), window, dtype=torch.long, device=tokens_per_clip.device)
    last = n_windows.cumsum(0) - 1
    lengths[last[rest > 0]] = rest[rest > 0]
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.config = cfg
        c = cfg.downsample_hidden_size
        self.conv2d1 = nn.Conv2d(1, c, 3, 2, padding=1)
        self.conv2d2 = nn.Conv2d(c, c, 3, 2, padding=1)
        self.conv2d3 = nn.Conv2d(c, c, 3, 2, padding=1)
        freq = cfg.num_mel_bins
        for _ in range(3):
            freq = (freq + 1) // 2
        self.conv_out = nn.Linear(c * freq, cfg.d_model, bias=False)
        self.layers = nn.ModuleList(AudioEncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.ln_post = nn.LayerNorm(cfg.d_model)
        self.proj1 = nn.Linear(cfg.d_model, cfg.d_model)
        self.proj2 = nn.Linear(cfg.d_model, cfg.output_dim)
        self.act = activation(cfg.activation_function)
        self.backend = "sdpa"  # "flash" uses flash-attn varlen on CUDA when it is installed
        self.gradient_checkpointing = False  # see qwen3omni.training.set_gradient_checkpointing
        self.register_buffer("positions", torch.empty(cfg.max_source_positions, cfg.d_model), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        with torch.device("cpu"):
            table = sinusoid_table(self.config.max_source_positions, self.config.d_model)
        self.positions = table.to(self.positions.device)

    @property
    def chunk_frames(self) -> int:
        return 2 * self.config.n_window

    def forward(self, input_features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        """[num_clips, mel_bins, frames] (right-padded) + frames per clip -> [total audio tokens, output_dim].

        Clip i contributes `audio_token_count(feature_lens[i], n_window)` rows, clips in order.
        """
        feature_lens = self._check(input_features, feature_lens)
        if len(feature_lens) == 0:
            return input_features.new_zeros(0, self.config.output_dim, dtype=self.proj2.weight.dtype)
        n_chunks, lengths = chunk_lengths(feature_lens, self.chunk_frames)
        chunks = self._chunks(input_features, feature_lens, n_chunks, int(lengths.max()))
        x_KTC = self._downsample(chunks)
        tokens_per_chunk = audio_token_count(lengths, self.config.n_window)
        valid_KT = torch.arange(x_KTC.shape[1], device=x_KTC.device) < tokens_per_chunk[:, None]
        x_NC = x_KTC[valid_KT]
        cu_seqlens = self._windows(feature_lens, int(tokens_per_chunk.max()))
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x_NC = checkpoint(layer, x_NC, cu_seqlens, self.backend, use_reentrant=False)
            else:
                x_NC = layer(x_NC, cu_seqlens, self.backend)
        return self.proj2(self.act(self.proj1(self.ln_post(x_NC))))

    def _check(self, input_features: torch.Tensor, feature_lens) -> torch.Tensor:
        bins = self.config.num_mel_bins
        if input_features.ndim != 3 or input_features.shape[1] != bins:
            raise InputError(
                f"input_features: expected [num_audios, {bins}, frames], got {describe(input_features)}"
            )
        feature_lens = torch.as_tensor(feature_lens, device=input_features.device).long().reshape(-1)
        if feature_lens.shape[0] != input_features.shape[0]:
            raise InputError(
                f"feature_lens: expected one length per audio ({input_features.shape[0]}), got {describe(feature_lens)}"
            )
        if len(feature_lens) and (int(feature_lens.min()) < 1 or int(feature_lens.max()) > input_features.shape[-1]):
            raise InputError(
                f"feature_lens: each length must be in 1..{input_features.shape[-1]} (the padded frame count), "
                f"got {feature_lens.tolist()}"
            )
        return feature_lens

    def _chunks(self, features, feature_lens, n_chunks, width: int) -> torch.Tensor:
        """[total chunks, 1, mel_bins, width]: every chunk of every clip, zero beyond each clip's end.

        All chunks share one width (the longest chunk) and the padding is zeros, as the released model was run:
        after the first GELU the padding is no longer zero, so a short tail chunk depends on it.
        """
        B, bins, F_ = features.shape
        size = self.chunk_frames
        per_clip = -(-F_ // size)
        inside_BF = torch.arange(per_clip * size, device=features.device) < feature_lens[:, None]
        padded = F.pad(features, (0, per_clip * size - F_)).masked_fill(~inside_BF[:, None, :], 0.0)
        chunks = padded.view(B, bins, per_clip, size).permute(0, 2, 1, 3)  # [B, chunks, bins, size]
        keep = torch.arange(per_clip, device=features.device) < n_chunks[:, None]
        return chunks[keep][..., :width].unsqueeze(1).to(self.conv2d1.weight.dtype)

    def _downsample(self, chunks: torch.Tensor) -> torch.Tensor:
        """Three stride-2 convs (in batches of `conv_chunksize` chunks, to bound memory) -> [chunks, T', d_model]
        with sinusoidal positions restarting in every chunk."""
        outs = []
        for part in chunks.split(self.config.conv_chunksize, dim=0):
            for conv in (self.conv2d1, self.conv2d2, self.conv2d3):
                part = F.gelu(conv(part))
            outs.append(part)
        x = torch.cat(outs, dim=0)  # [K, C, F', T']
        K, C, Fr, T = x.shape
        if T > self.positions.shape[0]:
            raise InputError(
                f"audio chunks of {chunks.shape[-1]} frames give {T} positions; max_source_positions is "
                f"{self.positions.shape[0]}"
            )
        x = self.conv_out(x.permute(0, 3, 1, 2).reshape(K, T, C * Fr))
        return x + self.positions[:T].to(x.dtype)

    def _windows(self, feature_lens: torch.Tensor, tokens_per_full_chunk: int) -> torch.Tensor:
        """Attention windows: `n_window_infer // (2 n_window)` chunks' worth of tokens, per clip.

        The window is measured in tokens of the longest chunk present, as the released model computes it.
        """
        chunks_per_window = self.config.n_window_infer // self.chunk_frames
        window = max(1, tokens_per_full_chunk * chunks_per_window)
        tokens = audio_token_count(feature_lens, self.config.n_window)
        return window_seqlens(tokens, window)
