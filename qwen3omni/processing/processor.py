"""`Processor`: conversations (or rendered prompts plus media) into the thinker's input tensors.

The output matches transformers' `Qwen3OmniMoeProcessor` key for key: `input_ids`, `attention_mask` (left
padded), and when present `input_features`, `feature_attention_mask`, `pixel_values`, `image_grid_thw`,
`pixel_values_videos`, `video_grid_thw`, `video_second_per_grid`. When a video's audio track was interleaved
with it, `use_audio_in_video=True` is added: the position ids of that layout differ, and transformers' model
takes the flag as an argument of the same name.

`video_second_per_grid` is temporal_patch_size / fps, where fps is the rate of the frames the model sees.
Frame lists are taken to be at the requested fps (default 2). Video files are sampled at it, and then it is
the rate too, except where `min_frames`, `max_frames` or the file's own length set the number of frames
kept (a file slower than fps, a clip shorter than 2 s, one longer than 384 s): there the rate of the frames
actually kept is used (`video.kept_frame_rate`), as Qwen's qwen-omni-utils does, since the model's time
positions and the audio interleaving must follow the real timestamps. transformers' processor always uses
the requested fps, and falls back to fps = 1 when none is passed, even for frames sampled at 2 fps; pass
`videos_kwargs={"fps": 2.0}` to it to compare (it agrees with us wherever the count follows duration * fps).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, InputError, MissingFileError, describe, expect_device
from ..model.positions import audio_token_count
from .audio import MelSettings, load_audio, log_mel_features, positive_rate
from .chat import compile_template, media_items, normalize_conversations, render_builtin, render_template
from .placeholders import (
    SpecialTokens,
    check_media_counts,
    expand_placeholders,
    interleaved_video_audio,
    placeholder_kinds,
)
from .video import FrameSampling, read_audio_track, read_video_with_rate
from .vision import VIDEO_SETTINGS, VisionSettings, frames_to_tensor, process_images, video_patches


@dataclass(frozen=True)
class ProcessorSettings:
    """Everything besides the tokenizer and template; the released checkpoint's values are the defaults."""

    mel: MelSettings = MelSettings()
    image: VisionSettings = VisionSettings()
    video: VisionSettings = VIDEO_SETTINGS
    sampling: FrameSampling = FrameSampling()
    n_window: int = 50
    position_id_per_seconds: float = 13.0
    tokens: SpecialTokens = field(default_factory=SpecialTokens)


@dataclass
class _Video:
    frames: torch.Tensor  # uint8 [T, 3, H, W]
    fps: float  # the rate of `frames`
    name: str  # the video as the user gave it, for error messages
    track: torch.Tensor | None = None  # mono 16 kHz, when its audio is used


