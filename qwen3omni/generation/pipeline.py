"""End-to-end generation: text from the thinker, speech from the talker, code predictor and Code2Wav.

`generate` runs the three stages one after another, like the reference. `stream` interleaves them in one
process: the talker starts as soon as the thinker has produced its first answer token, every talker frame goes
straight through the code predictor and the incremental Code2Wav decoder, and events are yielded as soon as
they are ready. Both read the same talker prompt and text schedule, so their outputs agree (for sampling with a
shared seed, see `stream`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import InputError, describe, expect_int
from ..model.code_predictor import predictor_sampling
from ..model.placement import device_of
from ..model.thinker import check_token_ids
from .graphs import graphs_wanted, streaming_decoder
from .sampling import SamplingConfig
from .speech import SpeechSettings, talker_frames
from .talker_input import check_speech_prompt, project_text, speaker_id, talker_prompt, trailing_text
from .text import MEDIA_KEYS, check_attention_mask, eos_ids, thinker_steps

IM_END = 151645


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, prompt + new] token ids
    audio: list[torch.Tensor] | None = None  # per row, 1-D float32 waveform at 24 kHz
    codes: list[torch.Tensor] | None = None  # per row, [16, frames] codec codes


@dataclass
class StreamEvent:
    kind: str  # "text" | "audio"
    data: torch.Tensor  # "text": LongTensor of new token ids; "audio": 1-D float32 samples at 24 kHz


@dataclass
class Plan:
    """Every knob of one generate/stream call, checked once."""

    text: SamplingConfig
    speech: SpeechSettings | None
    max_new_tokens: int
    eos: list[int]
    speaker: int | None
    generator: torch.Generator | None
    cuda_graphs: bool | None
    media: dict


def make_plan(
    model,
    return_audio: bool | None,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    speaker: str = "ethan",
    talker_do_sample: bool = True,
    talker_temperature: float = 0.9,
    talker_top_k: int = 50,
    talker_top_p: float = 1.0,
    talker_min_p: float = 0.0,
    talker_repetition_penalty: float = 1.05,
    talker_max_new_tokens: int = 4096,
    predictor_do_sample: bool | None = None,
    predictor_temperature: float = 1.0,
    predictor_top_k: int = 50,
    predictor_top_p: float = 0.8,
    generator: torch.Generator | None = None,
    cuda_graphs: bool | None = None,
    **media,
) -> tuple[Plan, bool]:
    unknown = sorted(set(media) - set(MEDIA_KEYS))
    if unknown:
        raise InputError(f"generate: unknown argument(s) {unknown}")
    if model.thinker is None:
        raise InputError(f"generate: needs the thinker, but this model holds only {list(model.components)}")
    _expect_flag(return_audio, "return_audio")
    _expect_flag(cuda_graphs, "cuda_graphs")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InputError(
            f"generator: expected a torch.Generator (e.g. torch.Generator().manual_seed(0)) or None, "
            f"got {describe(generator)}"
        )
    if return_audio is None:
        return_audio = model.has_talker
    if return_audio and not model.has_talker:
        raise InputError(
            "return_audio=True: this model has no talker/code2wav (a thinker-only checkpoint such as "
            "Thinking or Captioner, or loaded with components={'thinker'}); pass return_audio=False"
        )
    expect_int(max_new_tokens, "max_new_tokens", least=1)
    text = SamplingConfig(do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
    speech, spk = None, None
    if return_audio:
        spk = speaker_id(model.config, speaker)
        expect_int(talker_max_new_tokens, "talker_max_new_tokens", least=1)
        speech = SpeechSettings(
            sampling=SamplingConfig(
                talker_do_sample, talker_temperature, talker_top_k, talker_top_p, talker_min_p,
                talker_repetition_penalty, prefix="talker_",
            ),
            predictor=predictor_sampling(
                talker_do_sample if predictor_do_sample is None else predictor_do_sample,
                predictor_top_k, predictor_top_p, predictor_temperature, prefix="predictor_",
            ),
            max_new_tokens=talker_max_new_tokens,
            generator=generator,
            cuda_graphs=cuda_graphs,
        )
    eos = [IM_END] if eos_token_id is None else eos_ids(eos_token_id)
    return Plan(text, speech, max_new_tokens, eos, spk, generator, cuda_graphs, media), return_audio


def _expect_flag(value, name: str) -> None:
    """True, False or None (= the default) only: a truthy string such as "no" or "off" must not mean yes."""
    if value is not None and not isinstance(value, bool):
        raise InputError(f"{name}: expected True, False or None, got {describe(value)}")


def _check_inputs(model, plan: Plan, input_ids, attention_mask, return_audio: bool) -> None:
    """Everything about the inputs that can be checked before the thinker runs, so that a bad call fails fast."""
    check_attention_mask(input_ids, attention_mask)
    if return_audio:
        check_speech_prompt(model, input_ids, attention_mask, plan.speech.max_new_tokens)


def _first_hits(tokens_BN: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """[B]: index of each row's first EOS token, or N - 1 when a row has none."""
    n = tokens_BN.shape[1]
    hit = torch.isin(tokens_BN, torch.tensor(eos, device=tokens_BN.device))
    idx = torch.arange(n, device=tokens_BN.device).expand_as(tokens_BN)
    return torch.where(hit, idx, torch.full_like(idx, n - 1)).min(dim=1).values


