"""The thinker's decode loop: prefill once, then one token per step through a preallocated KV cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import InputError, expect_int
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


def eos_tensor(eos_token_id, device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or not all(isinstance(i, int) for i in ids):
        raise InputError(f"eos_token_id: expected an int or a list of ints, got {eos_token_id!r}")
    return torch.tensor(ids, device=device)


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
