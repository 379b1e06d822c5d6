"""Regression tests for the processor review (/tmp/review/processing/REPORT.md): settings of a folder saved by
transformers, numpy scalar rates, error messages that name the item, and the frame rate of sampled videos."""

from __future__ import annotations

import json
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from processor_fixtures import make_checkpoint_folder, oracle_processor, speech
from test_processor import _assert_same, _oracle_call

from qwen3omni.errors import InputError
from qwen3omni.processing import Processor, load_audio
from qwen3omni.processing.audio import positive_rate
from qwen3omni.processing.video import FrameSampling, kept_frame_rate

IMAGE_BUDGET = {"shortest_edge": 64 * 32 * 32, "longest_edge": 256 * 32 * 32}  # released: 3136..12845056 pixels
VIDEO_BUDGET = {"shortest_edge": 16 * 32 * 32, "longest_edge": 64 * 32 * 32}  # released: 128..768 merged patches
MEDIA_PROMPT = ("<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
                "<|vision_start|><|video_pad|><|vision_end|>")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_checkpoint_folder(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def ours(folder) -> Processor:
    return Processor.from_pretrained(folder)


def _write_video(path: Path, n_frames: int, fps: float, audio_samples: int | None = None) -> Path:
    """A tiny 32 x 32 video (mpeg4, in a Matroska file), with a 16 kHz PCM track of `audio_samples` if given."""
    import av

    with av.open(str(path), "w", format="matroska") as container:
        video = container.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1001))
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=16000) if audio_samples else None
        for i in range(n_frames):
            image = np.full((32, 32, 3), (i * 37) % 256, np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if audio is not None:
            wave = (0.1 * np.sin(np.arange(audio_samples) / 5.0)).astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, 0
            for packet in [*audio.encode(frame), *audio.encode()]:
                container.mux(packet)
    return path


# ---------------------------------------------------------------------------------------------------------------
# 1. A processor saved by transformers: each part's settings from its own section


def test_folder_saved_by_transformers_loads_with_its_own_budgets(folder, tmp_path):
    oracle = oracle_processor(folder)
    oracle.image_processor.size = IMAGE_BUDGET
    oracle.video_processor.size = VIDEO_BUDGET
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle.save_pretrained(str(tmp_path))
    sections = json.loads((tmp_path / "processor_config.json").read_text())
    # The trap: transformers copies the combined file's stale budget into the feature_extractor section.
    assert sections["feature_extractor"]["max_pixels"] == 12845056
    loaded = Processor.from_pretrained(tmp_path)
    assert (loaded.settings.image.min_pixels, loaded.settings.image.max_pixels) == (65536, 262144)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (600, 900, 3), dtype=np.uint8)  # 527 merged patches: above the new budget
    # The oracle's processor overrides the video section's size with its own per-frame budget at every call,
    # so these frames (20 and 1125 merged patches) are resized by the released budget, by it and by us.
    videos = [rng.integers(0, 256, (2, 40, 50, 3), dtype=np.uint8),
              rng.integers(0, 256, (2, 1200, 960, 3), dtype=np.uint8)]
    out = loaded.process(MEDIA_PROMPT, images=[image], videos=videos, fps=2.0)
    _assert_same(out, _oracle_call(oracle, [MEDIA_PROMPT], images=[image], videos=videos))
    assert out["image_grid_thw"].tolist() == [[1, 26, 38]]  # [1, 38, 56] under the released budget
    from transformers import AutoProcessor  # and the folder reloaded by transformers agrees on every token

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = _oracle_call(AutoProcessor.from_pretrained(str(tmp_path)), [MEDIA_PROMPT], images=[image],
                                videos=videos)
    assert torch.equal(out["input_ids"], reloaded["input_ids"])
    assert torch.equal(out["video_grid_thw"], reloaded["video_grid_thw"])


# ---------------------------------------------------------------------------------------------------------------
# 2. Numpy scalar rates


@pytest.mark.parametrize("rate", [np.int64(44100), np.int32(44100), np.float32(44100.0)])
def test_numpy_scalar_sampling_rates_are_taken(ours, rate):
    wave = (np.random.default_rng(0).standard_normal(44100) * 0.1).astype(np.float32)
    want = load_audio((wave, 44100))
    assert torch.equal(load_audio((wave, rate)), want)
    conv = [{"role": "user", "content": [{"type": "audio", "audio": wave, "sampling_rate": rate}]}]
    assert ours(conv)["feature_attention_mask"].sum().item() == 100  # one second at 16 kHz


@pytest.mark.parametrize("fps", [np.float32(1.0), np.int64(1), np.int32(1)])
def test_numpy_scalar_fps_is_taken(ours, fps):
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    assert ours.process("<|video_pad|>", videos=[frames], fps=fps)["video_second_per_grid"].tolist() == [2.0]
    conv = [{"role": "user", "content": [{"type": "video", "video": frames, "fps": fps}]}]
    assert ours(conv)["video_second_per_grid"].tolist() == [2.0]