def generate(model, input_ids, attention_mask=None, return_audio=None, **kwargs) -> GenerationOutput:
    check_token_ids(input_ids)
    plan, return_audio = make_plan(model, return_audio, **kwargs)
    _check_inputs(model, plan, input_ids, attention_mask, return_audio)
    thinker = model.thinker
    keep = (model.config.talker.accept_hidden_layer,) if return_audio else ()
    tokens, accept_hidden = [], None
    steps = thinker_steps(
        thinker, input_ids, attention_mask, plan.max_new_tokens, plan.text, plan.eos,
        generator=plan.generator, keep_hidden=keep, cuda_graphs=plan.cuda_graphs, **plan.media,
    )
    for token, kept in steps:
        tokens.append(token)
        if kept:
            accept_hidden = kept[keep[0]]
    answer = torch.stack(tokens, dim=1)
    sequences = torch.cat([input_ids, answer], dim=1)
    if not return_audio:
        return GenerationOutput(sequences)
    prompt = talker_prompt(model, input_ids, attention_mask, accept_hidden, answer[:, 0], plan.speaker)
    trailing = trailing_text(model, answer, _first_hits(answer, plan.eos), prompt.markers)
    pad = prompt.markers.pad

    def text_for_step(g: int) -> torch.Tensor:
        return trailing[:, g] if g < trailing.shape[1] else pad.expand(answer.shape[0], -1)

    frames, alive = [], []
    for codes, unfinished in talker_frames(model, prompt, text_for_step, plan.speech, plan.media):
        frames.append(codes)
        alive.append(unfinished)
    B = answer.shape[0]
    if not frames:
        empty = torch.zeros(16, 0, dtype=torch.long)
        return GenerationOutput(sequences, [torch.zeros(0)] * B, [empty] * B)
    codes_BFG = torch.stack(frames, dim=1)
    lengths = torch.stack(alive, dim=1).sum(dim=1).tolist()
    codes = [codes_BFG[b, : lengths[b]].T.contiguous() for b in range(B)]
    audio = [decode_row(model, c) for c in codes]
    return GenerationOutput(sequences, audio, codes)


def decode_row(model, codes_GF: torch.Tensor) -> torch.Tensor:
    """One row's waveform, decoded as the reference does (chunks of 300 frames with 25 frames of context)."""
    if codes_GF.shape[1] == 0:
        return torch.zeros(0)
    device = device_of(model.code2wav)
    wav = model.code2wav.chunked_decode(codes_GF[None].to(device), chunk_size=300, left_context_size=25)
    return wav.reshape(-1).float().cpu()