class Processor:
    """Tokenizer, chat template and audio / image / video preprocessing of Qwen3-Omni.

    `processor(conversations)` takes one conversation or a list of them and returns the model's inputs;
    `processor.process(text=..., images=..., videos=..., audio=...)` takes already rendered prompts.
    """

    def __init__(self, tokenizer, chat_template: str | None = None, settings: ProcessorSettings | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.settings = settings or ProcessorSettings(tokens=SpecialTokens.from_tokenizer(tokenizer))
        self._template = compile_template(chat_template) if chat_template else None

    # -------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(cls, path) -> Processor:
        """Load from a checkpoint folder: tokenizer files, chat template, `preprocessor_config.json`.

        The template comes from `chat_template.jinja`, `chat_template.json` or the tokenizer config, else the
        built-in one. A `config.json` beside them supplies the audio window and the video time scale.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise MissingFileError(f"Processor.from_pretrained(path): {str(folder)!r} is not a folder")
        tokenizer = _load_tokenizer(folder)
        settings = _read_settings(folder, SpecialTokens.from_tokenizer(tokenizer))
        _check_token_ids(folder, tokenizer, settings.tokens)
        return cls(tokenizer, _read_template(folder, tokenizer), settings)

    # -------------------------------------------------------------------------------------------------------
    # Conversations

    def apply_chat_template(self, conversations, add_generation_prompt: bool = True, **template_kwargs):
        """The rendered prompt of one conversation (a string) or of a batch (a list of strings)."""
        checked, batched = normalize_conversations(conversations)
        texts = [self._render(conv, add_generation_prompt, template_kwargs) for conv in checked]
        return texts if batched else texts[0]

    def _render(self, conversation, add_generation_prompt, template_kwargs) -> str:
        if self._template is None:
            return render_builtin(conversation, add_generation_prompt)
        specials = dict(getattr(self.tokenizer, "special_tokens_map", {}) or {})
        return render_template(self._template, conversation, add_generation_prompt, **{**specials, **template_kwargs})

    def __call__(self, conversations, use_audio_in_video: bool = False, add_generation_prompt: bool = True,
                 fps: float | None = None, device=None, **template_kwargs) -> dict:
        """Model inputs for one conversation or a batch (rows left padded).

        `use_audio_in_video` interleaves each video's audio track with its frames. `fps` is the frame rate the
        model sees for videos without their own "fps" (files are sampled at it; default 2). With `device`,
        the features are computed there and every tensor is returned there.
        """
        checked, _ = normalize_conversations(conversations)
        texts = [self._render(conv, add_generation_prompt, template_kwargs) for conv in checked]
        items = [item for c, conv in enumerate(checked) for item in media_items(conv, c)]
        audio = [i for i in items if i.kind == "audio"]
        waves = [load_audio(i.value, i.options.get("sampling_rate"), target_rate=self.settings.mel.sampling_rate,
                            name=i.name) for i in audio]
        images = [i for i in items if i.kind == "image"]
        videos = [i for i in items if i.kind == "video"]
        return self._process(
            texts, [i.value for i in images], [i.value for i in videos], waves, use_audio_in_video,
            video_fps=[i.options.get("fps", fps) for i in videos], device=device,
            names={kind: [i.name for i in group] for kind, group in
                   (("image", images), ("video", videos), ("audio", audio))},
        )

    # -------------------------------------------------------------------------------------------------------
    # Rendered prompts plus media

    def process(self, text: str | Sequence[str], images: Sequence | None = None, videos: Sequence | None = None,
                audio: Sequence | None = None, use_audio_in_video: bool = False, fps=None,
                video_audio: Sequence | None = None, device=None) -> dict:
        """Model inputs from rendered prompts and flat lists of media in placeholder order.

        `audio` items are anything `load_audio` takes (arrays are taken to be at 16 kHz), `images` anything
        `load_image` takes, `videos` file paths, `[T, H, W, C]` arrays or lists of frames. `fps` (one value or
        one per video) is the frame rate the model sees. With `use_audio_in_video`, each video's track comes
        from `video_audio` (one entry per video, None for none) or else is decoded from the file.
        """
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else []
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError(f"text: expected a string or a non-empty list of strings, got {describe(text)}")
        rate = self.settings.mel.sampling_rate
        waves = [load_audio(a, target_rate=rate, name=f"audio[{i}]") for i, a in enumerate(_media_list(audio, "audio"))]
        images = _media_list(images, "images")
        videos = _media_list(videos, "videos")
        fps_list = list(fps) if isinstance(fps, (list, tuple)) else [fps] * len(videos)
        if len(fps_list) != len(videos):
            raise InputError(f"fps: expected one value or one per video ({len(videos)}), got {len(fps_list)}")
        return self._process(texts, images, videos, waves, use_audio_in_video, fps_list,
                             video_audio=video_audio, device=device)

    def _process(self, texts, images, videos, waves, use_audio_in_video, video_fps, video_audio=None,
                 device=None, names=None) -> dict:
        device = None if device is None else expect_device(device, "device")
        names = names or {}
        tokens = self.settings.tokens
        check_media_counts(texts, tokens, {"image": len(images), "video": len(videos), "audio": len(waves)})
        out, replacements = {}, {}
        if images:
            replacements["image"] = self._add_images(out, images, names.get("image"))
        video_names = names.get("video") or [f"videos[{i}]" for i in range(len(videos))]
        tracks = _media_list(video_audio, "video_audio") if video_audio is not None else [None] * len(videos)
        if len(tracks) != len(videos):
            raise InputError(f"video_audio: expected one entry per video ({len(videos)}), got {len(tracks)}")
        clips = [self._load_video(v, video_fps[i], video_names[i], use_audio_in_video, tracks[i], device)
                 for i, v in enumerate(videos)]
        audio_names = names.get("audio") or [f"audio[{i}]" for i in range(len(waves))]
        slots = _audio_slots(texts, tokens, list(zip(waves, audio_names)), clips)
        standalone_tokens, track_tokens = self._add_audio(out, slots, device)
        if clips:
            replacements["video"] = self._add_videos(out, clips, track_tokens)
        if waves:
            replacements["audio"] = [tokens.audio * n for n in standalone_tokens]
        batch = self._tokenize(expand_placeholders(texts, tokens, replacements))
        batch.update(out)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        if any(clip.track is not None for clip in clips):
            batch["use_audio_in_video"] = True
        return batch

    def _add_images(self, out, images, names) -> list[str]:
        pixels, grid = process_images(images, self.settings.image, names)
        out["pixel_values"], out["image_grid_thw"] = pixels, grid
        per_image = grid.prod(dim=-1) // self.settings.image.merge_size**2
        return [self.settings.tokens.image * int(n) for n in per_image]

    def _load_video(self, value, fps, name, use_audio, track, device) -> _Video:
        sampling = self.settings.sampling
        fps = positive_rate(sampling.fps if fps is None else fps, name, "fps", "frames per second")
        is_file = isinstance(value, (str, Path))
        if is_file:  # the kept frames' own rate, which differs from fps where a frame count limit applied
            frames, fps = read_video_with_rate(value, FrameSampling(fps, sampling.min_frames, sampling.max_frames,
                                                                    self.settings.video.temporal_patch_size), name)
        else:
            frames = frames_to_tensor(value, name)
        if device is not None:
            frames = frames.to(device)
        if use_audio and track is None and is_file:
            track = read_audio_track(value, self.settings.mel.sampling_rate, name)
        elif use_audio and track is not None:
            track = load_audio(track, target_rate=self.settings.mel.sampling_rate, name=f"{name} (audio track)")
        return _Video(frames, fps, name, track if use_audio else None)

    def _add_audio(self, out, slots: list[_AudioSlot], device) -> tuple[list[int], list[int]]:
        """Features of every audio in slot order; returns the token counts of standalone audio and of tracks."""
        if not slots:
            return [], []
        features, mask = log_mel_features([slot.wave for slot in slots], self.settings.mel, device,
                                          names=[slot.name for slot in slots])
        out["input_features"], out["feature_attention_mask"] = features, mask
        counts = audio_token_count(mask.sum(-1), self.settings.n_window).tolist()
        standalone = [n for n, slot in zip(counts, slots) if not slot.is_track]
        return standalone, [n for n, slot in zip(counts, slots) if slot.is_track]

    def _add_videos(self, out, clips: list[_Video], track_tokens: list[int]) -> list[str]:
        s, tokens = self.settings, self.settings.tokens
        rows, grids = zip(*(video_patches(clip.frames, s.video) for clip in clips))
        out["pixel_values_videos"] = torch.cat(rows)
        out["video_grid_thw"] = torch.tensor(grids, dtype=torch.int64)
        seconds = [s.video.temporal_patch_size / clip.fps for clip in clips]
        out["video_second_per_grid"] = torch.tensor(seconds, dtype=torch.float32)
        track_tokens = iter(track_tokens)
        replacements = []
        for clip, grid, spg in zip(clips, grids, seconds):
            if clip.track is None:
                replacements.append(tokens.video * (grid[0] * grid[1] * grid[2] // s.video.merge_size**2))
            else:
                replacements.append(interleaved_video_audio(grid, s.video.merge_size, spg,
                                                            s.position_id_per_seconds, next(track_tokens), tokens))
        return replacements

    def _tokenize(self, texts: list[str]) -> dict:
        ids = self.tokenizer(texts)["input_ids"]
        self._check_atomic(texts, ids)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.int64)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.int64)
        for r, row in enumerate(ids):  # left padding: generation continues right after each prompt
            if row:
                input_ids[r, width - len(row):] = torch.tensor(row, dtype=torch.int64)
                attention_mask[r, width - len(row):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _check_atomic(self, texts, ids) -> None:
        tokens = self.settings.tokens
        for kind in ("image", "video", "audio"):
            token = getattr(tokens, kind)
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            expected = sum(t.count(token) for t in texts)
            got = sum(row.count(token_id) for row in ids)
            if expected != got:
                raise ConfigError(
                    f"tokenizer: {token} must be one special token (id {token_id}), but {expected} placeholders "
                    f"became {got} such tokens; the tokenizer does not match this processor"
                )

    # -------------------------------------------------------------------------------------------------------
    # Decoding

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        return self.tokenizer.decode(_as_list(token_ids), skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(_as_list(sequences), skip_special_tokens=skip_special_tokens, **kwargs)


def _media_list(items, name: str) -> list:
    """`items` (a list or tuple, or None for none) as a list; anything else is refused rather than iterated,
    since iterating an array would silently split one medium into many."""
    if items is None:
        return []
    if not isinstance(items, (list, tuple)):
        raise InputError(f"{name}: expected a list with one entry per placeholder, in order, got {describe(items)}")
    return list(items)


def _as_list(ids):
    return ids.tolist() if isinstance(ids, torch.Tensor) else ids


@dataclass(frozen=True)
class _AudioSlot:
    wave: torch.Tensor
    name: str  # the audio (or the video of a track) as the user gave it, for error messages
    is_track: bool


def _audio_slots(texts, tokens, named_waves, clips: list[_Video]) -> list[_AudioSlot]:
    """Every waveform in order of appearance: a standalone audio per audio placeholder, a video's track (if
    used) at its video placeholder. `named_waves` are (waveform, name) pairs of the standalone audio."""
    standalone, videos = iter(named_waves), iter(clips)
    slots = []
    for text in texts:
        for kind in placeholder_kinds(text, tokens):
            if kind == "audio":
                slots.append(_AudioSlot(*next(standalone), is_track=False))
            elif kind == "video" and (clip := next(videos)).track is not None:
                slots.append(_AudioSlot(clip.track, f"{clip.name} (audio track)", is_track=True))
    return slots


# ---------------------------------------------------------------------------------------------------------------
# Reading a checkpoint folder


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise MissingFileError(f"Processor.from_pretrained: {str(folder)!r} has no tokenizer files "
                               f"(tokenizer.json or vocab.json + merges.txt, with tokenizer_config.json)")
    try:
        # A local folder only, and never code from it: a tokenizer_config.json naming a class in the folder's own
        # .py files (auto_map) falls back to the library's tokenizer instead of importing that file.
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"Processor.from_pretrained: cannot load the tokenizer in {str(folder)!r}: {e}") from None


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object, got {describe(data)}")
    return data


def _read_template(folder: Path, tokenizer) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        template = _read_json(folder / "chat_template.json").get("chat_template")
        if not isinstance(template, str):
            raise ConfigError(f"{folder / 'chat_template.json'}: 'chat_template' must be a string")
        return template
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


# Where transformers looks for each part's settings when a folder has no processor_config.json section for it.
_FLAT_FILES = {
    "feature_extractor": ("preprocessor_config.json",),
    "image_processor": ("preprocessor_config.json",),
    "video_processor": ("video_preprocessor_config.json", "preprocessor_config.json"),
}


def _preprocessor_sections(folder: Path) -> dict[str, dict]:
    """The settings of each part (feature_extractor, image_processor, video_processor), each on its own.

    As transformers loads them: the part's section of `processor_config.json` (the nested layout
    `save_pretrained` writes), else the first flat file that exists (the released folders ship one combined
    `preprocessor_config.json`). Parts are never merged: transformers copies the combined file's keys into
    every section it saves, so a stale `min_pixels` in the feature_extractor section must not reach images.
    """
    nested = _read_json(folder / "processor_config.json") if (folder / "processor_config.json").is_file() else {}
    flat = {name: _read_json(folder / name) for name in {n for names in _FLAT_FILES.values() for n in names}
            if (folder / name).is_file()}
    sections = {}
    for part, files in _FLAT_FILES.items():
        section = nested.get(part)
        if not isinstance(section, dict):
            section = next((flat[name] for name in files if name in flat), {})
        sections[part] = section
    return sections


def _pixel_budget(raw: dict, default: VisionSettings) -> tuple[int, int]:
    """(min_pixels, max_pixels) as transformers' Qwen2-VL image processor reads them: `min_pixels` /
    `max_pixels` keys (the released flat layout) win over `size` (what `save_pretrained` writes)."""
    size = raw.get("size") or {}
    low = raw.get("min_pixels") if raw.get("min_pixels") is not None else size.get("shortest_edge")
    high = raw.get("max_pixels") if raw.get("max_pixels") is not None else size.get("longest_edge")
    return int(default.min_pixels if low is None else low), int(default.max_pixels if high is None else high)


def _vision_settings(raw: dict, default: VisionSettings, budget: tuple[int, int]) -> VisionSettings:
    geometry = {k: int(raw[k]) for k in ("patch_size", "temporal_patch_size", "merge_size") if k in raw}
    return VisionSettings(
        **geometry, min_pixels=budget[0], max_pixels=budget[1],
        image_mean=tuple(raw.get("image_mean", default.image_mean)),
        image_std=tuple(raw.get("image_std", default.image_std)),
        resample=int(raw.get("resample", default.resample)),
    )


def _mel_settings(raw: dict, folder: Path) -> MelSettings:
    if raw.get("dither", 0.0):
        raise ConfigError(f"{folder}: preprocessor 'dither' = {raw['dither']} adds random noise to the "
                          f"features; only 0.0 (the released value) is supported")
    return MelSettings(
        n_mels=int(raw.get("feature_size", 128)), n_fft=int(raw.get("n_fft", 400)),
        hop_length=int(raw.get("hop_length", 160)), sampling_rate=int(raw.get("sampling_rate", 16000)),
        padding_value=float(raw.get("padding_value", 0.0)),
    )


def _read_settings(folder: Path, tokens: SpecialTokens) -> ProcessorSettings:
    """Each part's settings from its own section (see `_preprocessor_sections`).

    The video pixel budget is not read: transformers' Qwen3-Omni processor passes its own per-frame budget
    (128..768 merged patches, `VIDEO_SETTINGS`) to the video processor at every call, which overrides the
    video section's `size`; only the video section's geometry, normalisation and frame limits take effect.
    """
    sections = _preprocessor_sections(folder)
    mel = _mel_settings(sections["feature_extractor"], folder)
    image_raw, video_raw = sections["image_processor"], sections["video_processor"]
    image = _vision_settings(image_raw, VisionSettings(), _pixel_budget(image_raw, VisionSettings()))
    video = _vision_settings(video_raw, VIDEO_SETTINGS, (VIDEO_SETTINGS.min_pixels, VIDEO_SETTINGS.max_pixels))
    sampling = FrameSampling(min_frames=int(video_raw.get("min_frames", FrameSampling.min_frames)),
                             max_frames=int(video_raw.get("max_frames", FrameSampling.max_frames)),
                             temporal_patch_size=video.temporal_patch_size)
    n_window, per_second = ProcessorSettings.n_window, ProcessorSettings.position_id_per_seconds
    if (folder / "config.json").is_file():
        from ..config import Qwen3OmniConfig

        thinker = Qwen3OmniConfig.from_pretrained(folder).thinker
        n_window, per_second = thinker.audio.n_window, float(thinker.position_id_per_seconds)
    return ProcessorSettings(mel, image, video, sampling, n_window, per_second, tokens)


def _check_token_ids(folder: Path, tokenizer, tokens: SpecialTokens) -> None:
    """The tokenizer's placeholder ids must be the ones the model config expects."""
    if not (folder / "config.json").is_file():
        return
    from ..config import Qwen3OmniConfig

    thinker = Qwen3OmniConfig.from_pretrained(folder).thinker
    for kind, want in (("image", thinker.image_token_id), ("video", thinker.video_token_id),
                       ("audio", thinker.audio_token_id)):
        got = tokenizer.convert_tokens_to_ids(getattr(tokens, kind))
        if got != want:
            raise ConfigError(f"{folder}: the tokenizer maps {getattr(tokens, kind)} to id {got}, but config.json "
                              f"says {kind}_token_id = {want}")
