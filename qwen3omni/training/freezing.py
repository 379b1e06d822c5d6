"""Choosing what trains: freeze / unfreeze by component or name pattern, and activation checkpointing.

Patterns name parameters by their released names (our module tree mirrors the checkpoint):
- a plain name selects that module or parameter and everything under it: "talker.code_predictor",
  "thinker.model.layers.3", "talker.codec_head.weight";
- a pattern with `*`, `?` or `[` is a shell-style glob over full parameter names: "*.self_attn.*",
  "thinker.model.layers.*.mlp.gate.weight".
A pattern that selects nothing is an error (a typo would otherwise silently train the wrong thing).
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from torch import nn

from ..errors import InputError
from ..modules.decoder import DecoderStack


def _selects(name: str, pattern: str) -> bool:
    if any(ch in pattern for ch in "*?["):
        return fnmatchcase(name, pattern)
    return name == pattern or name.startswith(pattern + ".")


def _patterns(patterns: Iterable[str] | str) -> list[str]:
    items = [patterns] if isinstance(patterns, str) else list(patterns)
    bad = [p for p in items if not isinstance(p, str) or not p]
    if bad:
        raise InputError(f"patterns: expected non-empty strings, got {bad!r}")
    return items


def select_parameters(model: nn.Module, patterns: Iterable[str] | str) -> dict[str, nn.Parameter]:
    """Parameters whose names match any pattern; raises if some pattern matches nothing."""
    items = _patterns(patterns)
    named = dict(model.named_parameters())
    chosen = {n: p for n, p in named.items() if any(_selects(n, pat) for pat in items)}
    unused = [pat for pat in items if not any(_selects(n, pat) for n in named)]
    if unused:
        tops = sorted({n.split(".")[0] for n in named})
        raise InputError(
            f"patterns: {unused} match no parameter of this model; names start with {tops} "
            "(e.g. 'talker.code_predictor', 'thinker.model.layers.*.self_attn.*')"
        )
    return chosen


def set_trainable(model: nn.Module, patterns: Iterable[str] | str, trainable: bool) -> list[str]:
    """Set `requires_grad` of the matching parameters; returns their names."""
    chosen = select_parameters(model, patterns)
    for p in chosen.values():
        p.requires_grad_(trainable)
    return sorted(chosen)


def freeze(model: nn.Module, *patterns: str) -> list[str]:
    """Stop gradients for the matching parameters (all of them when no pattern is given)."""
    if not patterns:
        model.requires_grad_(False)
        return sorted(n for n, _ in model.named_parameters())
    return set_trainable(model, patterns, False)


def unfreeze(model: nn.Module, *patterns: str) -> list[str]:
    """Let the matching parameters train (all of them when no pattern is given)."""
    if not patterns:
        model.requires_grad_(True)
        return sorted(n for n, _ in model.named_parameters())
    return set_trainable(model, patterns, True)


def train_only(model: nn.Module, *patterns: str) -> list[str]:
    """Freeze everything, then unfreeze the matching parameters: `train_only(model, "talker.code_predictor")`."""
    if not patterns:
        raise InputError("train_only: name at least one component or pattern, e.g. 'talker.code_predictor'")
    model.requires_grad_(False)
    return set_trainable(model, patterns, True)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> parameter for those that train: what to hand to the optimizer."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def decoder_stacks(model: nn.Module) -> dict[str, DecoderStack]:
    """The transformer decoder stacks by name: thinker.model, talker.model, talker.code_predictor.model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DecoderStack)}


def checkpointable_stacks(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer stack that can recompute its activations: the decoder stacks and the audio and vision
    encoders (thinker.audio_tower, thinker.visual)."""
    from ..model.audio_encoder import AudioEncoder
    from ..model.vision_encoder import VisionEncoder

    kinds = (DecoderStack, AudioEncoder, VisionEncoder)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def set_gradient_checkpointing(model: nn.Module, enabled: bool = True, stacks: Iterable[str] | str | None = None
                               ) -> list[str]:
    """Recompute each layer's activations in the backward pass instead of keeping them (per stack: the three
    decoders and the audio and vision encoders).

    `stacks` chooses stacks by name or pattern (default: every stack). It takes effect in training mode
    (`model.train()`) for full-sequence passes; decoding with a KV cache is never checkpointed. Returns the
    names of the stacks it set.
    """
    found = checkpointable_stacks(model)
    if stacks is None:
        chosen = found
    else:
        items = _patterns(stacks)
        chosen = {n: m for n, m in found.items() if any(_selects(n, p) for p in items)}
        # Each pattern must select something, as in `select_parameters`: a misspelled stack beside a correct one
        # would otherwise silently stay without checkpointing.
        unused = [p for p in items if not any(_selects(n, p) for n in found)]
        if unused:
            raise InputError(f"stacks: {unused} match none of this model's layer stacks {sorted(found)}")
    for stack in chosen.values():
        stack.gradient_checkpointing = enabled
    return sorted(chosen)
