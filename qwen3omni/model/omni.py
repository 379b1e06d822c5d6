"""`Qwen3Omni`: the thinker, the talker and Code2Wav composed, loaded from and saved to the released layout."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..config import Qwen3OmniConfig
from ..errors import InputError, describe
from ..modules.attention import check_backend, set_attention_backend
from .placement import COMPONENTS, resolve_devices
from .thinker import Thinker


def resolve_components(config: Qwen3OmniConfig, components: Iterable[str] | str | None) -> tuple[str, ...]:
    """The parts to build: all available ones by default; an unknown or unavailable name is an error."""
    available = COMPONENTS if config.has_talker else ("thinker",)
    if components is None:
        return available
    if isinstance(components, str):
        components = [components]
    if not isinstance(components, Iterable) or not all(isinstance(c, str) for c in components):
        raise InputError(
            f"components: expected None, a part name or a set of them from {list(COMPONENTS)}, "
            f"got {describe(components)}"
        )
    chosen = set(components)
    unknown = sorted(chosen - set(COMPONENTS))
    if unknown:
        raise InputError(f"components: unknown part(s) {unknown}; expected a subset of {list(COMPONENTS)}")
    absent = sorted(chosen - set(available))
    if absent:
        raise InputError(
            f"components: {absent} requested, but this checkpoint has no speech output (enable_audio_output is "
            f"false); available: {list(available)}"
        )
    return tuple(c for c in COMPONENTS if c in chosen)


class Qwen3Omni(nn.Module):
    """Thinker + Talker + Code2Wav. Any of the last two may be absent (thinker-only checkpoints or loads)."""

    def __init__(self, config: Qwen3OmniConfig, components: Iterable[str] | str | None = None):
        super().__init__()
        if not isinstance(config, Qwen3OmniConfig):
            raise InputError(
                "config: expected a Qwen3OmniConfig (e.g. Qwen3OmniConfig.from_pretrained(path)), "
                f"got {describe(config)}"
            )
        self.config = config
        self.components = resolve_components(config, components)
        self.thinker = Thinker(config.thinker) if "thinker" in self.components else None
        self.talker = None
        self.code2wav = None
        if "talker" in self.components:
            from .talker import Talker

            self.talker = Talker(config.talker)
        if "code2wav" in self.components:
            from .code2wav import Code2Wav

            self.code2wav = Code2Wav(config.code2wav)

    @property
    def has_talker(self) -> bool:
        return self.talker is not None and self.code2wav is not None

    def compile_decoding(self, enable: bool = True, **options) -> None:
        """torch.compile the decode steps of the thinker, the talker and the code predictor (one compiled layer
        step per stack, see `DecoderStack.compile_decode_step`). `generate` and `stream` then decode over static
        caches with those layers, inside their CUDA graphs on a GPU. Opt-in: the first call compiles (tens of
        seconds). `enable=False` goes back to eager layers. On a CPU, `ahead_of_time=True` runs one-token steps
        through an AOTInductor build of each decoder's layer instead (no per-call dynamo overhead; ~10 s to
        build per decoder, batch size and dtype; see `DecoderStack.compile_decode_step`)."""
        if not isinstance(enable, bool):  # "false" or 0 must not mean yes
            raise InputError(f"enable: expected True or False, got {describe(enable)}")
        stacks = [self.thinker.model] if self.thinker is not None else []
        if self.talker is not None:
            stacks += [self.talker.model, self.talker.code_predictor.model]
        for stack in stacks:
            stack.compile_decode_step(enable, **options)

    def set_attention_backend(self, backend: str) -> None:
        """Use `backend` in every attention of the model (the thinker's, talker's and code predictor's decoders,
        Code2Wav's transformer, the audio and vision encoders): "sdpa" (default), "flash" (flash-attn, CUDA
        fp16/bf16; calls it cannot take, such as masked ones, run SDPA) or "eager" (the slow reference)."""
        set_attention_backend(self, backend, "backend")

    # ---- generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Text, and speech unless `return_audio=False`, for a batch in the processor's format.

        Thinker knobs: max_new_tokens, do_sample, temperature, top_k, top_p, min_p, repetition_penalty,
        eos_token_id (default <|im_end|>). Talker knobs: return_audio, speaker ("ethan", "chelsie", "aiden"),
        talker_do_sample, talker_temperature, talker_top_k, talker_top_p, talker_min_p,
        talker_repetition_penalty, talker_max_new_tokens. Code predictor: predictor_do_sample (default: as the
        talker), predictor_temperature, predictor_top_k, predictor_top_p. `generator` seeds all sampling.
        `cuda_graphs` (default: on for CUDA) replays the decode steps from CUDA graphs.
        Returns `GenerationOutput(sequences, audio, codes)`; `audio` is None without speech.
        Rows must be left-padded, as the processor makes them. With speech the prompt must end with
        `<|im_start|>assistant\\n`: a pre-filled answer start would not be spoken, so it is refused.
        """
        from ..generation.pipeline import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    @torch.no_grad()
    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Like `generate` (batch size 1), but yields `StreamEvent(kind, data)` as soon as each piece is ready:
        ("text", new token ids) and ("audio", new 24 kHz samples). Speech starts after the first codec frame;
        later pushes to Code2Wav double in size up to `audio_chunk_frames` (default 8) frames. With both text and
        speech sampled, one `generator` seed gives other draws than in `generate` (which draws all text first),
        though each is reproducible; greedy or single-stage sampling gives `generate`'s text and codes. The
        waveform equals `generate`'s up to 300 frames (24 s) in float32 (in bf16, within its rounding: the two
        decoders add in another order, ~1e-2); past that `generate` decodes in the reference's
        300-frame chunks (dropping 555 samples per seam) while `stream` decodes seamlessly, as
        `model.code2wav(codes)` does."""
        from ..generation.pipeline import stream

        yield from stream(self, input_ids, attention_mask, **kwargs)

    # ---- loading and saving ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: str | torch.device | dict | None = None,
        components: Iterable[str] | str | None = None,
        strict: bool = True,
        progress: bool | None = None,
        attention: str = "sdpa",
    ) -> Qwen3Omni:
        """Build on the meta device, then read each tensor once into its final dtype and device.

        `dtype=None` keeps the dtype recorded in config.json (float32 if none). `device` may map component
        names to devices, e.g. {"thinker": "cuda:0", "talker": "cuda:1", "code2wav": "cuda:1"} (every loaded
        component must be named; see `placement`), and each tensor is read straight onto its component's device.
        `components={"thinker"}` reads only the thinker's tensors (about 10 GB less for the released model).
        `attention` picks the attention backend, see `set_attention_backend`.
        """
        check_backend(attention, "attention")  # before reading tens of GB
        dtype = _as_dtype(dtype)
        config = Qwen3OmniConfig.from_pretrained(path)
        with ckpt.on_meta():
            model = cls(config, components)
        dtype = dtype if dtype is not None else _config_dtype(config)
        ckpt.materialize(model, resolve_devices(device, model.components), dtype)
        ckpt.load_state(model, path, prefixes=[f"{c}." for c in model.components], strict=strict, progress=progress)
        model.set_attention_backend(attention)
        return model.eval()

    def save_pretrained(
        self, out_dir: str | Path, max_shard_size: int | str = "5GB", merge_into: str | Path | None = None
    ) -> None:
        """Write the released layout (sharded safetensors + index + config.json), atomically.

        A thinker-only model saves as a thinker-only checkpoint (enable_audio_output: false), a model with all
        three parts as the full one. The released layout has no other component set, so a model loaded with
        part of the speech side (e.g. components={"thinker", "talker"} for talker training) needs
        `merge_into=checkpoint_dir`: that checkpoint is written instead, with this model's tensors in place of
        its own (e.g. a fine-tuned thinker or talker into the full release; see `training.save_merged`).
        """
        if merge_into is not None:
            from ..training.saving import save_merged

            return save_merged(self, out_dir, merge_into)
        out = saved_config(self, next(self.parameters()).dtype)
        ckpt.save_checkpoint(ckpt.export_state_dict(self), out_dir, out, max_shard_size)


def saved_config(model: Qwen3Omni, dtype: torch.dtype) -> dict:
    """config.json for a checkpoint of what `model` holds: thinker-only or full, the two released layouts.

    Any other component set is refused: a config without the talker would make a reload skip the saved talker
    tensors silently, and one without the thinker (or Code2Wav) describes tensors the folder does not have.
    """
    held = set(model.components)
    if held == {"thinker"}:
        config = model.config.thinker_only()
    elif held == set(COMPONENTS):
        config = model.config
    else:
        raise InputError(
            f"components: a model holding {sorted(held)} cannot be saved on its own; a checkpoint holds either the "
            f"thinker alone or all of {list(COMPONENTS)}. Pass merge_into=<the checkpoint it was loaded from> to "
            "write that checkpoint with this model's tensors in place of its own"
        )
    out = config.to_dict()
    out["dtype"] = str(dtype).removeprefix("torch.")
    return out


def _as_dtype(dtype) -> torch.dtype | None:
    """A torch dtype from a dtype or its name ("bfloat16", "torch.float32"); None stays None."""
    if dtype is None:
        return None
    value = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise InputError(
            f"dtype: expected a floating-point torch.dtype or its name (torch.bfloat16, 'bfloat16'), got {dtype!r}"
        )
    return value


def _config_dtype(config: Qwen3OmniConfig) -> torch.dtype:
    name = config.extra.get("dtype") or config.extra.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
