"""Placeholder tokens: how many each medium takes, and writing them into the rendered prompt.

The chat template writes one `<|image_pad|>`, `<|video_pad|>` or `<|audio_pad|>` per medium. Each is replaced,
in order of appearance, by as many copies as the encoder emits features for it: image and video tokens are
grid cells / merge², audio tokens follow the AuT length rule. A video whose audio track is used
(`use_audio_in_video`) becomes one run wrapped in `<|audio_start|> ... <|audio_end|>` where video and audio
tokens are interleaved by time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class SpecialTokens:
    """The placeholder and marker strings of the tokenizer (the released ones are the defaults)."""

    image: str = "<|image_pad|>"
    video: str = "<|video_pad|>"
    audio: str = "<|audio_pad|>"
    audio_start: str = "<|audio_start|>"
    audio_end: str = "<|audio_end|>"
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        """Take the strings a tokenizer names (`image_token`, `audio_bos_token`, ...); defaults otherwise."""
        names = {"image": "image_token", "video": "video_token", "audio": "audio_token",
                 "audio_start": "audio_bos_token", "audio_end": "audio_eos_token",
                 "vision_start": "vision_bos_token", "vision_end": "vision_eos_token"}
        found = {field: getattr(tokenizer, attr, None) for field, attr in names.items()}
        return cls(**{field: str(value) for field, value in found.items() if isinstance(value, str) and value})

    def kind_of(self, placeholder: str) -> str:
        return {self.image: "image", self.video: "video", self.audio: "audio"}[placeholder]

    def pattern(self) -> re.Pattern:
        return re.compile("|".join(re.escape(t) for t in (self.image, self.video, self.audio)))


def placeholder_kinds(text: str, tokens: SpecialTokens) -> list[str]:
    """The media kinds of the placeholders in `text`, in order ("image", "video", "audio")."""
    return [tokens.kind_of(m.group()) for m in tokens.pattern().finditer(text)]


def check_media_counts(texts: Sequence[str], tokens: SpecialTokens, given: dict[str, int]) -> None:
    """Each placeholder needs exactly one medium of its kind, and each medium one placeholder."""
    found = {kind: 0 for kind in given}
    for text in texts:
        for kind in placeholder_kinds(text, tokens):
            found[kind] += 1
    for kind, n_given in given.items():
        if found[kind] != n_given:
            token = getattr(tokens, kind)
            raise InputError(
                f"{kind}: the prompt has {found[kind]} {token} placeholder(s) but {n_given} {kind} input(s) were "
                f"given; each {kind} needs exactly one placeholder (the chat template writes it for each "
                f"{{'type': '{kind}'}} content item)"
            )


def interleaved_video_audio(
    grid_thw: Sequence[int], merge_size: int, second_per_grid: float, position_id_per_seconds: float,
    audio_tokens: int, tokens: SpecialTokens,
) -> str:
    """The `<|audio_start|> ... <|audio_end|>` run of a video with its audio track, interleaved by time.

    Every video token of temporal group t sits at time t * second_per_grid * position_id_per_seconds (in
    position ids), audio token j at time j (one id per 80 ms token). Tokens are ordered by time; at equal
    times video goes first, and within a medium the original order is kept.
    """
    t, h, w = (int(x) for x in grid_thw)
    per_group = (h // merge_size) * (w // merge_size)
    video_time = np.repeat(np.arange(t) * second_per_grid * position_id_per_seconds, per_group)
    audio_time = np.arange(audio_tokens, dtype=np.float64)
    times = np.concatenate([video_time, audio_time])
    is_audio = np.concatenate([np.zeros(video_time.size, np.int8), np.ones(audio_tokens, np.int8)])
    order = np.lexsort((is_audio, times))  # by time, then video before audio; stable within a medium
    body = "".join(np.where(is_audio[order] == 1, tokens.audio, tokens.video).tolist())
    return tokens.audio_start + body + tokens.audio_end


def expand_placeholders(texts: Sequence[str], tokens: SpecialTokens, replacements: dict[str, list[str]]) -> list[str]:
    """Replace each placeholder, in order of appearance over the batch, by the next string of its kind."""
    queues = {kind: iter(items) for kind, items in replacements.items()}

    def substitute(match: re.Match) -> str:
        kind = tokens.kind_of(match.group())
        return next(queues[kind]) if kind in queues else match.group()

    pattern = tokens.pattern()
    return [pattern.sub(substitute, text) for text in texts]
