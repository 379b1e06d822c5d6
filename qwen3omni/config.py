"""Configuration of Qwen3-Omni: one dataclass per component, read from the released `config.json`.

This is the only module that knows the checkpoint's config keys. It accepts both layouts of the released
file (the newer `rope_parameters` and the shipped `rope_scaling` + `rope_theta`), and both spellings of the
expert count (`num_experts`, `num_local_experts`). Values in the file always win over defaults; defaults
are the released checkpoint's values, not transformers' class defaults. A missing or ill-typed required
field raises `ConfigError` naming its full key path, e.g. `thinker_config.text_config.num_experts`.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError, MissingFileError, describe

_NO_DEFAULT = dataclasses.MISSING


def _key(name: str, *aliases: str, default=_NO_DEFAULT, default_factory=_NO_DEFAULT):
    """A dataclass field read from JSON key `name` (or one of `aliases`)."""
    meta = {"key": name, "aliases": aliases}
    if default_factory is not _NO_DEFAULT:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (inner,) = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        k_hint, v_hint = typing.get_args(hint)
        return isinstance(value, dict) and all(_type_ok(k, k_hint) and _type_ok(v, v_hint) for k, v in value.items())
    if isinstance(hint, type) and issubclass(hint, _Section):
        return isinstance(value, hint)
    raise TypeError(f"unsupported config type hint {hint!r}")


def _hint_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


class _Section:
    """Common reading and writing for the config dataclasses."""

    model_type: ClassVar[str | None] = None

    @classmethod
    def _normalise(cls, raw: dict, path: str) -> dict:
        """Hook: rewrite alternative layouts of `raw` into the keys the fields read."""
        return raw

    @classmethod
    def from_dict(cls, raw: dict, path: str = "") -> _Section:
        if not isinstance(raw, dict):
            raise ConfigError(f"{path or 'config'}: expected a JSON object, got {describe(raw)}")
        raw = cls._normalise(dict(raw), path)
        hints = typing.get_type_hints(cls)
        values, consumed = {}, set()
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            names = (f.metadata.get("key", f.name), *f.metadata.get("aliases", ()))
            key = next((n for n in names if n in raw), None)
            full = f"{path}.{names[0]}" if path else names[0]
            if key is None:
                if f.default is _NO_DEFAULT and f.default_factory is _NO_DEFAULT:
                    raise ConfigError(f"{full}: required field is missing (expected {_hint_name(hints[f.name])})")
                continue
            consumed.update(n for n in names if n in raw)
            value = raw[key]
            hint = hints[f.name]
            section = _section_type(hint)
            if section is not None and value is not None:
                value = section.from_dict(value, full)
            if not _type_ok(value, hint):
                raise ConfigError(f"{full}: expected {_hint_name(hint)}, got {describe(value)}")
            if isinstance(value, tuple):
                value = list(value)
            values[f.name] = value
        extra = {k: v for k, v in raw.items() if k not in consumed}
        obj = cls(**values, extra=extra)
        obj._validate(path)
        return obj

    def _validate(self, path: str) -> None:
        """Hook: cross-field checks."""

    def to_dict(self) -> dict:
        out = dict(self.extra)
        if self.model_type is not None:
            out.setdefault("model_type", self.model_type)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.metadata.get("key", f.name)] = value.to_dict() if isinstance(value, _Section) else _plain(value)
        return self._denormalise(out)

    def _denormalise(self, out: dict) -> dict:
        """Hook: write derived keys back in the released (newer) layout."""
        return out


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _section_type(hint):
    for h in (hint, *typing.get_args(hint)):
        if isinstance(h, type) and issubclass(h, _Section):
            return h
    return None


def _read_rope(raw: dict, path: str, sectioned: bool) -> dict:
    """Fold `rope_parameters` (newer layout) or `rope_scaling` + `rope_theta` (shipped layout) into flat keys."""
    params = raw.pop("rope_parameters", None)
    scaling = raw.pop("rope_scaling", None)
    theta = raw.pop("rope_theta", None)
    for name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{path}.{name}: expected a JSON object, got {describe(value)}")
    merged = {**(scaling or {}), **(params or {})}
    if theta is not None:
        merged.setdefault("rope_theta", theta)
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in ("default", "axial"):
        raise ConfigError(f"{path}.rope_parameters.rope_type: expected 'default', got {rope_type!r}")
    if "rope_theta" in merged:
        raw["rope_theta"] = merged["rope_theta"]
    if sectioned:
        if "mrope_section" in merged:
            raw["mrope_section"] = merged["mrope_section"]
        flag = merged.get("interleaved", merged.get("mrope_interleaved"))
        if flag is not None:
            raw["mrope_interleaved"] = flag
    return raw


def _write_rope(out: dict, sectioned: bool) -> dict:
    params = {"rope_type": "default", "rope_theta": out.pop("rope_theta")}
    if sectioned:
        params["mrope_section"] = out.pop("mrope_section")
        params["interleaved"] = params["mrope_interleaved"] = out.pop("mrope_interleaved")
    out["rope_parameters"] = params
    return out


def _check_heads(cfg, path: str, hidden: int, heads: int, kv_heads: int | None = None) -> None:
    if heads <= 0 or hidden <= 0:
        raise ConfigError(f"{path}: hidden size and head count must be positive, got {hidden} and {heads}")
    if kv_heads is not None and (kv_heads <= 0 or heads % kv_heads):
        raise ConfigError(
            f"{path}.num_key_value_heads: must divide num_attention_heads={heads}, got {kv_heads}"
        )


@dataclass
class AudioEncoderConfig(_Section):
    """AuT audio encoder (`thinker.audio_tower`)."""

    model_type: ClassVar[str] = "qwen3_omni_moe_audio_encoder"
    d_model: int = _key("d_model")
    encoder_layers: int = _key("encoder_layers")
    encoder_attention_heads: int = _key("encoder_attention_heads")
    encoder_ffn_dim: int = _key("encoder_ffn_dim")
    output_dim: int = _key("output_dim")
    downsample_hidden_size: int = _key("downsample_hidden_size")
    num_mel_bins: int = _key("num_mel_bins", default=128)
    n_window: int = _key("n_window", default=50)
    n_window_infer: int = _key("n_window_infer", default=800)
    conv_chunksize: int = _key("conv_chunksize", default=500)
    max_source_positions: int = _key("max_source_positions", default=1500)
    activation_function: str = _key("activation_function", default="gelu")
    scale_embedding: bool = _key("scale_embedding", default=False)
    extra: dict = field(default_factory=dict, repr=False)

    def _validate(self, path):
        _check_heads(self, path, self.d_model, self.encoder_attention_heads)
        if self.d_model % self.encoder_attention_heads:
            raise ConfigError(f"{path}.encoder_attention_heads: must divide d_model={self.d_model}")
        if self.n_window < 1:  # the window length divides n_window_infer below and the mel frames later
            raise ConfigError(f"{path}.n_window: must be >= 1, got {self.n_window}")
        if self.n_window_infer % (2 * self.n_window):
            raise ConfigError(
                f"{path}.n_window_infer: must be a multiple of 2 * n_window = {2 * self.n_window}, "
                f"got {self.n_window_infer}"
            )


@dataclass
class VisionEncoderConfig(_Section):
    """SigLIP2-style vision encoder with deepstack mergers (`thinker.visual`)."""

    model_type: ClassVar[str] = "qwen3_omni_moe_vision_encoder"
    depth: int = _key("depth", "num_hidden_layers")
    hidden_size: int = _key("hidden_size")
    intermediate_size: int = _key("intermediate_size")
    num_heads: int = _key("num_heads", "num_attention_heads")
    out_hidden_size: int = _key("out_hidden_size")
    num_position_embeddings: int = _key("num_position_embeddings", default=2304)
    deepstack_visual_indexes: list[int] = _key("deepstack_visual_indexes", default_factory=lambda: [8, 16, 24])
    patch_size: int = _key("patch_size", default=16)
    temporal_patch_size: int = _key("temporal_patch_size", default=2)
    spatial_merge_size: int = _key("spatial_merge_size", default=2)
    in_channels: int = _key("in_channels", default=3)
    hidden_act: str = _key("hidden_act", default="gelu_pytorch_tanh")
    rope_theta: float = _key("rope_theta", default=10000.0)
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def _normalise(cls, raw, path):
        return _read_rope(raw, path, sectioned=False)

    def _validate(self, path):
        _check_heads(self, path, self.hidden_size, self.num_heads)
        if self.hidden_size % self.num_heads:  # head_dim = hidden_size // num_heads must be exact
            raise ConfigError(f"{path}.num_heads: must divide hidden_size={self.hidden_size}, got {self.num_heads}")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"{path}.deepstack_visual_indexes: layers {bad} are outside 0..{self.depth - 1}")

    def _denormalise(self, out):
        out.pop("rope_theta")  # the released file leaves the vision rope implicit
        return out

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class MoeDecoderConfig(_Section):
    """A Qwen3-MoE style decoder: the thinker's text model and the talker's decoder share this layout."""

    vocab_size: int = _key("vocab_size")
    hidden_size: int = _key("hidden_size")
    num_hidden_layers: int = _key("num_hidden_layers")
    num_attention_heads: int = _key("num_attention_heads")
    num_key_value_heads: int = _key("num_key_value_heads")
    num_experts: int = _key("num_experts", "num_local_experts")
    num_experts_per_tok: int = _key("num_experts_per_tok")
    moe_intermediate_size: int = _key("moe_intermediate_size")
    intermediate_size: int = _key("intermediate_size")
    rope_theta: float = _key("rope_theta")
    head_dim: int | None = _key("head_dim", default=None)
    mrope_section: list[int] = _key("mrope_section", default_factory=lambda: [24, 20, 20])
    mrope_interleaved: bool = _key("mrope_interleaved", default=True)
    norm_topk_prob: bool = _key("norm_topk_prob", default=True)
    shared_expert_intermediate_size: int = _key("shared_expert_intermediate_size", default=0)
    decoder_sparse_step: int = _key("decoder_sparse_step", default=1)
    mlp_only_layers: list[int] = _key("mlp_only_layers", default_factory=list)
    max_position_embeddings: int = _key("max_position_embeddings", default=65536)
    rms_norm_eps: float = _key("rms_norm_eps", default=1e-6)
    attention_bias: bool = _key("attention_bias", default=False)
    hidden_act: str = _key("hidden_act", default="silu")
    router_aux_loss_coef: float = _key("router_aux_loss_coef", default=0.001)
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def _normalise(cls, raw, path):
        if raw.get("mlp_only_layers", 0) is None:
            raw["mlp_only_layers"] = []
        return _read_rope(raw, path, sectioned=True)

    def __post_init__(self):
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def _validate(self, path):
        _check_heads(self, path, self.hidden_size, self.num_attention_heads, self.num_key_value_heads)
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ConfigError(
                f"{path}.rope_parameters.mrope_section: sections {self.mrope_section} must sum to head_dim/2 = "
                f"{self.head_dim // 2}"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"{path}.num_experts_per_tok: expected 1..{self.num_experts}, got {self.num_experts_per_tok}"
            )

    def _denormalise(self, out):
        return _write_rope(out, sectioned=True)

    def is_moe_layer(self, layer: int) -> bool:
        """The reference's rule: experts in every `decoder_sparse_step`-th layer unless listed as dense."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )


