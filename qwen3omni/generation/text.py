"""The thinker's decode loop: prefill once, then one token per step through a preallocated KV cache."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import InputError, describe, expect_int
from .graphs import StaticDecoder, graphs_wanted, static_steps
from .sampling import SamplingConfig, next_token

GREEDY = SamplingConfig()
MEDIA_KEYS = (
    "input_features", "feature_attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
    "video_grid_thw", "video_second_per_grid", "use_audio_in_video",
)


@dataclass
class TextGeneration:
    sequences: torch.Tensor  # [B, prompt + new] token ids (finished rows continue with the pad id)
    prompt_length: int
    # The hidden states the caller asked to keep, over the prompt: layer index -> [B, T_prompt, C].
    prompt_hidden: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]


def eos_ids(value, name: str = "eos_token_id") -> list[int] | None:
    """Stop ids as a list of ints, from an int, a list or tuple of ints, or an integer tensor / numpy value of at
    most one dimension (what a tokenizer's config may hold). Bools are refused: True is not token 1."""
    if value is None:
        return None
    tolist = getattr(value, "tolist", None)  # torch and numpy scalars and arrays -> Python ints (or bools)
    raw = tolist() if callable(tolist) and not isinstance(value, (list, tuple)) else value
    ids = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    if not ids or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise InputError(
            f"{name}: expected a token id (an int >= 0) or a non-empty list of them, got {describe(value)}"
        )
    return [int(i) for i in ids]


def eos_tensor(eos_token_id, device) -> torch.Tensor | None:
    ids = eos_ids(eos_token_id)
    return None if ids is None else torch.tensor(ids, device=device)


def check_attention_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """The mask must have input_ids' shape and pad on the left, as the processor does. Every row's new tokens go
    in the same next column, so a right-padded row would continue after its padding (a wrong answer, silently),
    and a row of padding only has nothing to continue from."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        expected = f"shape {list(input_ids.shape)} (that of input_ids)"
        raise InputError(f"attention_mask: expected {expected}, got {describe(attention_mask)}")
    real = attention_mask != 0
    empty = ~real.any(dim=1)
    pad_after_token = (real[:, :-1] & ~real[:, 1:]).any(dim=1)
    bad = (empty | pad_after_token).nonzero().flatten().tolist()  # one host sync, at prefill only
    if not bad:
        return
    b = bad[0]
    row = attention_mask[b].tolist()
    shown = row if len(row) <= 12 else row[:6] + ["..."] + row[-6:]
    what = "is all zeros (no token to continue from)" if bool(empty[b]) else "has padding after a token"
    raise InputError(
        f"attention_mask: row {b} {what}: {shown}; generation needs left padding (zeros, then ones), as the "
        "processor makes it (for a tokenizer, set padding_side='left')"
    )


def thinker_steps(
    thinker,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 256,
    sampling: SamplingConfig = GREEDY,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    keep_hidden: tuple[int, ...] = (),
    cuda_graphs: bool | None = None,
    **media,
) -> Iterator[tuple[torch.Tensor, dict[int, torch.Tensor]]]:
    """Yield (new token ids [B], kept hidden states) one step at a time.

    `keep_hidden` names layers whose hidden states over the prompt are returned with the first token (the
    talker reads layer `accept_hidden_layer` of the prompt); later steps return an empty dict.

    Rows stop independently: once a row has produced an EOS it continues with `pad_token_id` (default: the
    first EOS id, as transformers does) until every row is done or `max_new_tokens` is reached.
    On CUDA the single-token step is replayed from a CUDA graph (`cuda_graphs=False` turns that off).
    """
    from ..model.thinker import check_token_ids

    expect_int(max_new_tokens, "max_new_tokens", least=1)
    check_token_ids(input_ids)
    check_attention_mask(input_ids, attention_mask)
    unknown = sorted(set(media) - set(MEDIA_KEYS))
    if unknown:
        raise InputError(f"generate: unknown input(s) {unknown}; expected the processor's keys {list(MEDIA_KEYS)}")
    B, T = input_ids.shape
    limit = thinker.config.text.max_position_embeddings
    if T + max_new_tokens > limit:
        raise InputError(
            f"input_ids: prompt of {T} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
            f"max_position_embeddings={limit}"
        )
    device = input_ids.device
    eos = eos_tensor(eos_token_id, device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos is not None else 0)
    cache = thinker.model.new_cache(B, T + max_new_tokens)
    out = thinker(
        input_ids=input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1,
        output_hidden_states=bool(keep_hidden), **media,
    )
    seen = input_ids
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    last_pos = out.position_ids[..., -1:]
    logits, decoder = out.logits[:, -1], None
    for step in range(max_new_tokens):
        token = next_token(logits, sampling, seen, generator=generator)
        token = torch.where(unfinished, token, torch.full_like(token, pad))
        kept = {layer: out.hidden_states[layer] for layer in keep_hidden} if step == 0 else {}
        yield token, kept
        if eos is not None:
            unfinished = unfinished & ~torch.isin(token, eos)
            if not bool(unfinished.any()):
                return
        if step == max_new_tokens - 1:
            return
        seen = torch.cat([seen, token[:, None]], dim=1)
        last_pos = last_pos + 1
        if decoder is None:
            decoder = _thinker_decoder(thinker, cache, token[:, None], last_pos, graphs_wanted(device, cuda_graphs))
        (logits,) = decoder(token[:, None], last_pos)


def _thinker_decoder(thinker, cache, token, positions, graphs: bool):
    """The single-token step: eager, or over a static cache (replayed from a CUDA graph when `graphs`; compiled
    layers, if the thinker's stack has them)."""
    def forward(tok, pos):
        return (thinker(input_ids=tok, position_ids=pos, cache=cache, logits_to_keep=1).logits[:, -1],)

    if not static_steps(thinker.model, graphs):
        return forward
    return StaticDecoder(forward, cache, token, positions, capture=graphs)


def generate_text(
    thinker,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 256,
    sampling: SamplingConfig = GREEDY,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    keep_hidden: tuple[int, ...] = (),
    on_token: Callable[[torch.Tensor], None] | None = None,
    cuda_graphs: bool | None = None,
    **media,
) -> TextGeneration:
    """Run `thinker_steps` to the end and collect the sequences (and kept hidden states)."""
    tokens, kept = [], {}
    for token, hidden in thinker_steps(
        thinker, input_ids, attention_mask, max_new_tokens, sampling, eos_token_id, pad_token_id, generator,
        keep_hidden, cuda_graphs, **media,
    ):
        tokens.append(token)
        kept.update(hidden)
        if on_token is not None:
            on_token(token)
    sequences = torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)
    return TextGeneration(sequences, input_ids.shape[1], kept)
