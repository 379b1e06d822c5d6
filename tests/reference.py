"""The oracle: tiny transformers reference models with sensitive weights, saved in the released layout.

Only tests import transformers model code. A parity test builds a reference model from a shrunk copy of the
released config (`configs/tiny.json` plus overrides), initialises every parameter explicitly so that every
path carries signal (see ../shared/DESIGN.md, "How we know it is right"), saves it with `save_pretrained`
(the released on-disk layout) and loads it with our `Qwen3Omni.from_pretrained`.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import math
import re
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.json"
# The released tensor list (../shared/reference/...weights.tsv), gzipped into the repo so CI has it.
RELEASED_WEIGHTS = ROOT / "tests" / "data" / "qwen3-omni-30b-a3b-instruct.weights.tsv.gz"


@functools.lru_cache(maxsize=1)
def _released_weights() -> tuple[tuple[str, tuple[int, ...]], ...]:
    rows = (line.split("\t") for line in gzip.decompress(RELEASED_WEIGHTS.read_bytes()).decode().splitlines())
    return tuple((name, tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())) for name, shape in rows)


def released_weights(prefix: str = "") -> dict[str, list[int]]:
    """Name -> shape of every tensor in the released checkpoint whose name starts with `prefix`."""
    return {name: list(shape) for name, shape in _released_weights() if name.startswith(prefix)}


def tiny_config(overrides: dict | None = None) -> dict:
    """configs/tiny.json with dotted-path overrides, e.g. {"thinker_config.text_config.num_experts": 4}."""
    cfg = json.loads(TINY.read_text())
    for path, value in (overrides or {}).items():
        node = cfg
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = copy.deepcopy(value)
    return cfg


def reference_config(cfg: dict, attn: str = "sdpa"):
    from transformers import Qwen3OmniMoeConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = Qwen3OmniMoeConfig(**copy.deepcopy(cfg))
    _set_attn(config, attn)
    return config


def _set_attn(config, attn: str) -> None:
    for sub in (config, config.thinker_config, config.thinker_config.text_config, config.thinker_config.audio_config,
                config.thinker_config.vision_config, config.talker_config, config.talker_config.text_config,
                config.talker_config.code_predictor_config, config.code2wav_config):
        sub._attn_implementation = attn


def build_reference(cfg: dict, seed: int = 0, attn: str = "sdpa"):
    """The full reference model (thinker + talker + code2wav) with sensitive weights, fp32, eval mode."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(reference_config(cfg, attn))
    sensitive_init_(model, seed)
    return model.float().eval()


def set_reference_attention(model, attn: str) -> None:
    """Switch a built reference model between "eager" and "sdpa" (for the tolerance calibration)."""
    _set_attn(model.config, attn)
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
            module.config._attn_implementation = attn


def save_reference(model, folder: Path) -> Path:
    folder = Path(folder)
    model.save_pretrained(folder)
    return folder


# ---- sensitive initialisation ------------------------------------------------------------------------------
def _normal(shape, std, g):
    return torch.randn(shape, generator=g) * std


def _fan_in(shape) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else shape[0]


CODE2WAV_CONV_GAIN = 0.6


def sensitive_value(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """The value a parameter of a sensitive fixture gets, by name and shape."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return 1.5 + torch.rand(shape, generator=g)  # a few units: attention is sharp, so RoPE matters
    if re.search(r"(embed_tokens|codec_embedding(\.\d+)?|code_embedding|pos_embed)\.weight$", name):
        return _normal(shape, 1.0, g)
    if name.startswith("code2wav."):
        return _code2wav_value(name, leaf, shape, g)
    if len(shape) == 1:
        if leaf == "bias":
            return _normal(shape, 0.1, g)
        return 1.0 + _normal(shape, 0.1, g)  # RMSNorm / LayerNorm weights
    if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
        return _normal(shape, 1.0 / math.sqrt(shape[-1]), g)
    return _normal(shape, 1.0 / math.sqrt(_fan_in(shape)), g)


def _code2wav_value(name, leaf, shape, g):
    if leaf == "scale" or leaf == "gamma":  # LayerScale / ConvNeXt gamma: let the residual branches speak
        return 0.5 + _normal(shape, 0.05, g)
    if leaf in ("alpha", "beta"):  # SnakeBeta log-parameters: exp(.) of order 1
        return _normal(shape, 0.5, g)
    if len(shape) == 1:
        return _normal(shape, 0.1, g) if leaf == "bias" else 1.0 + _normal(shape, 0.1, g)
    if ".conv." in f".{name}" or "dwconv" in name or name.endswith("conv1.conv.weight") or "conv2" in name:
        gain = CODE2WAV_CONV_GAIN
        if name.startswith("code2wav.decoder.") and shape[0] == 1:  # the last conv: keep the wave inside [-1, 1]
            gain = 0.3
        if "dwconv" in name:
            gain = 1.0
        # ConvTranspose1d weights are [in, out, k]: their fan-in is in * k / stride, approximated by in * k / 2.
        return _normal(shape, gain / math.sqrt(_fan_in(shape)), g)
    return _normal(shape, 1.0 / math.sqrt(_fan_in(shape)), g)


def sensitive_init_(model, seed: int = 0) -> None:
    """Overwrite every parameter of a reference model (built from config, some are torch.empty or zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(sensitive_value(name, tuple(p.shape), g).to(p.dtype))


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| relative to the reference's largest magnitude."""
    ours, ref = ours.double(), ref.double()
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
