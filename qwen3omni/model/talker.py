"""The Talker (`talker.*`): an MoE decoder that predicts codec layer 0 at 12.5 Hz, plus the code predictor.

The talker reads embeddings (built by generation from projections of the thinker's embeddings and hidden
states, and from codec embeddings); it never sees token ids. Every layer is an MoE block with a gated shared
expert. Its rotary positions are TM-RoPE ids like the thinker's; the functions at the end say how the
reference computes them for a prompt and how they continue while decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import TalkerConfig
from ..errors import InputError, describe, expect_int
from ..generation.sampling import SamplingConfig
from ..modules.activations import activation
from ..modules.decoder import DecoderStack
from ..modules.few_rows import FewRowLinear
from ..modules.kv_cache import KVCache
from .code_predictor import CodePredictor, PredictedFrame
from .thinker import moe_decoder_layers, sectioned_rotary


class TalkerModel(DecoderStack):
    """`talker.model`: codec embedding + the MoE decoder stack (experts and shared expert on every layer)."""

    def __init__(self, cfg):
        layers = moe_decoder_layers(cfg, always_moe=True)
        super().__init__(layers, cfg.hidden_size, cfg.rms_norm_eps, sectioned_rotary(cfg))
        self.codec_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


class ResizeMLP(nn.Module):
    """`text_projection` / `hidden_projection`: thinker width -> talker width through one hidden layer."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, act: str):
        super().__init__()
        self.linear_fc1 = FewRowLinear(dim_in, hidden, bias=True)
        self.linear_fc2 = FewRowLinear(hidden, dim_out, bias=True)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


@dataclass
class TalkerOutput:
    logits: torch.Tensor  # [B, T or logits_to_keep, codec vocab]
    last_hidden_state: torch.Tensor  # [B, T, C], after the final norm: what the code predictor reads
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings, each layer's output (last one normed)
    router_logits: tuple[torch.Tensor, ...] | None = None  # one [B*T, E] per layer
    cache: KVCache | None = None

    def __getitem__(self, key):
        return getattr(self, key)


