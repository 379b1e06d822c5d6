"""Preprocessing: audio (log-mel), images and video (patches), chat (template, placeholders, tokens).

`Processor` ties them together; the functions below are the pieces, usable alone.
"""

from .audio import MelSettings, load_audio, log_mel_features, mel_filter_bank
from .chat import normalize_conversations, render_builtin
from .placeholders import SpecialTokens, interleaved_video_audio
from .processor import Processor, ProcessorSettings
from .video import FrameSampling, read_audio_track, read_video, sample_frame_indices
from .vision import (
    VIDEO_SETTINGS,
    VisionSettings,
    frames_to_tensor,
    image_patches,
    load_image,
    patchify,
    process_images,
    smart_resize,
    video_patches,
)

__all__ = [
    "FrameSampling",
    "MelSettings",
    "Processor",
    "ProcessorSettings",
    "SpecialTokens",
    "VIDEO_SETTINGS",
    "VisionSettings",
    "frames_to_tensor",
    "image_patches",
    "interleaved_video_audio",
    "load_audio",
    "load_image",
    "log_mel_features",
    "mel_filter_bank",
    "normalize_conversations",
    "patchify",
    "process_images",
    "read_audio_track",
    "read_video",
    "render_builtin",
    "sample_frame_indices",
    "smart_resize",
    "video_patches",
]