@dataclass
class ThinkerTextConfig(MoeDecoderConfig):
    """The thinker's 48-layer MoE text decoder (`thinker.model`, `thinker.lm_head`)."""

    model_type: ClassVar[str] = "qwen3_omni_moe_text"


@dataclass
class TalkerTextConfig(MoeDecoderConfig):
    """The talker's MoE decoder with a gated shared expert (`talker.model`)."""

    model_type: ClassVar[str] = "qwen3_omni_moe_talker_text"
    norm_topk_prob: bool = _key("norm_topk_prob", default=False)

    def _denormalise(self, out):
        out = super()._denormalise(out)
        out["num_local_experts"] = out.pop("num_experts")  # the released file's spelling for the talker
        return out


@dataclass
class CodePredictorConfig(_Section):
    """The multi-token-prediction code predictor (`talker.code_predictor`): a small dense decoder."""

    model_type: ClassVar[str] = "qwen3_omni_moe_talker_code_predictor"
    vocab_size: int = _key("vocab_size")
    hidden_size: int = _key("hidden_size")
    intermediate_size: int = _key("intermediate_size")
    num_hidden_layers: int = _key("num_hidden_layers")
    num_attention_heads: int = _key("num_attention_heads")
    num_key_value_heads: int = _key("num_key_value_heads")
    rope_theta: float = _key("rope_theta")
    num_code_groups: int = _key("num_code_groups", default=16)
    head_dim: int | None = _key("head_dim", default=None)
    max_position_embeddings: int = _key("max_position_embeddings", default=32768)
    rms_norm_eps: float = _key("rms_norm_eps", default=1e-6)
    attention_bias: bool = _key("attention_bias", default=False)
    hidden_act: str = _key("hidden_act", default="silu")
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def _normalise(cls, raw, path):
        if raw.get("sliding_window") is not None and raw.get("use_sliding_window"):
            raise ConfigError(f"{path}.use_sliding_window: sliding attention in the code predictor is not supported")
        return _read_rope(raw, path, sectioned=False)

    def __post_init__(self):
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def _validate(self, path):
        _check_heads(self, path, self.hidden_size, self.num_attention_heads, self.num_key_value_heads)

    def _denormalise(self, out):
        return _write_rope(out, sectioned=False)


