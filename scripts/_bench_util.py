"""Helpers shared by scripts/bench.py and scripts/gpu_check.py: configs, twin models, timing, memory.

Twin models: the transformers reference is built with random weights at the requested size, and our module
gets the very same tensors (the in-memory names match, experts included: both stack them as [E, 2I, H] /
[E, H, I]), so both sides compute on identical weights and the weights exist once in memory. The bench
checks that the two sides agree on each workload's output before it times anything.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout where the package is not installed (e.g. a lent GPU machine)
    sys.path.insert(1, str(ROOT))
REAL_CONFIG = ROOT / "configs" / "qwen3-omni-30b-a3b-instruct.json"

# Encoders are not part of the text/speech workloads: shrink them so they cost no memory or build time.
TINY_AUDIO = {
    "d_model": 32, "encoder_attention_heads": 4, "encoder_ffn_dim": 64, "encoder_layers": 1,
    "downsample_hidden_size": 8,
}
TINY_VISION = {
    "depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "num_position_embeddings": 64,
    "deepstack_visual_indexes": [0],
}


# ---- configs ---------------------------------------------------------------------------------------------------
def real_config() -> dict:
    return json.loads(REAL_CONFIG.read_text())


def bench_config(
    thinker_layers: int | None = None,
    thinker_text: dict | None = None,
    talker_layers: int | None = None,
    predictor_layers: int | None = None,
    tiny_encoders: bool = True,
) -> dict:
    """The released config with the decoders cut to `*_layers` layers and optional text-config overrides."""
    cfg = real_config()
    thinker = cfg["thinker_config"]
    text = thinker["text_config"]
    text.update(thinker_text or {})
    if thinker_layers is not None:
        text["num_hidden_layers"] = thinker_layers
    if tiny_encoders:
        thinker["audio_config"].update(TINY_AUDIO, output_dim=text["hidden_size"])
        thinker["vision_config"].update(TINY_VISION, out_hidden_size=text["hidden_size"])
    talker = cfg["talker_config"]
    talker["thinker_hidden_size"] = text["hidden_size"]
    talker["accept_hidden_layer"] = min(talker["accept_hidden_layer"], text["num_hidden_layers"])
    if talker_layers is not None:
        talker["text_config"]["num_hidden_layers"] = talker_layers
    if predictor_layers is not None:
        cp = talker["code_predictor_config"]
        cp["num_hidden_layers"] = predictor_layers
        cp["layer_types"] = ["full_attention"] * predictor_layers
    return cfg


def ours_config(cfg: dict):
    from qwen3omni.config import Qwen3OmniConfig

    return Qwen3OmniConfig.from_dict(copy.deepcopy(cfg))


def reference_config(cfg: dict, attn: str = "sdpa"):
    import warnings

    from transformers import Qwen3OmniMoeConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = Qwen3OmniMoeConfig(**copy.deepcopy(cfg))
    for sub in (config, config.thinker_config, config.thinker_config.text_config, config.thinker_config.audio_config,
                config.thinker_config.vision_config, config.talker_config, config.talker_config.text_config,
                config.talker_config.code_predictor_config, config.code2wav_config):
        sub._attn_implementation = attn
    return config


# ---- random weights --------------------------------------------------------------------------------------------
def random_value_(name: str, p: torch.Tensor, g: torch.Generator) -> None:
    """Fill `p` in place with values that keep activations O(1): unit-gain matrices, norms near 1, unit
    embeddings, O(0.5) LayerScale/Snake parameters. Routing is then as varied as with trained weights."""
    leaf = name.rsplit(".", 1)[-1]
    with torch.no_grad():
        if p.dim() <= 1:
            if leaf in ("alpha", "beta"):
                p.normal_(0.0, 0.5, generator=g)
            elif leaf in ("scale", "gamma"):
                p.fill_(0.5)
            elif leaf == "bias":
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(1.0)
            return
        if "embed" in name:
            p.normal_(0.0, 1.0, generator=g)
            return
        fan_in = p.shape[-1] if p.dim() == 2 or "experts" in name else math.prod(p.shape[1:])
        gain = 0.3 if name.startswith("code2wav.decoder.") and p.shape[0] == 1 else 0.6 if "code2wav" in name else 1.0
        p.normal_(0.0, gain / math.sqrt(fan_in), generator=g)


def randomize_(module: torch.nn.Module, seed: int = 0, prefix: str = "") -> None:
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, p in module.named_parameters():
        random_value_(prefix + name, p, g)


def build_reference(cls_name: str, sub_config, seed: int = 0, prefix: str = "", dtype=torch.float32, device="cpu"):
    """A transformers reference module allocated directly in `dtype` on `device`, without its (slow)
    initialisation, then given random weights in place."""
    import transformers

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext

    cls = getattr(transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe, cls_name)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            model = cls(sub_config)
    finally:
        torch.set_default_dtype(default)
    # (nested parts are built by `_from_config`, which could take a dtype from their config instead)
    wrong = {n: p.dtype for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != dtype}
    if wrong:
        raise RuntimeError(f"build_reference: parameters not in {dtype}: {list(wrong.items())[:3]}")
    randomize_(model, seed, prefix)
    return model.eval()


# The reference nests the thinker's parts one level deeper in memory than in its checkpoint (and ours).
REFERENCE_RENAMES = (("model.language_model.", "model."), ("model.audio_tower.", "audio_tower."),
                     ("model.visual.", "visual."))


def reference_state(reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The reference's tensors under our (= the released) names; experts stay stacked on both sides."""
    out = {}
    for name, tensor in reference.state_dict().items():
        for old, new in REFERENCE_RENAMES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = tensor
    return out


