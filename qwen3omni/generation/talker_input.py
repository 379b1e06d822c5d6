"""What the talker reads: its prompt and the text it is fed one embedding per step.

Built as the reference builds it, and shared by generation, streaming and the talker training loss so that
training and inference agree:

- user turns of the prompt (every token whose latest `<|im_start|>` opens a `user` turn): text tokens through
  `text_projection` of the thinker's token embeddings, audio/image/video tokens through `hidden_projection` of
  the thinker's layer-`accept_hidden_layer` hidden states; right-aligned and left-padded across the batch;
- the assistant turn: `<|im_start|>assistant\\n`, four tts_pad, tts_bos and the first answer token (text side)
  on top of [0, 0, 0, nothink, think_bos, think_eos, speaker, codec_pad, codec_bos] (codec side);
- then, step by step, the remaining answer tokens' projections, tts_eos in place of the final token, and tts_pad
  once the text is exhausted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..model.placement import device_of


@dataclass
class TtsMarkers:
    bos: torch.Tensor  # [C_talker] each: text_projection of the thinker's embedding of the marker token
    eos: torch.Tensor
    pad: torch.Tensor


@dataclass
class TalkerPrompt:
    inputs_embeds: torch.Tensor  # [B, L, C_talker]
    input_ids: torch.Tensor  # [B, L]: user token ids then tts_pad ids (for the TM-RoPE rule)
    attention_mask: torch.Tensor  # [B, L]: user part right-aligned, left-padded
    markers: TtsMarkers


def speaker_id(config, speaker: str) -> int:
    """The codec id of a speaker by name (any case); an unknown name lists the valid ones."""
    table = config.talker.speaker_id
    key = speaker.lower() if isinstance(speaker, str) else speaker
    if key not in table:
        raise InputError(f"speaker: unknown speaker {speaker!r}; expected one of {sorted(table)}")
    return table[key]


def project_text(model, token_ids: torch.Tensor) -> torch.Tensor:
    """text_projection(thinker token embedding) for ids of any shape -> [..., C_talker]."""
    embeds = model.thinker.model.embed_tokens(token_ids.to(device_of(model.thinker)))
    return model.talker.text_projection(embeds.to(device_of(model.talker)))


def tts_markers(model) -> TtsMarkers:
    cfg = model.config
    ids = torch.tensor([cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id])
    bos, eos, pad = project_text(model, ids).unbind(0)
    return TtsMarkers(bos, eos, pad)


def user_turn_mask(config, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] True at tokens of user turns: those whose latest <|im_start|> is followed by the user role token."""
    T = input_ids.shape[1]
    pos = torch.arange(T, device=input_ids.device).expand_as(input_ids)
    starts = torch.where(input_ids == config.im_start_token_id, pos, torch.full_like(pos, -1))
    latest = torch.cummax(starts, dim=-1).values.clamp_min(0)
    role = input_ids.gather(1, (latest + 1).clamp_max(T - 1))
    return (role == config.user_token_id) & attention_mask.bool()


def user_part(model, input_ids, attention_mask, accept_hidden):
    """Talker embeddings, ids and mask of the prompt's user turns, right-aligned: ([B,U,C], [B,U], [B,U])."""
    cfg = model.config
    talker = model.talker
    device = device_of(talker)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    media = torch.isin(input_ids, torch.tensor(
        [cfg.thinker.audio_token_id, cfg.thinker.image_token_id, cfg.thinker.video_token_id], device=device
    ))
    dtype = talker.codec_head.weight.dtype
    embeds = torch.empty(*input_ids.shape, cfg.talker.text.hidden_size, device=device, dtype=dtype)
    if bool(media.any()):
        embeds[media] = talker.hidden_projection(accept_hidden.to(device)[media]).to(embeds.dtype)
    embeds[~media] = project_text(model, input_ids[~media]).to(embeds.dtype)
    user = user_turn_mask(cfg, input_ids, attention_mask)
    counts = user.sum(dim=-1)
    U = int(counts.max())
    T = input_ids.shape[1]
    pos = torch.arange(T, device=device).expand_as(input_ids)
    # Sorting puts user positions last (offset by T) in order, so the last U columns are the user tokens,
    # right-aligned like the mask below.
    order = torch.where(user, pos + T, pos).argsort(dim=-1)[:, T - U :]
    mask = (torch.arange(U, device=device) >= (U - counts)[:, None]).to(attention_mask.dtype)
    gathered = embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1]))
    return gathered, input_ids.gather(1, order), mask


def assistant_start(config, input_ids: torch.Tensor) -> int:
    """Index of the last `<|im_start|>assistant` of row 0 (rows are left-padded, so it is shared)."""
    hits = (input_ids[0, :-1] == config.im_start_token_id) & (input_ids[0, 1:] == config.assistant_token_id)
    idx = hits.nonzero().flatten()
    if idx.numel() == 0:
        raise InputError("input_ids: the prompt has no '<|im_start|>assistant' turn for the talker to speak")
    return int(idx[-1])


ASSISTANT_HEAD = 3  # <|im_start|>, assistant, \n: the prompt's last tokens, before the answer
ASSISTANT_INPUTS = 9  # what `assistant_part` makes of them, the first answer token and the speaker


