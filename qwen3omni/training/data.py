"""Training batches: a prompt batch plus the assistant's answer -> thinker inputs and labels; synthetic data.

A speech fine-tuning example is (conversation, answer text, answer speech codes). The processor renders the
conversation with the generation prompt (ending in `<|im_start|>assistant\\n`); `with_answer` appends the
answer tokens for the thinker's teacher-forced LM loss; `talker_loss` takes the prompt batch, the answer and
the codes directly.
"""

from __future__ import annotations

import torch

from ..errors import InputError, describe
from .losses import IGNORE_INDEX


def final_index(answer: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """[B]: index of each row's first EOS token, or n - 1 when a row has none (the rule generation uses)."""
    n = answer.shape[1]
    hit = torch.isin(answer, torch.tensor(eos, device=answer.device))
    idx = torch.arange(n, device=answer.device).expand_as(answer)
    return torch.where(hit, idx, torch.full_like(idx, n - 1)).min(dim=1).values


def eos_ids(config, eos_token_id: int | list[int] | None) -> list[int]:
    if eos_token_id is None:
        return [config.im_end_token_id]
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def with_answer(batch: dict, answer_ids: torch.Tensor, config, eos_token_id: int | list[int] | None = None) -> dict:
    """The thinker's training batch: `batch` (prompt, left-padded) with `answer_ids` [B, n] appended, and
    `labels` that score only the answer tokens up to and including each row's EOS (<|im_end|> by default).
    Tokens after a row's EOS are masked out of attention and labels (right padding)."""
    input_ids = batch.get("input_ids") if hasattr(batch, "get") else None
    if input_ids is None:
        raise InputError(f"batch: expected the processor's output (a dict with input_ids), got {describe(batch)}")
    B = input_ids.shape[0]
    if not isinstance(answer_ids, torch.Tensor) or answer_ids.dim() != 2 or answer_ids.shape[0] != B:
        raise InputError(f"answer_ids: expected a tensor of shape [{B}, answer length], got {describe(answer_ids)}")
    answer_ids = answer_ids.to(input_ids.device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    final = final_index(answer_ids, eos_ids(config, eos_token_id))
    kept = torch.arange(answer_ids.shape[1], device=input_ids.device)[None, :] <= final[:, None]
    out = dict(batch)
    out["input_ids"] = torch.cat([input_ids, answer_ids], dim=1)
    out["attention_mask"] = torch.cat([mask, kept.to(mask.dtype)], dim=1)
    prompt_labels = torch.full_like(input_ids, IGNORE_INDEX)
    out["labels"] = torch.cat([prompt_labels, answer_ids.masked_fill(~kept, IGNORE_INDEX)], dim=1)
    return out


def synthetic_example(config, batch: int = 1, prompt_tokens: int = 8, answer_tokens: int = 6, frames: int = 10,
                      seed: int = 0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A random text-only training example in the released token layout: (prompt batch, answer ids, codes).

    The prompt is `<|im_start|>user\\n ... <|im_end|>\\n<|im_start|>assistant\\n`; the answer ends with
    <|im_end|>; codes [B, 16, frames] are drawn from the codec vocabulary (ids below the talker's control ids).
    """
    g = torch.Generator().manual_seed(seed)
    newline = 198
    words = torch.randint(300, 1000, (batch, prompt_tokens), generator=g)
    start = torch.tensor([config.im_start_token_id, config.user_token_id, newline]).expand(batch, -1)
    end = torch.tensor([config.im_end_token_id, newline, config.im_start_token_id, config.assistant_token_id,
                        newline]).expand(batch, -1)
    input_ids = torch.cat([start, words, end], dim=1)
    answer = torch.randint(300, 1000, (batch, answer_tokens), generator=g)
    answer[:, -1] = config.im_end_token_id
    groups = config.talker.num_code_groups
    codes = torch.randint(0, config.talker.code_predictor.vocab_size, (batch, groups, frames), generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, answer, codes