def experts_implementation(reference: torch.nn.Module) -> str:
    """The reference's MoE kernel choice (transformers >= 5 picks one: grouped_mm, batched_mm or eager)."""
    text = getattr(reference.config, "text_config", reference.config)
    return str(getattr(text, "_experts_implementation", "n/a"))


def names_match(ours_cls, ours_cfg, reference_cls_name: str, reference_cfg) -> list[str]:
    """Tensor names (and shapes) that differ between our module and the reference's, both built on meta: an
    empty list means `twin` will work (checked before allocating anything)."""
    import transformers

    cls = getattr(transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe, reference_cls_name)
    with torch.device("meta"):
        ours, ref = ours_cls(ours_cfg), cls(reference_cfg)
    theirs = {k: tuple(v.shape) for k, v in reference_state(ref).items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))


def twin(ours_cls, ours_cfg, reference: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Our module built on meta, then given the reference's tensors (shared, not copied: no second copy of the
    weights is ever allocated; names must match). Computed buffers are then allocated and rebuilt.
    With a `dtype` other than the reference's, ours gets copies of its floating-point tensors in that dtype
    (`.to` returns a tensor already in `dtype` itself, so those stay shared)."""
    with torch.device("meta"):
        ours = ours_cls(ours_cfg)
    state = reference_state(reference)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = ours.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"twin: names differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    device = next(reference.parameters()).device
    for module in ours.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                setattr(module, name, torch.empty_like(buf, device=device))
    for module in ours.modules():
        if callable(getattr(module, "reset_buffers", None)):
            module.reset_buffers()
    left = [n for n, t in (*ours.named_parameters(), *ours.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"twin: tensors left on meta: {left[:5]}")
    return ours.eval()


# ---- timing ----------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(ours: Callable[[], object], ref: Callable[[], object], warmup: int, repeats: int):
    """Warm both up, then alternate them `repeats` times (so background load hits both alike)."""
    for _ in range(warmup):
        ours()
        ref()
    t_ours, t_ref = [], []
    for _ in range(repeats):
        t_ours.append(timed(ours))
        t_ref.append(timed(ref))
    return t_ours, t_ref


def stats(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


REPORTS: list[dict] = []  # every line printed by `report`, for the closing table


TAGS: dict = {}  # added to every reported line (e.g. the dtypes of a run)


def report(workload: str, unit: str, ours: list[float], ref: list[float] | None, **extra) -> dict:
    """Print and return one JSON line: medians, min/max and ratio = reference / ours (> 1: we are faster)."""
    line = {"workload": workload, "unit": unit, "ours": _round(stats(ours))}
    if ref is not None:
        line["reference"] = _round(stats(ref))
        line["ratio"] = round(statistics.median(ref) / statistics.median(ours), 3)
    line.update(extra)
    line.update(TAGS)
    print(json.dumps(line), flush=True)
    REPORTS.append(line)
    return line


def print_table() -> None:
    """The reported lines as one markdown table: medians and the ratio (reference / ours)."""
    print("\n| workload | unit | ours (median) | reference (median) | ratio |\n| --- | --- | --- | --- | --- |")
    for line in REPORTS:
        ref = line.get("reference", {}).get("median")
        print(f"| {line['workload']} | {line['unit']} | {line['ours']['median']:.4g} | "
              f"{'' if ref is None else f'{ref:.4g}'} | {line.get('ratio', '')} |")


def _round(d: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def note(*args) -> None:
    print("#", *args, file=sys.stderr, flush=True)


# ---- machine ---------------------------------------------------------------------------------------------------
def matvec_bandwidth(dtype=torch.float32, mbytes: int = 1536, repeats: int = 7, median: bool = False) -> float:
    """Bytes/s a batch-1 matrix-vector product streams from memory here (the decode roofline's speed).

    The matrix is larger than the last-level cache (480 MiB on the machine this was written on), so the
    figure is DRAM bandwidth, which is what a decode step that reads ~1.7 GB of weights runs into.
    """
    cols = 2048
    rows = mbytes * 2**20 // (cols * torch.finfo(dtype).bits // 8)
    w = torch.randn(rows, cols).to(dtype)
    x = torch.randn(cols).to(dtype)
    torch.mv(w, x)  # ATen's matrix-vector kernel (for bf16 faster than F.linear's one-row GEMM)
    times = [timed(lambda: torch.mv(w, x)) for _ in range(repeats)]
    return w.numel() * w.element_size() / (statistics.median(times) if median else min(times))


def _status_bytes(field: str) -> int:
    """A memory line of /proc/self/status ("VmRSS", "VmHWM", ...) in bytes; 0 where there is none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    return _status_bytes("VmHWM")


def touch(model: torch.nn.Module) -> float:
    """Read one element per page of every tensor, so that lazily mapped weights count as resident (a loader
    that only maps the file looks free until the first forward). No temporary larger than a page stride."""
    total = 0.0
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.numel() and not t.is_meta:
                total += float(t.reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum())
    return total


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