def stream(
    model, input_ids, attention_mask=None, return_audio=None, audio_chunk_frames: int = 8, **kwargs
) -> Iterator[StreamEvent]:
    """Yield text and audio events as soon as they are ready (batch size 1).

    The first codec frame (80 ms of audio) is vocoded alone, for the earliest audio; then 2, 4, ... frames per
    push, up to `audio_chunk_frames`. Code2Wav's cost per push is mostly fixed (on a GPU, 8 frames cost about
    what 1 does), and doubling keeps each chunk shorter than the audio already delivered, so a player that
    starts at the first chunk is not starved while the next one is made. The samples are the same for any
    chunking.

    With greedy decoding, or with only one of text and speech sampled, the text and audio equal `generate`'s
    for the same arguments and `generator` seed. With both sampled they differ: the stages share the one
    `generator` (or torch's global one), `generate` makes every text draw before the first speech draw (as
    transformers does), and `stream` alternates them, one answer token per codec frame. Each run is still
    reproducible for its seed."""
    check_token_ids(input_ids)
    expect_int(audio_chunk_frames, "audio_chunk_frames", least=1)
    if input_ids.shape[0] != 1:
        raise InputError(
            f"input_ids: stream takes one conversation (batch size 1), got {describe(input_ids)}; use generate for "
            "batches"
        )
    plan, return_audio = make_plan(model, return_audio, **kwargs)
    _check_inputs(model, plan, input_ids, attention_mask, return_audio)
    keep = (model.config.talker.accept_hidden_layer,) if return_audio else ()
    steps = thinker_steps(
        model.thinker, input_ids, attention_mask, plan.max_new_tokens, plan.text, plan.eos,
        generator=plan.generator, keep_hidden=keep, cuda_graphs=plan.cuda_graphs, **plan.media,
    )
    first, kept = next(steps)
    yield StreamEvent("text", first.cpu())
    if not return_audio:
        for token, _ in steps:
            yield StreamEvent("text", token.cpu())
        return
    yield from _stream_speech(model, plan, input_ids, attention_mask, first, kept[keep[0]], steps, audio_chunk_frames)


def _stream_speech(model, plan: Plan, input_ids, attention_mask, first, accept_hidden, steps, chunk_frames: int):
    prompt = talker_prompt(model, input_ids, attention_mask, accept_hidden, first, plan.speaker)
    markers = prompt.markers
    answer = [first]
    finished = [_is_final(first, plan, 1)]
    pending_text: list[torch.Tensor] = []

    def pull_token() -> None:
        token, _ = next(steps)
        answer.append(token)
        finished[0] = _is_final(token, plan, len(answer))
        pending_text.append(token)

    def text_for_step(g: int) -> torch.Tensor:
        # Step g reads answer token g + 1: its projection, tts_eos if it is the final token, tts_pad past it.
        # A one-token answer has no token 1, yet its text ended: step 0 reads tts_eos (as in `trailing_text`
        # and the reference, whose trailing text is then [tts_eos] alone).
        while len(answer) < g + 2 and not finished[0]:
            pull_token()
        if finished[0] and g == max(len(answer) - 2, 0):
            return markers.eos[None]
        if g + 1 >= len(answer):
            return markers.pad[None]
        return project_text(model, answer[g + 1])

    device = device_of(model.code2wav)
    held: list[torch.Tensor] = []  # frames not yet vocoded
    chunk = 1  # frames in the next push: 1, 2, 4, ... up to chunk_frames
    # On CUDA the model's graphed decoder: from a stream's second push on, pushes replay CUDA graphs.
    with streaming_decoder(model.code2wav, graphs_wanted(device, plan.cuda_graphs)) as decoder:

        def vocode() -> Iterator[StreamEvent]:
            samples = decoder.push(torch.stack(held, dim=-1).to(device))
            held.clear()
            if samples.numel():
                yield StreamEvent("audio", samples.reshape(-1).float().cpu())

        for codes, _ in talker_frames(model, prompt, text_for_step, plan.speech, plan.media):
            held.append(codes)
            if len(held) >= chunk:
                chunk = min(2 * chunk, chunk_frames)
                yield from vocode()  # audio first: it is what a listener waits for
            if not finished[0]:
                pull_token()  # keep the text ahead of the speech: one more answer token per frame
            for token in pending_text:
                yield StreamEvent("text", token.cpu())
            pending_text.clear()
        for token in pending_text:
            yield StreamEvent("text", token.cpu())
        if held:
            yield from vocode()
        tail = decoder.flush()
    if tail is not None and tail.numel():
        yield StreamEvent("audio", tail.reshape(-1).float().cpu())
    while not finished[0]:
        pull_token()
        yield StreamEvent("text", answer[-1].cpu())


def _is_final(token: torch.Tensor, plan: Plan, count: int) -> bool:
    return bool(torch.isin(token, torch.tensor(plan.eos, device=token.device)).any()) or count >= plan.max_new_tokens