@pytest.mark.parametrize("bad", [True, np.bool_(True), 0, -16000, "16000"])
def test_bad_rates_are_refused_naming_the_item(ours, bad):
    conv = [{"role": "user", "content": [{"type": "audio", "audio": speech(), "sampling_rate": bad}]}]
    with pytest.raises(InputError, match=r"conversation 0, message 0, item 0 \(audio\): sampling_rate must be a "
                                         r"positive number of samples per second"):
        ours(conv)
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(InputError, match=r"videos\[0\]: fps must be a positive number of frames per second"):
        ours.process("<|video_pad|>", videos=[frames], fps=bad)


def test_non_finite_rates_are_refused():
    # Checked on the helper every rate goes through: before the fix a NaN or infinite sampling rate reached soxr,
    # which never returns.
    for bad in (float("nan"), np.float32("nan"), np.inf, -np.inf):
        with pytest.raises(InputError, match=r"clip 3: sampling_rate must be a positive number"):
            positive_rate(bad, "clip 3")
    assert positive_rate(np.int64(44100), "clip 3") == 44100.0 and positive_rate(Fraction(1, 2), "x") == 0.5



# ---------------------------------------------------------------------------------------------------------------
# 3. Too-short audio is reported as the item the user gave


def test_short_audio_error_names_the_conversation_item(ours):
    long, short = speech()[:16000], speech()[:150]
    conv = [{"role": "user", "content": [{"type": "image", "image": np.zeros((64, 64, 3), np.uint8)},
                                         {"type": "audio", "audio": long}, {"type": "audio", "audio": short},
                                         {"type": "text", "text": "Compare the two clips."}]}]
    with pytest.raises(InputError, match=r"^conversation 0, message 0, item 2 \(audio\): expected a mono waveform "
                                         r"of at least 201 samples"):
        ours(conv)
    with pytest.raises(InputError, match=r"^audio\[1\]: expected a mono waveform of at least 201 samples"):
        ours.process("<|audio_pad|><|audio_pad|>", audio=[long, short])


def test_short_video_track_error_names_the_video(ours, tmp_path):
    clip = _write_video(tmp_path / "clip.mkv", 8, 4.0, audio_samples=80)  # a 5 ms track
    conv = [{"role": "user", "content": [{"type": "audio", "audio": speech()[:16000]},
                                         {"type": "video", "video": str(clip)}, {"type": "text", "text": "?"}]}]
    with pytest.raises(InputError, match=r"^conversation 0, message 0, item 1 \(video\) \(audio track\): expected "
                                         r"a mono waveform of at least 201 samples"):
        ours(conv, use_audio_in_video=True)


# ---------------------------------------------------------------------------------------------------------------
# 4. video_second_per_grid follows the frames actually kept from a file


@pytest.mark.parametrize("n_frames, fps, second_per_grid", [
    (8, 1.0, 2.0),     # slower than the requested 2 fps: every frame is kept, 1 s apart
    (12, 24.0, 0.25),  # 0.5 s clip: min_frames keeps 4 frames, 0.125 s apart
])  # where the count follows duration * fps the requested rate stays (test_processor.py's mp4 parity tests)
def test_file_second_per_grid_is_the_kept_frames_rate(ours, tmp_path, n_frames, fps, second_per_grid):
    clip = _write_video(tmp_path / "clip.mkv", n_frames, fps)
    out = ours([{"role": "user", "content": [{"type": "video", "video": str(clip)}]}])
    assert out["video_second_per_grid"].tolist() == [second_per_grid]


def test_kept_frame_rate_under_the_frame_limits():
    assert kept_frame_rate(30000, 30.0, 768) == pytest.approx(0.768)  # 1000 s: capped at max_frames
    assert kept_frame_rate(50, 12.0, 8) == 2.0  # 4.2 s at 2 fps: 8 frames, floored to the temporal patch
    assert kept_frame_rate(1, 30.0, 1) == 30.0  # shorter than a temporal patch: kept whole
    assert kept_frame_rate(100, 10.0, 6, FrameSampling(fps=0.5, min_frames=6)) == pytest.approx(0.6)


def test_missing_pyav_is_a_typed_error(ours, monkeypatch):
    """Without the video extra a video file is a MissingDependencyError (an ImportError, and a Qwen3OmniError,
    so `qwen3omni chat` reports it on one line) that says what to install."""
    import sys

    from qwen3omni.errors import MissingDependencyError, Qwen3OmniError

    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    conv = [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}]
    with pytest.raises(MissingDependencyError, match="needs PyAV.*pip install av") as caught:
        ours(conv)
    assert isinstance(caught.value, ImportError) and isinstance(caught.value, Qwen3OmniError)
