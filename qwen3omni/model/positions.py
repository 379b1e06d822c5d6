"""Token counts and TM-RoPE position ids, as small pure functions.

The audio length rule lives here because both the processor (how many `<|audio_pad|>` tokens to write) and
the audio encoder (how many features it returns) must agree on it.
"""

from __future__ import annotations


def _ceil_half(n):
    # One stride-2, kernel-3, padding-1 convolution: ceil(n / 2) outputs (0 for an empty input).
    return -(-n // 2)


def audio_token_count(mel_frames, n_window: int = 50):
    """Audio tokens the AuT encoder emits for `mel_frames` log-mel frames (int or integer tensor).

    The encoder cuts the features into chunks of `2 * n_window` frames and runs three stride-2 convolutions
    on each chunk separately, so a full chunk of 100 frames gives 13 tokens (one per 80 ms, nearly) and the
    tail chunk gives ceil(ceil(ceil(rest / 2) / 2) / 2).
    """
    chunk = 2 * n_window
    per_chunk = _ceil_half(_ceil_half(_ceil_half(chunk)))
    rest = mel_frames % chunk
    return (mel_frames // chunk) * per_chunk + _ceil_half(_ceil_half(_ceil_half(rest)))


def text_positions(attention_mask, shape, device=None):
    """TM-RoPE ids [3, B, T] for text: equal on all axes, counting real tokens only (left padding gets 1,
    as the reference writes; padded positions are masked anyway)."""
    import torch

    B, T = shape
    if attention_mask is None:
        return torch.arange(T, device=device, dtype=torch.float32).expand(3, B, T)
    mask = attention_mask.bool()
    pos = mask.float().cumsum(-1) - 1
    return pos.masked_fill(~mask, 1.0).expand(3, B, T)


def rope_index(cfg, input_ids, attention_mask, audio_mel_lengths=None, image_grid_thw=None, video_grid_thw=None,
               video_second_per_grid=None, use_audio_in_video=False):
    """TM-RoPE position ids [3, B, T] (float) for a prompt with text, audio, images and video."""
    if image_grid_thw is None and video_grid_thw is None:
        return text_positions(attention_mask, input_ids.shape, input_ids.device)
    raise NotImplementedError("multimodal positions: perception issue")
