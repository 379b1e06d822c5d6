"""The whole thinker on real audio, images and video against the reference: logits and greedy generation.

Media: tests/data/speech_librivox_16k.flac (LibriVox, public domain), tests/data/photo_chelsea_333x221.jpg and
a 157 x 103 crop of it (scikit-image, CC0), tests/data/video_coffee_speech.mp4 (scikit-image "coffee" pan
with a speech track, CC0): 4 frames 8 apart (1.5 frames per second, 4/3 s per temporal patch) and, for
`use_audio_in_video`, the file's own audio track. Features come from transformers' Whisper feature
extractor and Qwen2-VL image / video processors; prompts are written by hand with the real token ids.

Calibration (tiny config, sensitive init, fp32 CPU; max |ours - ref| / max |ref| over the logits at real
tokens): ours vs the reference ~3e-6 (audio only: 0.0); the reference's eager vs SDPA ~2.5e-6; deepstack off
0.94; position_id_per_seconds 25 instead of 13: 1.1 (mixed batch), 0.85 (audio in video). The tolerance sits
between: 1e-4, and the check against the reference's own paths uses 1e-5.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from test_audio_encoder import RATE, log_mel, set_attention, speech
from test_positions import ASSISTANT, SYSTEM, USER, Prompt, batch
from test_vision_encoder import VIDEO, image_inputs, photo, video_frames, video_inputs

from qwen3omni.errors import InputError
from qwen3omni.model.omni import Qwen3Omni

from reference import max_rel_err

TOL = 1e-4
WRONG = 1e-2
FRAME_STRIDE, FPS = 8, 12  # 4 frames 8 apart from a 12 fps file: 1.5 sampled frames per second
SECONDS_PER_GRID = 2 / (FPS / FRAME_STRIDE)  # 2 frames per temporal patch


def small_video():
    """4 real frames at half size (grid 2 x 6 x 10: 30 merged tokens)."""
    frames = [np.asarray(Image.fromarray(f).resize((149, 101))) for f in video_frames(4, FRAME_STRIDE)]
    return video_inputs(np.stack(frames), max_pixels=160 * 96)


def video_audio_track(seconds: float) -> np.ndarray:
    """The mp4's own speech track, mono 16 kHz, the first `seconds` of it."""
    import av

    with av.open(str(VIDEO)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE)
        chunks = [
            out.to_ndarray().reshape(-1) for frame in container.decode(audio=0) for out in resampler.resample(frame)
        ]
    return np.concatenate(chunks)[: int(seconds * RATE)]


class Case:
    """A prompt batch with its media: keyword arguments for both thinkers."""

    def __init__(self, prompts, features=None, pixel_values=None, pixel_values_videos=None, use_audio_in_video=False):
        inputs = batch(*prompts)
        self.kwargs = dict(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            image_grid_thw=inputs["image_grid_thw"], video_grid_thw=inputs["video_grid_thw"],
            video_second_per_grid=inputs["video_second_per_grid"], use_audio_in_video=use_audio_in_video,
        )
        if features is not None:
            self.kwargs.update(input_features=features[0], feature_attention_mask=features[1])
        if pixel_values is not None:
            self.kwargs["pixel_values"] = pixel_values
        if pixel_values_videos is not None:
            self.kwargs["pixel_values_videos"] = pixel_values_videos


@pytest.fixture(scope="module")
def thinkers(tiny_checkpoint):
    ours = Qwen3Omni.from_pretrained(tiny_checkpoint.path, dtype=torch.float32, components={"thinker"}).thinker
    return tiny_checkpoint.reference.thinker, ours


@pytest.fixture(scope="module")
def mixed_batch():
    """Row 0: image, speech, video, text. Row 1 (left-padded): speech, a smaller image, text."""
    image = photo()
    pixels, grids = image_inputs([image, image.crop((40, 20, 197, 123))])
    video_pixels, video_grid = small_video()
    x = speech()
    features = log_mel([x[: int(2.3 * RATE)], x[RATE : int(1.7 * RATE)]])
    mel = features[1].sum(-1).tolist()
    (g0, g1), (gv,) = grids.tolist(), video_grid.tolist()
    long = (
        Prompt().turn(SYSTEM, lambda p: p.text(4))
        .turn(USER, lambda p: p.text(2).image(*g0).audio(mel[0]).video(*gv, SECONDS_PER_GRID).text(3))
        .turn(ASSISTANT)
    )
    short = Prompt().turn(USER, lambda p: p.audio(mel[1]).image(*g1).text(4)).turn(ASSISTANT)
    return Case([long, short], features, pixels, video_pixels)


@pytest.fixture(scope="module")
def audio_in_video():
    """A video with its own audio track interleaved by time, plus an image, in one turn."""
    video_pixels, video_grid = small_video()
    track = video_audio_track(seconds=4 * FRAME_STRIDE / FPS)
    features = log_mel([track])
    image = photo().crop((40, 20, 197, 123))
    pixels, grids = image_inputs([image])
    (gv,), (gi,) = video_grid.tolist(), grids.tolist()
    mel = int(features[1].sum())
    prompt = (
        Prompt().turn(USER, lambda p: p.video_with_audio(*gv, SECONDS_PER_GRID, mel).text(2).image(*gi).text(3))
        .turn(ASSISTANT)
    )
    return Case([prompt], features, pixels, video_pixels, use_audio_in_video=True)


