"""Next-token selection: logits processing (repetition penalty, suppression) and greedy / sampled choice.

The order of operations matches transformers' `generate` so that greedy decoding is token-for-token equal
and sampling draws from the same distribution: repetition penalty and suppression on the raw logits, then
temperature, top-k, top-p and min-p, then softmax and a multinomial draw.
Everything stays on the device: no `.item()`, no host sync.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import InitVar, dataclass

import torch

from ..errors import InputError


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    # How the knobs are named in the caller's signature ("talker_", "predictor_"), for error messages only.
    prefix: InitVar[str] = ""

    def __post_init__(self, prefix: str = ""):
        check_sampling(self, prefix)


TINY_TEMPERATURE = 1e-4  # below it, `warp` shifts the logits by their max before dividing


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_sampling(s: SamplingConfig, prefix: str = "") -> None:
    """Reject knob values that would crash or silently misbehave inside torch; messages name the argument
    as the caller spelled it (`prefix` + knob)."""
    if s.do_sample not in (True, False):
        raise InputError(f"{prefix}do_sample: expected True or False, got {s.do_sample!r}")
    for knob in ("temperature", "top_p", "min_p", "repetition_penalty"):
        if not _is_number(getattr(s, knob)):
            raise InputError(f"{prefix}{knob}: expected a finite number, got {getattr(s, knob)!r}")
    if s.do_sample and not s.temperature > 0:
        raise InputError(f"{prefix}temperature: must be > 0 when sampling, got {s.temperature!r}")
    if not isinstance(s.top_k, numbers.Integral) or isinstance(s.top_k, bool) or s.top_k < 0:
        raise InputError(f"{prefix}top_k: must be an int >= 0 (0 disables it), got {s.top_k!r}")
    if not 0 < s.top_p <= 1:
        raise InputError(f"{prefix}top_p: must be in (0, 1], got {s.top_p!r}")
    if not 0 <= s.min_p < 1:
        raise InputError(f"{prefix}min_p: must be in [0, 1), got {s.min_p!r}")
    if not s.repetition_penalty > 0:
        raise InputError(f"{prefix}repetition_penalty: must be > 0 (1.0 disables it), got {s.repetition_penalty!r}")


def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BL: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of every token already in `seen` (CTRL's penalty)."""
    if penalty == 1.0 or seen_BL is None or seen_BL.shape[1] == 0:
        return logits_BV
    scores = logits_BV.gather(1, seen_BL)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits_BV.scatter(1, seen_BL, scores)


def warp(logits_BV: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p: the distribution a sampled token is drawn from (as logits)."""
    if s.temperature < TINY_TEMPERATURE:
        # logits / 1e-40 overflows to inf and the softmax to NaN; shifted by the row's max first, the best token
        # stays at 0 and the others go to -inf: the same distribution, finite. (Only here: for usual
        # temperatures the plain division keeps the draws bit-equal to transformers'.)
        # (divided by at least float32's smallest normal: a Python 1e-50 would become 0 in a float32 division)
        divisor = max(s.temperature, torch.finfo(torch.float32).tiny)
        logits = (logits_BV - logits_BV.amax(dim=-1, keepdim=True)) / divisor
    else:
        logits = logits_BV / s.temperature if s.temperature != 1.0 else logits_BV
    neg = float("-inf")
    if s.top_k > 0:
        k = min(s.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, neg)
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= (1 - s.top_p)
        drop_sorted[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), neg)
    if s.min_p > 0.0:
        probs = logits.softmax(dim=-1)
        floor = s.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, neg)
    return logits


def choose(logits_BV: torch.Tensor, s: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids [B]: argmax, or a draw from the warped distribution."""
    if not s.do_sample:
        return logits_BV.argmax(dim=-1)
    probs = warp(logits_BV.float(), s).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_token(
    logits_BV: torch.Tensor,
    s: SamplingConfig,
    seen_BL: torch.Tensor | None = None,
    suppress: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Process raw logits (penalty against `seen` tokens, `suppress`ed ids to -inf) and choose [B] ids."""
    logits = apply_repetition_penalty(logits_BV.float(), seen_BL, s.repetition_penalty)
    if suppress is not None:
        logits = logits.index_fill(-1, suppress, float("-inf"))
    return choose(logits, s, generator)