@dataclass
class Code2WavConfig(_Section):
    """The causal ConvNet vocoder (`code2wav`): codes of 16 quantizers to a 24 kHz waveform."""

    model_type: ClassVar[str | None] = None
    hidden_size: int = _key("hidden_size")
    num_hidden_layers: int = _key("num_hidden_layers")
    num_attention_heads: int = _key("num_attention_heads")
    num_key_value_heads: int = _key("num_key_value_heads")
    intermediate_size: int = _key("intermediate_size")
    decoder_dim: int = _key("decoder_dim")
    rope_theta: float = _key("rope_theta", default=10000.0)
    codebook_size: int = _key("codebook_size", default=2048)
    num_quantizers: int = _key("num_quantizers", default=16)
    sliding_window: int = _key("sliding_window", default=72)
    upsample_rates: list[int] = _key("upsample_rates", default_factory=lambda: [8, 5, 4, 3])
    upsampling_ratios: list[int] = _key("upsampling_ratios", default_factory=lambda: [2, 2])
    layer_scale_initial_scale: float = _key("layer_scale_initial_scale", default=0.01)
    rms_norm_eps: float = _key("rms_norm_eps", default=1e-5)
    attention_bias: bool = _key("attention_bias", default=False)
    hidden_act: str = _key("hidden_act", default="silu")
    max_position_embeddings: int = _key("max_position_embeddings", default=8000)
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def _normalise(cls, raw, path):
        return _read_rope(raw, path, sectioned=False)

    def _validate(self, path):
        _check_heads(self, path, self.hidden_size, self.num_attention_heads, self.num_key_value_heads)
        if self.hidden_size % self.num_attention_heads:  # head_dim is derived, so it must divide exactly
            raise ConfigError(
                f"{path}.num_attention_heads: must divide hidden_size={self.hidden_size}, "
                f"got {self.num_attention_heads}"
            )
        if self.decoder_dim % 2 ** len(self.upsample_rates):
            raise ConfigError(f"{path}.decoder_dim: must be divisible by 2**len(upsample_rates)")

    def _denormalise(self, out):
        return _write_rope(out, sectioned=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def samples_per_frame(self) -> int:
        """Waveform samples per codec frame (1920 at 24 kHz for the released model: 12.5 frames/s)."""
        n = 1
        for r in (*self.upsampling_ratios, *self.upsample_rates):
            n *= r
        return n


@dataclass
class ThinkerConfig(_Section):
    """The thinker: audio encoder, vision encoder and MoE text decoder, plus its placeholder token ids."""

    model_type: ClassVar[str] = "qwen3_omni_moe_thinker"
    audio: AudioEncoderConfig = _key("audio_config")
    vision: VisionEncoderConfig = _key("vision_config")
    text: ThinkerTextConfig = _key("text_config")
    audio_token_id: int = _key("audio_token_id", default=151675)
    image_token_id: int = _key("image_token_id", default=151655)
    video_token_id: int = _key("video_token_id", default=151656)
    audio_start_token_id: int = _key("audio_start_token_id", default=151669)
    audio_end_token_id: int = _key("audio_end_token_id", default=151670)
    vision_start_token_id: int = _key("vision_start_token_id", default=151652)
    vision_end_token_id: int = _key("vision_end_token_id", default=151653)
    user_token_id: int = _key("user_token_id", default=872)
    position_id_per_seconds: float = _key("position_id_per_seconds", default=13)
    seconds_per_chunk: float = _key("seconds_per_chunk", default=2)
    extra: dict = field(default_factory=dict, repr=False)

    def _validate(self, path):
        if self.audio.output_dim != self.text.hidden_size:
            raise ConfigError(
                f"{path}.audio_config.output_dim: must equal text_config.hidden_size={self.text.hidden_size}, "
                f"got {self.audio.output_dim}"
            )
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"{path}.vision_config.out_hidden_size: must equal text_config.hidden_size="
                f"{self.text.hidden_size}, got {self.vision.out_hidden_size}"
            )


