"""The talker's decode loop: one codec frame per step (layer-0 code from the talker, codes 1..15 from the code
predictor), fed back as the sum of the frame's codec embeddings plus the next text embedding."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..model import positions
from ..model.talker import decode_positions, prefill_positions, rope_deltas
from .graphs import StaticDecoder, graphs_wanted, predictor_runner, static_steps
from .sampling import SamplingConfig, next_token
from .talker_input import TalkerPrompt


@dataclass
class SpeechSettings:
    sampling: SamplingConfig  # the talker's (layer-0 codes)
    predictor: SamplingConfig  # the code predictor's (codes 1..15)
    max_new_tokens: int = 4096
    generator: torch.Generator | None = None
    cuda_graphs: bool | None = None  # None: on CUDA


def suppressed_ids(config, device) -> torch.Tensor:
    """The talker may not emit its control ids (the last 1024 of its vocabulary), except codec EOS."""
    vocab = config.talker.text.vocab_size
    ids = torch.arange(vocab - 1024, vocab, device=device)
    return ids[ids != config.talker.codec_eos_token_id]


def talker_positions(model, prompt: TalkerPrompt, media: dict) -> torch.Tensor:
    """TM-RoPE ids of the talker prompt: the thinker's rule on the talker's ids when the batch has media
    (audio, images or video), plain text positions otherwise — as the reference decides.

    With `use_audio_in_video` the talker's ids hold the same interleaved video/audio layout as the thinker's,
    so they get the same rule. (transformers 5.24 does not pass the flag to its talker, whose position code
    then fails on such prompts for want of an audio config; we give the talker what the thinker saw.)"""
    grids = [media.get("image_grid_thw"), media.get("video_grid_thw")]
    has_media = media.get("feature_attention_mask") is not None or any(g is not None and g.numel() for g in grids)
    ids, mask = prompt.input_ids, prompt.attention_mask
    if not has_media:
        return prefill_positions(mask, ids.shape, ids.device)
    fam = media.get("feature_attention_mask")
    return positions.rope_index(
        model.config.thinker, ids, mask,
        audio_mel_lengths=None if fam is None else fam.sum(-1).to(ids.device),
        image_grid_thw=media.get("image_grid_thw"), video_grid_thw=media.get("video_grid_thw"),
        video_second_per_grid=media.get("video_second_per_grid"),
        use_audio_in_video=bool(media.get("use_audio_in_video", False)),
    )


def talker_frames(
    model,
    prompt: TalkerPrompt,
    text_for_step: Callable[[int], torch.Tensor],
    settings: SpeechSettings,
    media: dict,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (codes [B, 16] of one frame, unfinished [B] before this frame) until every row emits codec EOS.

    `text_for_step(g)` gives the [B, C] text embedding the talker reads at step g (a trailing answer token,
    tts_eos or tts_pad); streaming callers may block in it until the thinker has produced that token.
    A row that has finished keeps going with EOS as its token (its frames are to be dropped by the caller);
    the token after the last allowed step never gets its frame, as in the reference.
    """
    talker, cfg = model.talker, model.config
    B = prompt.inputs_embeds.shape[0]
    device = prompt.inputs_embeds.device
    eos = cfg.talker.codec_eos_token_id
    suppress = suppressed_ids(cfg, device)
    pos = talker_positions(model, prompt, media).to(device)
    deltas = rope_deltas(pos, prompt.attention_mask)
    cache = talker.model.new_cache(B, prompt.inputs_embeds.shape[1] + settings.max_new_tokens)
    out = talker(prompt.inputs_embeds, pos, prompt.attention_mask, cache, logits_to_keep=1)
    logits, hidden = out.logits[:, -1], out.last_hidden_state[:, -1]
    graphs = graphs_wanted(device, settings.cuda_graphs)
    predict = _predictor(talker, B, hidden.dtype, device, graphs, settings)
    decoder = None
    seen = torch.empty(B, 0, dtype=torch.long, device=device)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    for step in range(settings.max_new_tokens):
        token = next_token(logits, settings.sampling, seen, suppress, settings.generator)
        token = torch.where(unfinished, token, torch.full_like(token, eos))
        seen = torch.cat([seen, token[:, None]], dim=1)
        unfinished = unfinished & (token != eos)
        if step == settings.max_new_tokens - 1 or not bool(unfinished.any()):
            return
        codes, embeds = predict(hidden, token)
        yield torch.cat([token[:, None], codes], dim=1), unfinished
        step_embed = (embeds.sum(dim=1) + text_for_step(step).to(embeds.dtype))[:, None]
        positions = decode_positions(cache.length, deltas)
        if decoder is None:
            decoder = _talker_decoder(talker, cache, step_embed, positions, graphs)
        logits, hidden = decoder(step_embed, positions)


def _talker_decoder(talker, cache, embed, positions, graphs: bool):
    """The talker's single-step forward -> (logits [B, V], last hidden state [B, C]); a CUDA graph on CUDA."""

    def forward(x, pos):
        out = talker(x, pos, cache=cache, logits_to_keep=1)
        return out.logits[:, -1], out.last_hidden_state[:, -1]

    if not static_steps(talker.model, graphs):
        return forward
    return StaticDecoder(forward, cache, embed, positions, capture=graphs)


def _predictor(talker, batch: int, dtype, device, graphs: bool, settings: SpeechSettings):
    """(hidden [B, C], code 0 [B]) -> (codes 1..15 [B, 15], the frame's 16 codec embeddings [B, 16, C]).
    Frames go through `predict` (one native call per step where the CPU kernel can run, else the eager loop),
    or through the static-cache runner for CUDA graphs or compiled steps where the native kernel cannot run."""
    cache = talker.code_predictor.new_cache(batch, dtype, device)
    native = not graphs and talker.code_predictor.native_step(cache) is not None
    if static_steps(talker.code_predictor.model, graphs) and not native:
        runner = predictor_runner(talker.code_predictor, batch, dtype, device, capture=graphs)
        return lambda hidden, token: runner.run(
            hidden, talker.model.codec_embedding(token), settings.predictor, settings.generator
        )

    def predict(hidden, token):
        frame = talker.predict_residual(hidden, token, settings.predictor, settings.generator, cache,
                                       check_ids=False)
        return frame.codes, frame.codec_embeds

    return predict