@pytest.fixture(scope="module")
def audio_only():
    """Speech and text only: with no image or video grid, the reference gives audio plain text positions."""
    x = speech()
    features = log_mel([x[: int(2.3 * RATE)], x[2 * RATE : int(2.9 * RATE)]])
    mel = features[1].sum(-1).tolist()
    a = Prompt().turn(USER, lambda p: p.audio(mel[0]).text(5)).turn(ASSISTANT)
    b = Prompt().turn(USER, lambda p: p.text(2).audio(mel[1])).turn(ASSISTANT)
    return Case([a, b], features)


@torch.no_grad()
def logits(thinker, case: Case, **extra):
    """Logits at the real (unpadded) tokens: what a padded row computes is not defined by either model (the
    reference's own eager and SDPA paths disagree there)."""
    return thinker(**case.kwargs, **extra).logits[case.kwargs["attention_mask"].bool()]


@pytest.fixture(scope="module")
def reference_logits(thinkers, mixed_batch, audio_in_video):
    ref, _ = thinkers
    return {"mixed_batch": logits(ref, mixed_batch), "audio_in_video": logits(ref, audio_in_video)}


@pytest.mark.parametrize("case_name", ["mixed_batch", "audio_in_video", "audio_only"])
def test_logits_match_the_reference(thinkers, reference_logits, case_name, request):
    ref, ours = thinkers
    case = request.getfixturevalue(case_name)
    expected = reference_logits[case_name] if case_name in reference_logits else logits(ref, case)
    got = logits(ours, case)
    assert got.shape == expected.shape
    assert max_rel_err(got, expected) < TOL


def test_tolerance_calibration_reference_paths(thinkers, reference_logits, mixed_batch):
    """The reference's own eager and SDPA paths agree far inside the tolerance."""
    ref, _ = thinkers
    try:
        set_attention(ref, "eager")
        eager = logits(ref, mixed_batch)
    finally:
        set_attention(ref, "sdpa")
    assert max_rel_err(eager, reference_logits["mixed_batch"]) < TOL / 10


@torch.no_grad()
def test_tolerance_calibration_deepstack_off(thinkers, reference_logits, mixed_batch):
    _, ours = thinkers
    kw = mixed_batch.kwargs
    no_deepstack = ours.embed(
        kw["input_ids"], kw.get("input_features"), kw.get("feature_attention_mask"), kw.get("pixel_values"),
        kw["image_grid_thw"], kw.get("pixel_values_videos"), kw["video_grid_thw"],
    ).inputs_embeds  # embeddings only: forward(inputs_embeds=...) adds no deepstack features
    positions = ours.rope_positions(
        kw["input_ids"], kw["attention_mask"], kw.get("feature_attention_mask"), kw["image_grid_thw"],
        kw["video_grid_thw"], kw["video_second_per_grid"], kw["use_audio_in_video"],
    )
    off = ours(inputs_embeds=no_deepstack, attention_mask=kw["attention_mask"], position_ids=positions).logits
    moved = max_rel_err(off[kw["attention_mask"].bool()], reference_logits["mixed_batch"])
    assert moved > WRONG, f"deepstack off moved the logits by only {moved:.2e}"


@pytest.mark.parametrize("case_name", ["mixed_batch", "audio_in_video"])
def test_tolerance_calibration_position_id_per_seconds(thinkers, reference_logits, case_name, request):
    _, ours = thinkers
    case = request.getfixturevalue(case_name)
    right = ours.config
    ours.config = dataclasses.replace(right, position_id_per_seconds=25)
    try:
        moved = max_rel_err(logits(ours, case), reference_logits[case_name])
    finally:
        ours.config = right
    assert moved > WRONG, f"position_id_per_seconds=25 moved the logits by only {moved:.2e}"


@torch.no_grad()
@pytest.mark.parametrize("case_name", ["mixed_batch", "audio_in_video"])
def test_greedy_generation_is_identical(thinkers, case_name, request):
    ref, ours = thinkers
    case = request.getfixturevalue(case_name)
    kw = dict(case.kwargs)
    ids, mask = kw.pop("input_ids"), kw.pop("attention_mask")
    expected = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **kw)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None, **kw)
    assert torch.equal(got.sequences, expected)


@torch.no_grad()
def test_placeholder_count_mismatch_names_both_counts(thinkers, mixed_batch):
    _, ours = thinkers
    kw = dict(mixed_batch.kwargs)
    kw["image_grid_thw"] = kw["image_grid_thw"].clone()
    kw["image_grid_thw"][1, 2] -= 2  # the second image: 12 merged tokens instead of the prompt's 15
    kw["pixel_values"] = kw["pixel_values"][: int(kw["image_grid_thw"].prod(-1).sum())]
    with pytest.raises(InputError, match="85 image placeholder tokens but the image encoder produced 82"):
        ours(**kw)


def test_feature_mask_must_be_right_padding(thinkers, audio_only):
    _, ours = thinkers
    kw = dict(audio_only.kwargs)
    kw["feature_attention_mask"] = kw["feature_attention_mask"].flip(-1)  # left padding: not what was encoded
    with pytest.raises(InputError, match="feature_attention_mask"):
        ours(**kw)