@dataclass
class TalkerConfig(_Section):
    """The talker (MoE decoder + code predictor) and its codec control ids."""

    model_type: ClassVar[str | None] = None
    text: TalkerTextConfig = _key("text_config")
    code_predictor: CodePredictorConfig = _key("code_predictor_config")
    thinker_hidden_size: int = _key("thinker_hidden_size")
    accept_hidden_layer: int = _key("accept_hidden_layer", default=24)
    num_code_groups: int = _key("num_code_groups", default=16)
    codec_bos_id: int = _key("codec_bos_id", default=2149)
    codec_eos_token_id: int = _key("codec_eos_token_id", default=2150)
    codec_pad_id: int = _key("codec_pad_id", default=2148)
    codec_nothink_id: int = _key("codec_nothink_id", default=2155)
    codec_think_bos_id: int = _key("codec_think_bos_id", default=2156)
    codec_think_eos_id: int = _key("codec_think_eos_id", default=2157)
    speaker_id: dict[str, int] = _key(
        "speaker_id", default_factory=lambda: {"chelsie": 2301, "ethan": 2302, "aiden": 2303}
    )
    audio_token_id: int = _key("audio_token_id", default=151675)
    image_token_id: int = _key("image_token_id", default=151655)
    video_token_id: int = _key("video_token_id", default=151656)
    audio_start_token_id: int = _key("audio_start_token_id", default=151669)
    vision_start_token_id: int = _key("vision_start_token_id", default=151652)
    position_id_per_seconds: float = _key("position_id_per_seconds", default=13)
    seconds_per_chunk: float = _key("seconds_per_chunk", default=2)
    spatial_merge_size: int = _key("spatial_merge_size", default=2)
    extra: dict = field(default_factory=dict, repr=False)

    def _validate(self, path):
        if self.code_predictor.num_code_groups != self.num_code_groups:
            raise ConfigError(
                f"{path}.code_predictor_config.num_code_groups: must equal num_code_groups={self.num_code_groups}, "
                f"got {self.code_predictor.num_code_groups}"
            )


