"""The Thinker: audio encoder + vision encoder + MoE text decoder with TM-RoPE.

`Thinker.forward` takes the processor's batch (the contract's keys), runs the encoders, writes their
outputs into the placeholder positions, adds the deepstack visual features after the first decoder layers,
and returns logits. The same call continues a generation through a `KVCache`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import MoeDecoderConfig, ThinkerConfig
from ..errors import InputError, describe, expect_int
from ..modules.attention import Attention
from ..modules.decoder import DecoderLayer, DecoderStack
from ..modules.few_rows import FewRowLinear
from ..modules.kv_cache import KVCache
from ..modules.mlp import SwiGLU
from ..modules.moe import MoeBlock
from ..modules.rotary import RotaryEmbedding
from . import positions
from .audio_encoder import AudioEncoder
from .vision_encoder import VisionEncoder


def moe_decoder_layers(cfg: MoeDecoderConfig, always_moe: bool = False) -> list[DecoderLayer]:
    """Decoder layers of a Qwen3-MoE config: experts where `cfg.is_moe_layer` says so, a dense SwiGLU elsewhere.

    `always_moe` is the talker's rule: every talker layer has experts (and its shared expert).
    """
    layers = []
    for i in range(cfg.num_hidden_layers):
        attention = Attention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            bias=cfg.attention_bias, qk_norm=True, eps=cfg.rms_norm_eps,
        )
        if always_moe or cfg.is_moe_layer(i):
            mlp = MoeBlock(
                cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
                cfg.norm_topk_prob, cfg.shared_expert_intermediate_size, cfg.hidden_act,
            )
        else:
            mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        layers.append(DecoderLayer(attention, mlp, cfg.hidden_size, cfg.rms_norm_eps))
    return layers


def sectioned_rotary(cfg: MoeDecoderConfig) -> RotaryEmbedding:
    return RotaryEmbedding.sectioned(cfg.head_dim, cfg.rope_theta, cfg.mrope_section, cfg.mrope_interleaved)


class ThinkerTextModel(DecoderStack):
    """`thinker.model`: token embedding + the MoE decoder stack."""

    def __init__(self, cfg: MoeDecoderConfig):
        super().__init__(moe_decoder_layers(cfg), cfg.hidden_size, cfg.rms_norm_eps, sectioned_rotary(cfg))
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


@dataclass
class ThinkerOutput:
    logits: torch.Tensor  # [B, T or logits_to_keep, V]
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings, each layer's output (last one normed)
    router_logits: tuple[torch.Tensor, ...] | None = None
    position_ids: torch.Tensor | None = None  # [3, B, T] TM-RoPE ids used for these tokens
    cache: KVCache | None = None

    def __getitem__(self, key):  # dict-style access, as for transformers outputs
        return getattr(self, key)


@dataclass
class MultimodalEmbeds:
    inputs_embeds: torch.Tensor  # [B, T, C] with encoder outputs at placeholder positions
    visual_mask: torch.Tensor | None = None  # [B, T] True at image and video positions
    deepstack: list[torch.Tensor] | None = None  # per deepstack layer: [visual tokens, C] in sequence order


class Thinker(nn.Module):
    def __init__(self, cfg: ThinkerConfig):
        super().__init__()
        self.config = cfg
        self.audio_tower = AudioEncoder(cfg.audio)
        self.visual = VisionEncoder(cfg.vision)
        self.model = ThinkerTextModel(cfg.text)
        self.lm_head = FewRowLinear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    # ---- inputs -> embeddings -------------------------------------------------------------------------
    def embed(
        self,
        input_ids: torch.Tensor,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> MultimodalEmbeds:
        """Token embeddings with audio, image and video encoder outputs written at their placeholders."""
        cfg = self.config
        embeds = self.model.embed_tokens(input_ids)
        if input_features is not None:
            lengths = _feature_lengths(input_features, feature_attention_mask)
            audio = self.audio_tower(input_features, lengths)
            embeds = _scatter(embeds, input_ids == cfg.audio_token_id, audio, "audio")
        visual_parts = []  # (mask, deepstack features) per modality
        for ids_name, pixels, grid, token in (
            ("image", pixel_values, image_grid_thw, cfg.image_token_id),
            ("video", pixel_values_videos, video_grid_thw, cfg.video_token_id),
        ):
            if pixels is None:
                continue
            pixels_name = "pixel_values" if ids_name == "image" else "pixel_values_videos"
            if grid is None:
                raise InputError(
                    f"{ids_name}_grid_thw: required with {pixels_name} (one (t, h, w) row per {ids_name}), got None"
                )
            merged, deepstack = self.visual(pixels, grid, (pixels_name, f"{ids_name}_grid_thw"))
            mask = input_ids == token
            embeds = _scatter(embeds, mask, merged, ids_name)
            visual_parts.append((mask, deepstack))
        if not visual_parts:
            return MultimodalEmbeds(embeds)
        visual_mask = visual_parts[0][0]
        for mask, _ in visual_parts[1:]:
            visual_mask = visual_mask | mask
        deepstack = []
        for layer in range(len(visual_parts[0][1])):
            joint = embeds.new_zeros(int(visual_mask.sum()), embeds.shape[-1])
            for mask, feats in visual_parts:
                joint[mask[visual_mask]] = feats[layer].to(joint.dtype)
            deepstack.append(joint)
        return MultimodalEmbeds(embeds, visual_mask, deepstack)

    def rope_positions(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        feature_attention_mask: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        video_second_per_grid: torch.Tensor | None = None,
        use_audio_in_video: bool = False,
    ) -> torch.Tensor:
        """TM-RoPE ids [3, B, T] for a whole prompt (see `positions.rope_index`)."""
        return positions.rope_index(
            self.config,
            input_ids,
            attention_mask,
            audio_mel_lengths=None if feature_attention_mask is None else feature_attention_mask.sum(-1),
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            video_second_per_grid=video_second_per_grid,
            use_audio_in_video=use_audio_in_video,
        )

    # ---- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        video_second_per_grid: torch.Tensor | None = None,
        use_audio_in_video: bool = False,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_router_logits: bool = False,
        logits_to_keep: int = 0,
    ) -> ThinkerOutput:
        """Logits for a batch in the processor's format.

        Without `position_ids` the TM-RoPE ids are computed from `input_ids` and the media grids, which is
        right for a whole prompt; a caller continuing through a non-empty `cache` passes them explicitly
        (generation does). `logits_to_keep=n > 0` applies the LM head to the last n positions only.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("Thinker.forward: pass exactly one of input_ids and inputs_embeds")
        logits_to_keep = expect_int(logits_to_keep, "logits_to_keep", least=0)
        if inputs_embeds is not None:
            _refuse_media_with_embeds(
                input_features=input_features, pixel_values=pixel_values, pixel_values_videos=pixel_values_videos,
                image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            )
        for grid_name, grid, pixels_name, pixels in (
            ("image_grid_thw", image_grid_thw, "pixel_values", pixel_values),
            ("video_grid_thw", video_grid_thw, "pixel_values_videos", pixel_values_videos),
        ):
            if grid is not None and pixels is None and input_ids is not None:
                raise InputError(f"{pixels_name}: required with {grid_name} (the grids describe its patches), got None")
        self._check_inputs(
            input_ids, inputs_embeds, attention_mask, position_ids, labels, cache,
            {"audio": input_features, "image": pixel_values, "video": pixel_values_videos}, logits_to_keep,
        )
        self._check_video_seconds(video_grid_thw, video_second_per_grid)
        deepstack_hook = None
        if inputs_embeds is None:
            mm = self.embed(
                input_ids, input_features, feature_attention_mask, pixel_values, image_grid_thw,
                pixel_values_videos, video_grid_thw,
            )
            inputs_embeds = mm.inputs_embeds
            if mm.deepstack is not None:
                deepstack_hook = _deepstack_hook(mm.visual_mask, mm.deepstack)
        if position_ids is None:
            if cache is not None and cache.length > 0:
                raise InputError("Thinker.forward: position_ids are required to continue from a non-empty cache")
            if input_ids is None:
                position_ids = positions.text_positions(attention_mask, inputs_embeds.shape[:2], inputs_embeds.device)
            else:
                position_ids = self.rope_positions(
                    input_ids, attention_mask, feature_attention_mask, image_grid_thw, video_grid_thw,
                    video_second_per_grid, use_audio_in_video,
                )
        out = self.model(
            inputs_embeds, position_ids, attention_mask, cache, deepstack_hook,
            output_hidden_states=output_hidden_states, output_router_logits=output_router_logits,
        )
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        result = ThinkerOutput(
            logits=logits, hidden_states=out.hidden_states, router_logits=out.router_logits,
            position_ids=position_ids, cache=cache,
        )
        if labels is not None or output_router_logits:
            from ..training.losses import thinker_losses

            thinker_losses(self.config.text, result, labels, attention_mask)
        return result

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, labels, cache, media,
                      logits_to_keep: int = 0) -> None:
        """Shapes, dtypes, length and (for a prompt) token values, checked before anything runs, so that a bad
        call raises an InputError and leaves a passed `cache` as it was. A decode step (continuing a non-empty
        cache) gets only the checks that read no tensor values: it stays free of host syncs."""
        cfg = self.config.text
        if input_ids is not None:
            check_token_ids(input_ids)
            shape = tuple(input_ids.shape)
        else:
            if (not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3
                    or inputs_embeds.shape[-1] != cfg.hidden_size or not inputs_embeds.is_floating_point()):
                raise InputError(
                    f"inputs_embeds: expected a float tensor [batch, time, {cfg.hidden_size}], "
                    f"got {describe(inputs_embeds)}"
                )
            shape = tuple(inputs_embeds.shape[:2])
        if 0 in shape:
            raise InputError(f"input_ids: expected at least one row of at least one token, got shape {list(shape)}")
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape):
                raise InputError(f"{name}: expected shape {list(shape)} (that of input_ids), got {describe(t)}")
        if labels is not None:
            from ..training.losses import check_labels

            check_labels(labels, cfg.vocab_size)  # before the forward, not after it
        if labels is not None and logits_to_keep:
            raise InputError(
                f"logits_to_keep: must be 0 when labels are given (the loss needs every position's logits), "
                f"got {logits_to_keep}"
            )
        if position_ids is not None and (
            not isinstance(position_ids, torch.Tensor) or tuple(position_ids.shape) != (3, *shape)
        ):
            raise InputError(
                f"position_ids: expected TM-RoPE ids of shape {[3, *shape]} (temporal, height, width), "
                f"got {describe(position_ids)}"
            )
        past = cache.length if cache is not None else 0
        if past + shape[1] > cfg.max_position_embeddings:
            raise InputError(
                f"input_ids: {shape[1]} tokens" + (f" after {past} cached ones" if past else "")
                + f" exceed the model's max_position_embeddings={cfg.max_position_embeddings}"
            )
        if input_ids is not None and past == 0:
            self._check_token_values(input_ids, media)

    @staticmethod
    def _check_video_seconds(video_grid_thw, video_second_per_grid) -> None:
        if video_grid_thw is None or video_second_per_grid is None:
            return
        n_videos, n_seconds = len(video_grid_thw), torch.as_tensor(video_second_per_grid).reshape(-1).shape[0]
        if n_videos != n_seconds:
            raise InputError(
                f"video_second_per_grid: expected one value per video ({n_videos}), "
                f"got {describe(video_second_per_grid)}"
            )

    def _check_token_values(self, input_ids: torch.Tensor, media: dict) -> None:
        """Token ids inside the vocabulary, and no media placeholders without their media (a prompt only)."""
        cfg = self.config
        tokens = {"audio": cfg.audio_token_id, "image": cfg.image_token_id, "video": cfg.video_token_id}
        stats = [input_ids.min(), input_ids.max()] + [(input_ids == tokens[k]).sum() for k in tokens]
        low, high, *counts = torch.stack(stats).tolist()  # one host sync for all of them
        if low < 0 or high >= cfg.text.vocab_size:
            bad = low if low < 0 else high
            raise InputError(f"input_ids: token ids must lie in [0, {cfg.text.vocab_size}), got {bad}")
        inputs = {"audio": "input_features", "image": "pixel_values", "video": "pixel_values_videos"}
        for (kind, n), name in zip(zip(tokens, counts), inputs.values()):
            if n and media[kind] is None:
                raise InputError(
                    f"{name}: the prompt has {n} {kind} placeholder tokens but {name} is None; pass the "
                    f"processor's whole output (model.thinker(**batch))"
                )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        **media,
    ):
        """Text generation (greedy or sampled) for a batch in the processor's format.

        Returns a `TextGeneration` with `.sequences` [B, prompt + new]. Media keywords are those of `forward`.
        """
        from ..generation.sampling import SamplingConfig
        from ..generation.text import generate_text

        sampling = SamplingConfig(do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
        return generate_text(
            self, input_ids, attention_mask, max_new_tokens, sampling, eos_token_id, pad_token_id, generator,
            **media,
        )


def check_token_ids(input_ids, name: str = "input_ids") -> None:
    """`input_ids` must be an integer tensor [batch, time]: what the processor returns."""
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(f"{name}: expected a LongTensor [batch, time], got {describe(input_ids)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"{name}: expected integer token ids (torch.long), got {describe(input_ids)}")
    if input_ids.dim() != 2:
        hint = " (add a batch dimension: input_ids[None])" if input_ids.dim() == 1 else ""
        raise InputError(f"{name}: expected shape [batch, time]{hint}, got {describe(input_ids)}")


def _feature_lengths(input_features: torch.Tensor, feature_attention_mask: torch.Tensor | None) -> torch.Tensor:
    if feature_attention_mask is None:
        return torch.full((input_features.shape[0],), input_features.shape[-1], dtype=torch.long)
    lengths = feature_attention_mask.sum(-1).long()
    # The encoder reads each clip's first `length` frames: the mask must mark exactly those (right padding).
    frames = torch.arange(feature_attention_mask.shape[-1], device=lengths.device)
    if feature_attention_mask.shape != input_features.shape[::2] or not torch.equal(
        feature_attention_mask.bool(), frames < lengths[:, None]
    ):
        raise InputError(
            f"feature_attention_mask: expected [num_audios, frames] = {list(input_features.shape[::2])} marking each "
            f"clip's leading frames (right padding), got {describe(feature_attention_mask)}"
        )
    return lengths


def _refuse_media_with_embeds(**media) -> None:
    """Media are written into the embeddings at the placeholder tokens of `input_ids`; with `inputs_embeds`
    alone there are no ids to find them by, and silently dropping them would give text-only logits."""
    given = [name for name, value in media.items() if value is not None]
    if given:
        raise InputError(
            f"{given[0]}: media need input_ids (their placeholder tokens place the features, the deepstack "
            "additions and the TM-RoPE positions), but inputs_embeds was given; pass input_ids with the media"
        )


def _scatter(embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor, what: str) -> torch.Tensor:
    """Write `features` [n, C] into the n True positions of `mask` [B, T], in reading order."""
    n_tokens = int(mask.sum())
    if n_tokens != features.shape[0]:
        raise InputError(
            f"{what}: the prompt has {n_tokens} {what} placeholder tokens but the {what} encoder produced "
            f"{features.shape[0]} features; the placeholders must be expanded by the processor for these inputs"
        )
    embeds = embeds.clone()
    embeds[mask] = features.to(embeds.dtype)
    return embeds


def _deepstack_hook(visual_mask: torch.Tensor, deepstack: list[torch.Tensor]):
    """After decoder layer i < len(deepstack), add deepstack[i] at the visual positions."""

    def hook(layer: int, x: torch.Tensor) -> torch.Tensor:
        if layer >= len(deepstack):
            return x
        x = x.clone()
        x[visual_mask] = x[visual_mask] + deepstack[layer].to(x.dtype)
        return x

    return hook
