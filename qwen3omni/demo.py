"""A self-contained demo: the tiny model with random weights, a byte-level tokenizer and synthetic media.

Nothing is downloaded and no weights are needed, so the whole pipeline (processor, thinker, talker, code
predictor, streaming Code2Wav) runs anywhere in seconds. The words and the voice are noise; the pipeline is
the real one.
"""

from __future__ import annotations

import json
import math
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import Qwen3OmniConfig

# The released vocabulary's special tokens and role words, at their released ids.
SPECIAL_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
    "<|audio_start|>": 151669, "<|audio_end|>": 151670, "<|tts_pad|>": 151671, "<|tts_bos|>": 151672,
    "<|tts_eos|>": 151673, "<|audio_pad|>": 151675,
}
ROLE_IDS = {"system": 8948, "user": 872, "assistant": 77091}
NAMED_TOKENS = {
    "image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "audio_token": "<|audio_pad|>",
    "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
}


def tiny_config() -> Qwen3OmniConfig:
    """configs/tiny.json (shipped inside the package): the released structure and token ids, small widths."""
    text = resources.files("qwen3omni").joinpath("assets/tiny.json").read_text()
    return Qwen3OmniConfig.from_dict(json.loads(text))


def byte_level_tokenizer(role_tokens: bool = True):
    """One token per byte, plus the special tokens (and role words) at their released ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update(SPECIAL_IDS)
    if role_tokens:
        vocab.update(ROLE_IDS)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_IDS])
    if role_tokens:
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in ROLE_IDS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    for name, token in NAMED_TOKENS.items():
        setattr(tokenizer, name, token)
    return tokenizer


@torch.no_grad()
def random_init_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic random weights with unit-gain layers, so every stage produces non-trivial output."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        shape = p.shape
        if name.endswith(("norm.weight", "layernorm.weight", "ln_q.weight", "ln_post.weight")) or "norm1" in name \
                or "norm2" in name or name.endswith(("q_norm.weight", "k_norm.weight")):
            value = torch.ones(shape)
        elif name.endswith(("scale", "gamma")):
            value = torch.full(shape, 0.3)
        elif name.endswith(("alpha", "beta")) or p.dim() == 1:
            value = torch.zeros(shape)
        elif "embed" in name and p.dim() == 2:
            value = torch.randn(shape, generator=g)
        else:
            fan_in = shape[-1] if "experts" in name else math.prod(shape[1:])
            gain = 1.0
            if name.startswith("code2wav.decoder") and p.dim() == 3:  # keep the vocoder's output inside [-1, 1]
                gain = 3.0 if shape[0] == 1 else 0.6
            value = torch.randn(shape, generator=g) * gain / math.sqrt(fan_in)
        p.copy_(value.to(p.dtype))
    return model


def synthetic_speech(seconds: float = 2.0, rate: int = 16000) -> np.ndarray:
    """A vowel-like buzz with a wandering pitch: harmonic-rich audio in place of a recording."""
    t = np.arange(int(seconds * rate)) / rate
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 12))
    return (0.3 * wave * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def synthetic_image(width: int = 96, height: int = 64) -> np.ndarray:
    """A colourful gradient with a disc, as an RGB uint8 array."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([255 * x / width, 255 * y / height, 128 + 0 * x], axis=-1)
    disc = (x - width / 2) ** 2 + (y - height / 2) ** 2 < (height / 4) ** 2
    img[disc] = [250, 220, 40]
    return img.astype(np.uint8)


def run_demo(out: str | Path = "reply.wav", seed: int = 0, max_new_tokens: int = 16, frames: int = 30) -> dict:
    """Build the tiny model, stream an audio + image + text conversation, write the reply, report timings."""
    import soundfile

    from .model.omni import Qwen3Omni
    from .processing import Processor

    torch.manual_seed(seed)
    model = random_init_(Qwen3Omni(tiny_config()), seed).eval()
    processor = Processor(byte_level_tokenizer())
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "You are Qwen-Omni, a helpful assistant."}]},
        {"role": "user", "content": [
            {"type": "audio", "audio": synthetic_speech(), "sampling_rate": 16000},
            {"type": "image", "image": synthetic_image()},
            {"type": "text", "text": "What do you hear and see?"},
        ]},
    ]
    batch = processor(conversation)
    start = time.perf_counter()
    first_audio, tokens, audio = None, [], []
    for event in model.stream(**batch, max_new_tokens=max_new_tokens, talker_max_new_tokens=frames,
                              generator=torch.Generator().manual_seed(seed)):
        if event.kind == "text":
            tokens.append(event.data)
        else:
            first_audio = first_audio if first_audio is not None else time.perf_counter() - start
            audio.append(event.data)
    elapsed = time.perf_counter() - start
    wave = torch.cat(audio) if audio else torch.zeros(0)
    soundfile.write(str(out), wave.numpy(), 24000)
    seconds = wave.numel() / 24000
    return {
        "prompt_tokens": int(batch["input_ids"].shape[1]),
        "token_ids": torch.cat(tokens).tolist() if tokens else [],
        "audio_seconds": round(seconds, 3),
        "time_to_first_audio_s": None if first_audio is None else round(first_audio, 3),
        "real_time_factor": None if seconds == 0 else round(elapsed / seconds, 3),
        "wall_s": round(elapsed, 3),
        "out": str(out),
    }
