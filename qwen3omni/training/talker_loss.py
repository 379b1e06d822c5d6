"""The talker's training loss: codec layer 0 from `codec_head`, layers 1..15 from the code predictor.

Teacher forcing reads exactly what generation reads (`generation.talker_input`): the same talker prompt, the
same per-step text schedule, the same codec-embedding sum, the same rotary positions. For target codes
`[B, 16, T]` the talker's input is

    prompt (L positions; its last one predicts code 0 of frame 0)
    + for g = 0..T-1: sum of frame g's 16 codec embeddings + the text of step g

and position L-1+g predicts code 0 of frame g, position L-1+T predicts codec EOS. That final target is
included by default, because the reference decodes until the talker emits EOS: a talker never trained on it
would not stop. The code predictor reads, for frame g, the talker's final hidden state at position L-1+g (the
one that produced code 0), as in generation, and all 15 heads of all frames run in one teacher-forced pass.

Weighting: `loss = layer0_loss + residual_weight * residual_loss` (+ `router_aux_loss_coef * aux_loss` when
`output_router_logits=True`), where `layer0_loss` is the mean cross-entropy over the layer-0 targets (EOS
included) and `residual_loss` the mean over every (frame, codebook 1..15) target, so each part stays O(log V)
whatever the number of codebooks. Qwen3-TTS fine-tuning recipes combine the same two means (some weight the
residual part by 0.3); the default weight here is 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError, describe
from ..generation.speech import talker_positions
from ..generation.talker_input import speaker_id, talker_prompt, trailing_text
from ..generation.text import MEDIA_KEYS
from ..model.talker import decode_positions, rope_deltas
from .data import eos_ids, final_index
from .losses import IGNORE_INDEX, load_balancing_loss


@dataclass
class TalkerLossOutput:
    loss: torch.Tensor  # layer0_loss + residual_weight * residual_loss (+ aux term)
    layer0_loss: torch.Tensor  # mean CE of codec_head over codes 0 of every frame (+ the EOS target)
    residual_loss: torch.Tensor  # mean CE of the code predictor over codes 1..15 of every frame
    layer0_logits: torch.Tensor  # [B, T (+1), V]: position t predicts layer 0 of frame t (t = T: EOS)
    residual_logits: torch.Tensor  # [B, T, 15, V]: all heads of every frame
    layer0_targets: torch.Tensor  # [B, T (+1)], IGNORE_INDEX past each row's end
    residual_targets: torch.Tensor  # [B, T, 15]
    aux_loss: torch.Tensor | None = None  # talker MoE load balancing, with output_router_logits=True

    def __getitem__(self, key):
        return getattr(self, key)


def talker_loss(
    model,
    batch: dict,
    assistant_ids: torch.Tensor,
    codes: torch.Tensor,
    speaker: str = "ethan",
    include_eos: bool = True,
    residual_weight: float = 1.0,
    output_router_logits: bool = False,
    eos_token_id: int | list[int] | None = None,
) -> TalkerLossOutput:
    """Teacher-forced talker + code predictor loss for a conversation and the codec codes of its spoken answer.

    `batch`: the processor's output for the prompt, which ends with `<|im_start|>assistant\\n` (left-padded
    rows, as the processor makes them). `assistant_ids` [B, n]: the answer's tokens, each row ending with its
    EOS (`<|im_end|>` unless `eos_token_id` says otherwise; anything may follow it). `codes` [B, 16, T]: the
    target codes of the answer's speech; a row with fewer frames marks the rest with a negative code
    (e.g. -100) in layer 0. Gradients reach every trainable part that generation would use: the talker, the
    code predictor, the projections and (when trainable) the thinker's embeddings and encoders.
    """
    cfg = model.config
    if model.talker is None or model.thinker is None:
        raise InputError(
            "talker_loss: needs the talker and the thinker (whose token embeddings the talker reads); "
            f"this model has {list(model.components)}"
        )
    input_ids, attention_mask, media = _split_batch(batch, cfg)
    B = input_ids.shape[0]
    talker = model.talker
    device = talker.codec_head.weight.device
    codes_BTG, lengths = _check_codes(codes, B, cfg.talker, device)
    if (not isinstance(assistant_ids, torch.Tensor) or assistant_ids.dim() != 2 or assistant_ids.shape[0] != B
            or assistant_ids.shape[1] < 1 or assistant_ids.is_floating_point()):
        raise InputError(
            f"assistant_ids: expected integer token ids of shape [{B}, answer length >= 1], "
            f"got {describe(assistant_ids)}"
        )
    T = codes_BTG.shape[1]
    steps = T if include_eos else T - 1  # frames fed back as inputs

    accept_hidden = _accept_hidden(model, input_ids, attention_mask, media)
    prompt = talker_prompt(
        model, input_ids, attention_mask, accept_hidden, assistant_ids[:, 0], speaker_id(cfg, speaker)
    )
    L = prompt.inputs_embeds.shape[1]
    frames = _frame_inputs(model, prompt, assistant_ids, codes_BTG[:, :steps], eos_token_id)
    inputs = torch.cat([prompt.inputs_embeds, frames.to(prompt.inputs_embeds.dtype)], dim=1)
    prompt_pos = talker_positions(model, prompt, media).to(device)
    step_pos = decode_positions(L, rope_deltas(prompt_pos, prompt.attention_mask), steps)
    position_ids = torch.cat([prompt_pos, step_pos.to(prompt_pos.dtype)], dim=-1)
    mask = torch.cat([prompt.attention_mask, prompt.attention_mask.new_ones(B, steps)], dim=1)
    out = talker(inputs, position_ids, mask, output_router_logits=output_router_logits, logits_to_keep=steps + 1)

    layer0_targets = _layer0_targets(codes_BTG, lengths, cfg.talker.codec_eos_token_id, include_eos)
    layer0_loss = _cross_entropy(out.logits, layer0_targets)
    hidden = out.last_hidden_state[:, L - 1 : L - 1 + T]  # the positions that produced each frame's code 0
    residual_logits = talker.code_predictor_logits(hidden, codes_BTG.clamp_min(0))
    frame_valid = torch.arange(T, device=device)[None, :] < lengths[:, None]
    residual_targets = codes_BTG[..., 1:].masked_fill(~frame_valid[..., None], IGNORE_INDEX)
    residual_loss = _cross_entropy(residual_logits, residual_targets)
    loss = layer0_loss + residual_weight * residual_loss
    aux = None
    if output_router_logits:
        text_cfg = cfg.talker.text
        aux = load_balancing_loss(out.router_logits, text_cfg.num_experts, text_cfg.num_experts_per_tok, mask)
        loss = loss + text_cfg.router_aux_loss_coef * aux
    return TalkerLossOutput(
        loss, layer0_loss, residual_loss, out.logits, residual_logits, layer0_targets, residual_targets, aux
    )


# ---- pieces ------------------------------------------------------------------------------------------------
def _split_batch(batch: dict, cfg):
    if not hasattr(batch, "get") or batch.get("input_ids") is None:
        raise InputError(f"batch: expected the processor's output for the prompt (input_ids...), got {describe(batch)}")
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2 or input_ids.shape[1] < 3 or not (
        bool((input_ids[:, -3] == cfg.im_start_token_id).all())
        and bool((input_ids[:, -2] == cfg.assistant_token_id).all())
    ):
        raise InputError(
            "batch['input_ids']: every row must end with the generation prompt '<|im_start|>assistant\\n' "
            "(left-padded rows, as the processor makes them); pass the prompt, with the answer in assistant_ids"
        )
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    media = {k: batch[k] for k in MEDIA_KEYS if batch.get(k) is not None}
    return input_ids, attention_mask, media


def _check_codes(codes: torch.Tensor, batch: int, talker_cfg, device) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [B, G, T] -> ([B, T, G] long, valid frames per row [B]); valid frames must come first, their codes
    inside the vocabularies (an id past a table would otherwise fail inside the embedding or the loss: on a GPU,
    as a device-side assert that takes the process down)."""
    groups = talker_cfg.num_code_groups
    if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.shape[:2] != (batch, groups):
        raise InputError(f"codes: expected shape [{batch}, {groups}, frames], got {describe(codes)}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise InputError(f"codes: expected integer codec ids, got {describe(codes)}")
    if codes.shape[2] < 1:
        raise InputError("codes: expected at least one frame")
    codes_BTG = codes.to(device, torch.long).transpose(1, 2)
    valid = codes_BTG[..., 0] >= 0
    lengths = valid.sum(dim=1)
    prefix = torch.arange(codes_BTG.shape[1], device=device)[None, :] < lengths[:, None]
    if not torch.equal(valid, prefix) or bool((lengths == 0).any()):
        raise InputError(
            "codes: each row's valid frames (layer-0 code >= 0) must come first, at least one per row, "
            "followed only by padding frames (negative layer-0 code)"
        )
    _check_code_range(codes_BTG[valid], talker_cfg.text.vocab_size, talker_cfg.code_predictor.vocab_size)
    return codes_BTG, lengths


def _check_code_range(frames_NG: torch.Tensor, layer0_vocab: int, residual_vocab: int) -> None:
    """Layer 0 indexes the talker's codec vocabulary, layers 1.. the code predictor's (valid frames only)."""
    for name, part, vocab in (("layer 0", frames_NG[:, :1], layer0_vocab),
                              (f"layers 1..{frames_NG.shape[1] - 1}", frames_NG[:, 1:], residual_vocab)):
        bad = (part < 0) | (part >= vocab)
        if bool(bad.any()):
            raise InputError(
                f"codes: {name} of a valid frame must be in [0, {vocab}), got {int(part[bad][0])}"
            )


def _accept_hidden(model, input_ids, attention_mask, media) -> torch.Tensor | None:
    """The thinker's layer-`accept_hidden_layer` states over the prompt, which the talker reads at media
    positions; None for text-only prompts (where generation does not read them either). Gradients flow back
    into the thinker only if some of its parameters are trainable."""
    tcfg = model.config.thinker
    media_ids = torch.tensor([tcfg.audio_token_id, tcfg.image_token_id, tcfg.video_token_id], device=input_ids.device)
    if not bool(torch.isin(input_ids, media_ids).any()):
        return None
    thinker = model.thinker
    grad = torch.is_grad_enabled() and any(p.requires_grad for p in thinker.parameters())
    with torch.set_grad_enabled(grad):
        out = thinker(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1, **media
        )
    return out.hidden_states[model.config.talker.accept_hidden_layer]


def _frame_inputs(model, prompt, answer, codes_BSG, eos_token_id) -> torch.Tensor:
    """[B, S, C]: for step g, the sum of frame g's codec embeddings + the text generation feeds at step g."""
    B, S, _ = codes_BSG.shape
    final = final_index(answer, eos_ids(model.config, eos_token_id))
    trailing = trailing_text(model, answer, final, prompt.markers)  # [B, n-1, C]
    text = trailing[:, :S]
    if text.shape[1] < S:  # past the text: tts_pad, as generation does
        pad = prompt.markers.pad.to(text.dtype).expand(B, S - text.shape[1], -1)
        text = torch.cat([text, pad], dim=1)
    codes = codes_BSG.clamp_min(0).to(text.device)  # padding frames: any id; their targets are ignored
    codec = model.talker.codec_embeds(codes[..., 0], codes[..., 1:]).sum(dim=-2)
    return codec + text.to(codec.dtype)


def _layer0_targets(codes_BTG, lengths, eos_id: int, include_eos: bool) -> torch.Tensor:
    T = codes_BTG.shape[1]
    targets = codes_BTG[..., 0].masked_fill(
        torch.arange(T, device=codes_BTG.device)[None, :] >= lengths[:, None], IGNORE_INDEX
    )
    if not include_eos:
        return targets
    targets = torch.cat([targets, targets.new_full((targets.shape[0], 1), IGNORE_INDEX)], dim=1)
    return targets.scatter(1, lengths[:, None], eos_id)


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.float().flatten(0, -2), targets.to(logits.device).flatten(), ignore_index=IGNORE_INDEX
    )
