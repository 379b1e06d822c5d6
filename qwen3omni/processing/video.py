"""Video files: which frames to keep, decoding them, and the audio track (PyAV, the optional `video` extra)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, MissingDependencyError, MissingFileError
from .audio import SAMPLING_RATE, resample


@dataclass(frozen=True)
class FrameSampling:
    """How many frames of a video file the model sees: `fps` per second, between min and max frames."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    temporal_patch_size: int = 2


def sample_frame_indices(total_frames: int, video_fps: float, sampling: FrameSampling = FrameSampling()):
    """Indices of the frames to keep, spread evenly over the video (transformers' Qwen2-VL rule).

    The count is `duration * fps`, raised to `min_frames`, capped by `max_frames` and the video's own length,
    then floored to a multiple of the temporal patch. A video shorter than one temporal patch keeps all frames.
    """
    tp = sampling.temporal_patch_size
    cap = tp * math.floor(min(sampling.max_frames, total_frames) / tp)
    count = min(max(total_frames / video_fps * sampling.fps, sampling.min_frames), cap, total_frames)
    count = tp * math.floor(count / tp)
    if count <= 0:
        return list(range(total_frames))
    # A float32 arange, truncated: the same positions the reference picks.
    return torch.arange(0, total_frames, total_frames / count).int().tolist()


def kept_frame_rate(total_frames: int, video_fps: float, kept: int, sampling: FrameSampling = FrameSampling()):
    """The rate, in frames per second, of the `kept` frames `sample_frame_indices` picks from a video file.

    When the count followed duration * fps (floored to the temporal patch) this is `sampling.fps`, as
    transformers' processor assumes; the flooring moves the last frame by less than one temporal patch. When
    `min_frames`, `max_frames` or the video's own length set the count instead (a video slower than `fps`, a
    short clip, a very long video), the kept frames are evenly spread over the whole video, so their rate is
    kept / duration = kept / total_frames * video_fps, the sample fps Qwen's own qwen-omni-utils computes.
    The model's video time positions (and audio interleaving) are only right with that rate.
    """
    tp = sampling.temporal_patch_size
    by_rate = tp * math.floor(total_frames / video_fps * sampling.fps / tp)
    return sampling.fps if kept == by_rate else kept / total_frames * video_fps


def _import_av():
    try:
        import av
    except ImportError:
        raise MissingDependencyError(
            "video: reading video files needs PyAV, which is not installed: `pip install av` (or the `video` extra "
            "of qwen3omni); frame arrays work without it"
        ) from None
    return av


def _open(path, name):
    av = _import_av()
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{name}: video file {str(path)!r} does not exist")
    try:
        return av.open(str(path))
    except (av.FFmpegError, ValueError) as e:
        raise InputError(f"{name}: cannot open {str(path)!r} as a video: {e}") from None


def _frame_rate(stream, name) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or float(rate) <= 0:
        raise InputError(f"{name}: the video stream does not tell its frame rate")
    return float(rate)


def _count_frames(path, name) -> int:
    with _open(path, name) as container:
        return sum(1 for _ in container.decode(video=0))


def _decode_frames(path, indices, name) -> tuple[list[np.ndarray], int]:
    """The RGB frames at `indices` (sorted, repeats allowed) and the number of frames the stream really has."""
    wanted = {}
    for i in indices:
        wanted[i] = wanted.get(i, 0) + 1
    kept, seen = [], 0
    with _open(path, name) as container:
        for seen, frame in enumerate(container.decode(video=0), start=1):
            if (seen - 1) in wanted:
                rgb = frame.to_ndarray(format="rgb24")
                kept.extend([rgb] * wanted[seen - 1])
    return kept, seen


def read_video(path, sampling: FrameSampling = FrameSampling(), name: str = "video") -> torch.Tensor:
    """Decode the frames of a video file that `sampling` keeps, as uint8 `[T, 3, H, W]`."""
    return read_video_with_rate(path, sampling, name)[0]


def read_video_with_rate(path, sampling: FrameSampling = FrameSampling(), name: str = "video"):
    """`read_video`'s frames and their rate in frames per second (see `kept_frame_rate`)."""
    av = _import_av()
    try:
        with _open(path, name) as container:
            if not container.streams.video:
                raise InputError(f"{name}: {str(path)!r} has no video stream")
            stream = container.streams.video[0]
            video_fps, total = _frame_rate(stream, name), stream.frames
        total = total or _count_frames(path, name)
        frames, actual = _decode_frames(path, sample_frame_indices(total, video_fps, sampling), name)
        if actual != total:  # the container's frame count was wrong: sample again from the true count
            total = actual
            frames, _ = _decode_frames(path, sample_frame_indices(total, video_fps, sampling), name)
    except av.FFmpegError as e:
        raise InputError(f"{name}: cannot decode {str(path)!r}: {e}") from None
    if not frames:
        raise InputError(f"{name}: {str(path)!r} has no decodable frames")
    tensor = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()
    return tensor, kept_frame_rate(total, video_fps, len(frames), sampling)


def read_audio_track(path, target_rate: int = SAMPLING_RATE, name: str = "video") -> torch.Tensor | None:
    """The first audio stream of a media file as mono float32 at `target_rate`, or None if it has none."""
    av = _import_av()
    try:
        with _open(path, name) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            rate = stream.rate
            planar = av.AudioResampler(format="fltp")  # float samples, original layout and rate
            chunks = [out.to_ndarray() for frame in container.decode(stream) for out in planar.resample(frame)]
            chunks += [out.to_ndarray() for out in planar.resample(None)]
    except av.FFmpegError as e:
        raise InputError(f"{name}: cannot decode the audio track of {str(path)!r}: {e}") from None
    if not chunks or sum(c.shape[-1] for c in chunks) == 0:
        return None
    # Any channel layout (a 5.1 film track too) is averaged to mono, as audio loaders do.
    mono = torch.from_numpy(np.concatenate(chunks, axis=-1).astype(np.float32)).mean(dim=0)
    if not bool(torch.isfinite(mono).all()):
        raise InputError(f"{name}: the audio track of {str(path)!r} has NaN or infinite samples")
    return resample(mono, rate, target_rate, name=f"{name} (audio track)")