class Talker(nn.Module):
    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        self.config = cfg
        text = cfg.text
        self.model = TalkerModel(text)
        resize = (cfg.thinker_hidden_size, text.intermediate_size, text.hidden_size, text.hidden_act)
        self.text_projection = ResizeMLP(*resize)  # thinker token embeddings (text positions)
        self.hidden_projection = ResizeMLP(*resize)  # thinker layer-`accept_hidden_layer` states (media positions)
        self.codec_head = FewRowLinear(text.hidden_size, text.vocab_size, bias=False)
        self.code_predictor = CodePredictor(cfg.code_predictor)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        output_router_logits: bool = False,
        logits_to_keep: int = 0,
    ) -> TalkerOutput:
        """Codec-layer-0 logits for `inputs_embeds` [B, T, C].

        `position_ids` [3, B, T] TM-RoPE ids (a [4, B, T] tensor in the reference's generate layout, text ids
        first, is accepted and its text row dropped). Without them a prompt gets `prefill_positions`; continuing
        from a non-empty `cache` needs them explicitly (see `decode_positions`). `attention_mask` [B, T] marks
        left padding of these tokens. `logits_to_keep=n > 0` applies `codec_head` to the last n positions only.
        """
        C = self.config.text.hidden_size
        if (not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != C
                or not inputs_embeds.is_floating_point()):
            expected = f"a float tensor [batch, time, {C}]"
            raise InputError(f"inputs_embeds: expected {expected}, got {describe(inputs_embeds)}")
        logits_to_keep = expect_int(logits_to_keep, "logits_to_keep", least=0)
        shape = tuple(inputs_embeds.shape[:2])
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                           or tuple(attention_mask.shape) != shape):
            raise InputError(f"attention_mask: expected shape {list(shape)}, got {describe(attention_mask)}")
        if position_ids is not None and (
            not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 3
            or position_ids.shape[0] not in (3, 4) or tuple(position_ids.shape[1:]) != shape
        ):
            raise InputError(f"position_ids: expected shape {[3, *shape]} (or [4, ...]), got {describe(position_ids)}")
        if position_ids is None:
            if cache is not None and cache.length > 0:
                raise InputError("Talker.forward: position_ids are required to continue from a non-empty cache")
            position_ids = prefill_positions(attention_mask, inputs_embeds.shape[:2], inputs_embeds.device)
        elif position_ids.dim() == 3 and position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        out = self.model(
            inputs_embeds, position_ids, attention_mask, cache,
            output_hidden_states=output_hidden_states, output_router_logits=output_router_logits,
        )
        hidden = out.last_hidden_state
        logits = self.codec_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return TalkerOutput(logits, hidden, out.hidden_states, out.router_logits, cache)

    # ---- codec embeddings ---------------------------------------------------------------------------------
    def codec_step_embedding(self, layer0_ids_B: torch.Tensor, residual_codes_BN: torch.Tensor) -> torch.Tensor:
        """[B, C]: the summed embeddings of one frame's G codes, the codec part of the talker's next input.

        Code 0 is embedded by `model.codec_embedding`, code c >= 1 by `code_predictor.model.codec_embedding[c-1]`
        (the tables the code predictor itself reads). Generation adds the next text embedding (or tts_pad) to it.
        The sum runs over a stacked [B, G, C] tensor, in the reference's order.
        """
        return self.codec_embeds(layer0_ids_B, residual_codes_BN).sum(dim=-2)

    def codec_embeds(self, layer0_ids: torch.Tensor, residual_codes: torch.Tensor) -> torch.Tensor:
        """[..., G, C]: each code of a frame embedded by its own table (code 0 by the talker's)."""
        self._check_codes(layer0_ids, residual_codes, "layer0_ids", "residual_codes")
        first = self.model.codec_embedding(layer0_ids).unsqueeze(-2)
        return torch.cat([first, self.code_predictor.embed_residual(residual_codes)], dim=-2)

    def predict_residual(
        self,
        talker_hidden_BC: torch.Tensor,
        layer0_ids_B: torch.Tensor,
        sampling: SamplingConfig | None = None,
        generator: torch.Generator | None = None,
        cache: KVCache | None = None,
        return_logits: bool = False,
        check_ids: bool = True,
    ) -> PredictedFrame:
        """Run the code predictor for one frame: codes 1..G-1 and the summed embedding for the next step.

        `layer0_ids_B` [B] holds one code 0 per row of `talker_hidden_BC` (always checked: metadata only).
        `check_ids` also checks their values against the codec vocabulary, one host read (a sync on a GPU, not
        allowed while capturing a CUDA graph): generation loops, which feed back codes they sampled themselves,
        pass False."""
        hidden = talker_hidden_BC
        rows = hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() else None
        if not isinstance(layer0_ids_B, torch.Tensor) or layer0_ids_B.dim() != 1 or layer0_ids_B.shape[0] != rows:
            raise InputError(
                f"layer0_ids_B: expected a 1-D tensor of codec ids, one per row of talker_hidden_BC ({rows}), "
                f"got {describe(layer0_ids_B)}"
            )
        if check_ids:
            self._check_ids("layer0_ids_B", layer0_ids_B, self.config.text.vocab_size)
        return self.code_predictor.predict(
            talker_hidden_BC, self.model.codec_embedding(layer0_ids_B), sampling, generator, cache, return_logits
        )

    def code_predictor_logits(self, talker_hidden_BTC: torch.Tensor, codes_BTG: torch.Tensor) -> torch.Tensor:
        """Teacher-forced code predictor logits [B, T, G-1, V] for frames with known codes [B, T, G] (training)."""
        G = self.config.num_code_groups
        if codes_BTG.dim() != 3 or codes_BTG.shape[-1] != G:
            raise InputError(f"codes_BTG: expected shape [batch, frames, {G}], got {describe(codes_BTG)}")
        codes_BTG = codes_BTG.clamp_min(0)  # negative codes mark padding frames, which the loss ignores
        self._check_codes(codes_BTG[..., 0], codes_BTG[..., 1:], "codes_BTG[..., 0]", "codes_BTG[..., 1:]")
        layer0 = self.model.codec_embedding(codes_BTG[..., 0])
        return self.code_predictor(talker_hidden_BTC, layer0, codes_BTG[..., 1:])

    def _check_codes(self, layer0, residual, layer0_name: str, residual_name: str) -> None:
        """Codes inside their tables (else IndexError inside F.embedding; on a GPU a device-side assert). One host
        read per table: for these helpers, not for the generation loop, which only feeds back codes it sampled."""
        self._check_ids(layer0_name, layer0, self.config.text.vocab_size)
        self._check_ids(residual_name, residual, self.config.code_predictor.vocab_size)

    @staticmethod
    def _check_ids(name: str, codes, vocab: int) -> None:
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex() \
                or codes.dtype == torch.bool:
            raise InputError(f"{name}: expected integer codec ids, got {describe(codes)}")
        bad = (codes < 0) | (codes >= vocab)
        if bool(bad.any()):
            raise InputError(f"{name}: expected codec ids in [0, {vocab}), got {int(codes[bad][0])}")


# ---- rotary positions -------------------------------------------------------------------------------------------
# For a prompt without audio/image/video the reference gives every axis the count of real tokens before each
# position (cumsum of the attention mask minus one) and 0 at left padding. With media, generation computes the
# prompt's ids with the thinker's TM-RoPE rule (`positions.rope_index`) on the talker's input ids. Decoding then
# continues every axis from one past the prompt's largest id: the token written at physical cache index L
# (padding included) gets L + delta with delta = max id + 1 - T, T the padded prompt length (`rope_deltas`).
# This equals the reference's "last id + 1 per axis" continuation because a talker prompt ends in text tokens,
# whose three ids are equal and the largest so far.


def prefill_positions(attention_mask: torch.Tensor | None, shape, device=None) -> torch.Tensor:
    """Text-only talker prompt ids [3, B, T] (long): cumsum(mask) - 1, and 0 at padded positions."""
    B, T = shape
    if attention_mask is None:
        return torch.arange(T, device=device).expand(3, B, T)
    mask = attention_mask.bool()
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(~mask, 0).expand(3, B, T)


def rope_deltas(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1] (long): for a prompt's ids [3, B, T], the offset from physical cache index to decode position id."""
    T = position_ids.shape[-1]
    ids = position_ids.long()
    if attention_mask is not None:
        ids = ids.masked_fill(~attention_mask.bool().unsqueeze(0), torch.iinfo(torch.long).min)
    return ids.amax(dim=(0, 2)).unsqueeze(1) + 1 - T


def decode_positions(past_length: int, deltas: torch.Tensor, new_tokens: int = 1) -> torch.Tensor:
    """Ids [3, B, new_tokens] (long) for tokens written at cache indices past_length .. past_length+new_tokens-1."""
    steps = torch.arange(past_length, past_length + new_tokens, device=deltas.device)
    return (steps.unsqueeze(0) + deltas).unsqueeze(0).expand(3, -1, -1)