def check_speech_prompt(model, input_ids: torch.Tensor, attention_mask, talker_max_new_tokens: int) -> None:
    """What the talker will need from the prompt, checked before the thinker runs rather than after it.

    The prompt must end with `<|im_start|>assistant\\n`: the talker speaks the generated answer only, and tokens
    pre-filled after that head would be silently missing from the speech (transformers speaks them), so such a
    prompt is refused. And the talker's prompt plus `talker_max_new_tokens` frames must fit its
    positions, as the thinker's prompt plus `max_new_tokens` must fit the thinker's."""
    cfg = model.config
    start = assistant_start(cfg, input_ids)
    after = input_ids.shape[1] - (start + ASSISTANT_HEAD)
    if after != 0:
        got = f"{after} token(s) after it" if after > 0 else "a prompt that stops inside it"
        raise InputError(
            "input_ids: with return_audio=True the prompt must end with '<|im_start|>assistant\\n' (the "
            f"processor's generation prompt), got {got}; a pre-filled answer start is not spoken by the talker, "
            "so it is refused (pass return_audio=False to continue it as text only)"
        )
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    length = int(user_turn_mask(cfg, input_ids, mask).sum(dim=-1).max()) + ASSISTANT_INPUTS
    limit = cfg.talker.text.max_position_embeddings
    if length + talker_max_new_tokens > limit:
        raise InputError(
            f"talker_max_new_tokens: a talker prompt of {length} tokens + talker_max_new_tokens="
            f"{talker_max_new_tokens} exceeds the talker's max_position_embeddings={limit}; expected at most "
            f"{limit - length}"
        )


def assistant_part(model, head_ids: torch.Tensor, speaker: int, markers: TtsMarkers):
    """The assistant turn's 9 talker inputs from its first 4 tokens (<|im_start|>, assistant, \\n, first answer
    token) and the speaker id: ([B, 9, C], [B, 9] tts_pad ids)."""
    cfg, talker = model.config, model.talker
    B = head_ids.shape[0]
    head = project_text(model, head_ids)  # [B, 4, C]
    fill = torch.stack([markers.pad] * 4 + [markers.bos])[None].expand(B, -1, -1)
    text = torch.cat([head[:, :3], fill, head[:, 3:4]], dim=1)
    t = cfg.talker
    codec_ids = torch.tensor(
        [t.codec_nothink_id, t.codec_think_bos_id, t.codec_think_eos_id, speaker, t.codec_pad_id, t.codec_bos_id],
        device=text.device,
    )
    codec = talker.model.codec_embedding(codec_ids)[None].expand(B, -1, -1)
    codec = torch.cat([codec.new_zeros(B, 3, codec.shape[-1]), codec], dim=1)
    ids = torch.full((B, 9), cfg.tts_pad_token_id, dtype=torch.long, device=text.device)
    return text + codec, ids


def talker_prompt(model, input_ids, attention_mask, accept_hidden, first_tokens, speaker: int) -> TalkerPrompt:
    """The talker's prompt once the thinker has read the prompt and produced its first answer token.

    `accept_hidden` [B, T, C] is the thinker's layer-`accept_hidden_layer` output over the prompt;
    `first_tokens` [B] the first generated token of each row.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    markers = tts_markers(model)
    user_embeds, user_ids, user_mask = user_part(model, input_ids, attention_mask, accept_hidden)
    start = assistant_start(model.config, input_ids)
    head_ids = torch.cat([input_ids[:, start : start + 3], first_tokens[:, None].to(input_ids.device)], dim=1)
    if head_ids.shape[1] != 4:
        raise InputError("input_ids: the prompt must end with '<|im_start|>assistant\\n' before the answer")
    asst_embeds, asst_ids = assistant_part(model, head_ids, speaker, markers)
    device = asst_embeds.device
    return TalkerPrompt(
        inputs_embeds=torch.cat([user_embeds.to(asst_embeds.dtype), asst_embeds], dim=1),
        input_ids=torch.cat([user_ids.to(device), asst_ids], dim=1),
        attention_mask=torch.cat([user_mask.to(device), torch.ones_like(asst_ids, dtype=user_mask.dtype)], dim=1),
        markers=markers,
    )


def trailing_text(model, answer: torch.Tensor, final: torch.Tensor, markers: TtsMarkers) -> torch.Tensor:
    """The text the talker reads at steps 0..n-2 for answer tokens [B, n] (first token excluded: it is in the
    prompt): projections of tokens 1..n-2, then tts_eos where the final token stands.

    `final` [B] is the index (in `answer`) of each row's final token: its EOS, or n-1 if it has none. As the
    reference does for batches, a row that ended early reads its EOS token's projection, then tts_eos, then
    tts_pad, so that it learns its text ended although the longest row is still going.
    """
    n = answer.shape[1]
    body = project_text(model, answer[:, 1 : n - 1]) if n > 2 else None
    B = answer.shape[0]
    eos = markers.eos[None, None].expand(B, 1, -1)
    steps = eos if body is None else torch.cat([body, eos], dim=1)  # [B, n - 1, C]
    j = torch.arange(steps.shape[1], device=steps.device)[None, :, None]
    e = final.to(steps.device)[:, None, None]
    steps = torch.where(j == e, markers.eos.to(steps.dtype), steps)
    return torch.where(j > e, markers.pad.to(steps.dtype), steps)