@dataclass
class Qwen3OmniConfig(_Section):
    """The whole model. `talker` and `code2wav` are None for thinker-only checkpoints (Thinking, Captioner)."""

    model_type: ClassVar[str] = "qwen3_omni_moe"
    thinker: ThinkerConfig = _key("thinker_config")
    talker: TalkerConfig | None = _key("talker_config", default=None)
    code2wav: Code2WavConfig | None = _key("code2wav_config", default=None)
    enable_audio_output: bool = _key("enable_audio_output", default=True)
    im_start_token_id: int = _key("im_start_token_id", default=151644)
    im_end_token_id: int = _key("im_end_token_id", default=151645)
    system_token_id: int = _key("system_token_id", default=8948)
    user_token_id: int = _key("user_token_id", default=872)
    assistant_token_id: int = _key("assistant_token_id", default=77091)
    tts_pad_token_id: int = _key("tts_pad_token_id", default=151671)
    tts_bos_token_id: int = _key("tts_bos_token_id", default=151672)
    tts_eos_token_id: int = _key("tts_eos_token_id", default=151673)
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def _normalise(cls, raw, path):
        if not raw.get("enable_audio_output", True):
            # Thinking / Captioner checkpoints: a stray talker section would describe weights that are not there.
            raw.pop("talker_config", None)
            raw.pop("code2wav_config", None)
        return raw

    def _validate(self, path):
        if self.enable_audio_output:
            for name, part in (("talker_config", self.talker), ("code2wav_config", self.code2wav)):
                if part is None:
                    raise ConfigError(f"{name}: required when enable_audio_output is true, but it is missing")
            if self.talker.thinker_hidden_size != self.thinker.text.hidden_size:
                raise ConfigError(
                    f"talker_config.thinker_hidden_size: must equal the thinker's hidden size "
                    f"{self.thinker.text.hidden_size}, got {self.talker.thinker_hidden_size}"
                )
            layers = self.thinker.text.num_hidden_layers
            if not 0 <= self.talker.accept_hidden_layer <= layers:
                raise ConfigError(
                    f"talker_config.accept_hidden_layer: expected 0..{layers}, got {self.talker.accept_hidden_layer}"
                )

    def _denormalise(self, out):
        if out.get("talker_config") is None:
            out.pop("talker_config", None)
        if out.get("code2wav_config") is None:
            out.pop("code2wav_config", None)
        out.setdefault("architectures", ["Qwen3OmniMoeForConditionalGeneration"])
        return out

    @property
    def has_talker(self) -> bool:
        return self.enable_audio_output and self.talker is not None and self.code2wav is not None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Qwen3OmniConfig:
        """Read a checkpoint folder (its `config.json`) or a `.json` file."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            where = f"folder {str(path)!r} has no config.json" if path.is_dir() else f"{str(path)!r} does not exist"
            raise MissingFileError(f"Qwen3OmniConfig.from_pretrained(path): {where}")
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:  # e.g. a safetensors file or a Latin-1 file passed as the config
            raise ConfigError(f"{file}: expected a UTF-8 JSON config file, got undecodable bytes ({e.reason} at "
                              f"byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        return cls.from_dict(raw)

    def save(self, file: str | Path) -> None:
        Path(file).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def thinker_only(self) -> Qwen3OmniConfig:
        """This config with audio output off: what a thinker-only checkpoint's config.json says."""
        return dataclasses.replace(self, talker=None, code2wav=None, enable_audio_output=False)
