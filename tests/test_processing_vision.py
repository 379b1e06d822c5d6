"""Images and video against transformers' Qwen2VLImageProcessorPil and Qwen2VLVideoProcessor."""

from __future__ import annotations

import math
import warnings

import av
import numpy as np
import PIL.Image
import pytest
import torch
from processor_fixtures import DATA, PHOTO, SPEECH, VIDEO

from qwen3omni.errors import InputError, MissingFileError
from qwen3omni.processing.video import FrameSampling, read_video, sample_frame_indices
from qwen3omni.processing.vision import (
    VIDEO_SETTINGS,
    VisionSettings,
    _normalise_frames,
    frames_to_tensor,
    load_image,
    patchify,
    process_images,
    smart_resize,
    video_patches,
)

IMAGE_TOL = 1e-6
VIDEO_TOL = 1e-5
DEFAULT = VisionSettings()
VIDEO_SIZE = {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32}  # the Qwen3-Omni processor's


@pytest.fixture(scope="module")
def image_oracle():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(str(DATA))


@pytest.fixture(scope="module")
def video_oracle():
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor.from_pretrained(str(DATA), cap_pixels_per_frame=False)


def _photo(size=None) -> PIL.Image.Image:
    img = PIL.Image.open(PHOTO).convert("RGB")
    return img.resize(size, PIL.Image.Resampling.BICUBIC) if size else img


def _assert_images_match(oracle, images, settings=DEFAULT, **oracle_kwargs):
    ref = oracle(images, return_tensors="pt", **oracle_kwargs)
    pixels, grid = process_images(images, settings)
    assert torch.equal(grid, ref["image_grid_thw"])
    assert pixels.shape == ref["pixel_values"].shape and pixels.dtype == torch.float32
    diff = (pixels - ref["pixel_values"]).abs().max().item()
    assert diff <= IMAGE_TOL, f"pixel_values differ by {diff}"
    return pixels, grid


def test_smart_resize_matches_reference():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    sizes = [(1, 1), (7, 9), (48, 48), (221, 333), (500, 3), (3000, 1500), (4000, 3500), (20, 3000), (17, 2500),
             (1080, 1920), (239, 4001), (16, 16), (33, 47)]
    for height, width in sizes:
        for lo, hi in ((3136, 12845056), (128 * 1024, 768 * 1024)):
            if max(height, width) / min(height, width) <= 200:
                assert smart_resize(height, width, 32, lo, hi) == reference(height, width, 32, lo, hi)
    # Rounding variants land on other grids, so the comparison above would see them: floor instead of round,
    # and half-up instead of Python's half-to-even (80 / 32 = 2.5 -> 2).
    assert math.floor(1080 / 32) * 32 != smart_resize(1080, 1920, 32, 3136, 12845056)[0]
    assert smart_resize(80, 80, 32, 3136, 12845056) == (64, 64) != (math.floor(2.5 + 0.5) * 32,) * 2


def test_real_photo_matches_reference(image_oracle):
    pixels, grid = _assert_images_match(image_oracle, [_photo()])
    assert grid.tolist() == [[1, 14, 20]] and pixels.shape == (280, 3 * 2 * 16 * 16)


def test_input_forms_give_the_same_pixels(image_oracle):
    photo = _photo()
    hwc = np.asarray(photo)
    expected, _ = process_images([photo])
    for form in (str(PHOTO), hwc, np.ascontiguousarray(hwc.transpose(2, 0, 1)), torch.from_numpy(hwc.copy())):
        assert torch.equal(process_images([form])[0], expected)
    _assert_images_match(image_oracle, [hwc.transpose(2, 0, 1).copy()])


@pytest.mark.parametrize("size", [(48, 48), (3000, 1500), (20, 3000), (2500, 17), (13, 13)])
def test_odd_sizes_match_reference(image_oracle, size):
    _assert_images_match(image_oracle, [_photo(size)])


def test_budget_limits_match_reference(image_oracle):
    small_budget = VisionSettings(min_pixels=64 * 64, max_pixels=200_000)
    size = {"shortest_edge": 64 * 64, "longest_edge": 200_000}
    _, grid = _assert_images_match(image_oracle, [_photo((3000, 1500))], small_budget, size=size)
    assert grid[0, 1] * grid[0, 2] * 256 <= 200_000
    _, grid = _assert_images_match(image_oracle, [_photo((9, 11))], VisionSettings(min_pixels=100_000), size={
        "shortest_edge": 100_000, "longest_edge": 12845056})
    assert grid[0, 1] * grid[0, 2] * 256 >= 100_000


def test_modes_and_batches_match_reference(image_oracle):
    photo = _photo()
    grey = photo.convert("L")
    rgba = photo.convert("RGBA")
    rgba.putalpha(PIL.Image.linear_gradient("L").resize(photo.size))
    palette = photo.convert("P")
    _assert_images_match(image_oracle, [grey, rgba, palette, _photo((64, 200))])


def test_tolerance_catches_a_wrong_resampler(image_oracle):
    ref = image_oracle([_photo()], return_tensors="pt")["pixel_values"]
    bilinear = VisionSettings(resample=PIL.Image.Resampling.BILINEAR)
    assert (process_images([_photo()], bilinear)[0] - ref).abs().max() > 1e3 * IMAGE_TOL


def test_image_errors_name_the_item(tmp_path):
    with pytest.raises(MissingFileError, match="picture 2: image file .*nope.png"):
        load_image(tmp_path / "nope.png", "picture 2")
    (tmp_path / "bad.png").write_bytes(b"definitely not a png")
    with pytest.raises(InputError, match="picture 2: cannot read .*bad.png"):
        load_image(tmp_path / "bad.png", "picture 2")
    with pytest.raises(InputError, match="picture 2: the image is empty"):
        load_image(np.zeros((0, 10, 3), np.uint8), "picture 2")
    with pytest.raises(InputError, match="picture 2: the image is empty"):
        load_image(PIL.Image.new("RGB", (0, 5)), "picture 2")
    with pytest.raises(InputError, match="picture 2: float pixels must lie in"):
        load_image(np.full((4, 4, 3), 2.0), "picture 2")
    with pytest.raises(InputError, match="aspect ratio must be at most 200"):
        process_images([np.zeros((2, 500, 3), np.uint8)])


# ---------------------------------------------------------------------------------------------------------------
# Video


def _all_frames(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return np.stack(frames), float(stream.average_rate)


def _oracle_video(oracle, videos, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return oracle(videos, return_tensors="pt", size=VIDEO_SIZE, **kwargs)


def _assert_video_matches(ours_frames_TCHW, ref):
    rows, grid = video_patches(ours_frames_TCHW)
    assert list(grid) == ref["video_grid_thw"][0].tolist()
    assert rows.shape == ref["pixel_values_videos"].shape
    diff = (rows - ref["pixel_values_videos"]).abs().max().item()
    assert diff <= VIDEO_TOL, f"pixel_values_videos differ by {diff}"


def test_mp4_frames_match_reference_sampling_and_pixels(video_oracle):
    frames, video_fps = _all_frames(VIDEO)
    metadata = {"total_num_frames": len(frames), "fps": video_fps, "duration": len(frames) / video_fps}
    ref = _oracle_video(video_oracle, [frames], video_metadata=[metadata], do_sample_frames=True, fps=2.0,
                        return_metadata=True)
    ours = read_video(VIDEO)
    assert ours.shape[0] == len(ref["video_metadata"][0].frames_indices) == 8
    assert sample_frame_indices(len(frames), video_fps) == ref["video_metadata"][0].frames_indices.tolist()
    _assert_video_matches(ours, ref)


def test_frame_lists_match_reference(video_oracle):
    # 5 HD frames: above the per-frame budget (downscaled) and an odd count (last frame repeated).
    frames = [np.asarray(_photo((1280, 720)).rotate(3 * i)) for i in range(5)]
    ref = _oracle_video(video_oracle, [np.stack(frames)], do_sample_frames=False)
    ours = frames_to_tensor(frames)
    _assert_video_matches(ours, ref)
    assert ref["video_grid_thw"][0, 0] == 3
    tiny = [np.asarray(_photo((40, 30)))] * 2  # below the budget: upscaled
    _assert_video_matches(frames_to_tensor(tiny), _oracle_video(video_oracle, [np.stack(tiny)],
                                                                do_sample_frames=False))


def test_tolerance_catches_resize_without_antialias(video_oracle):
    frames = np.stack([np.asarray(_photo((1280, 720)))] * 2)
    ref = _oracle_video(video_oracle, [frames], do_sample_frames=False)["pixel_values_videos"]
    ours = frames_to_tensor(frames)
    assert (video_patches(ours)[0] - ref).abs().max() <= VIDEO_TOL
    size = smart_resize(720, 1280, 32, VIDEO_SETTINGS.min_pixels, VIDEO_SETTINGS.max_pixels)
    plain = torch.nn.functional.interpolate(ours.float(), size=size, mode="bicubic", antialias=False)
    plain_rows, _ = patchify(_normalise_frames(plain.clamp(0, 255).round().to(torch.uint8), VIDEO_SETTINGS),
                             VIDEO_SETTINGS)
    assert (plain_rows - ref).abs().max() > 1e3 * VIDEO_TOL


def test_sampling_matches_reference(video_oracle):
    from transformers.video_utils import VideoMetadata

    for total, video_fps, fps in [(50, 12.0, 2.0), (300, 30.0, 2.0), (7, 25.0, 2.0), (3, 1.0, 2.0),
                                  (2000, 29.97, 2.0), (100, 10.0, 0.5), (9000, 30.0, 2.0), (61, 24.0, 1.0)]:
        meta = VideoMetadata(total_num_frames=total, fps=video_fps, duration=total / video_fps)
        ref = video_oracle.sample_frames(meta, temporal_patch_size=2, min_frames=4, max_frames=768, fps=fps)
        assert sample_frame_indices(total, video_fps, FrameSampling(fps=fps)) == ref.tolist(), (total, video_fps)
    assert sample_frame_indices(1, 30.0) == [0]  # shorter than a temporal patch: kept whole


def test_gpu_video_patches_match_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    frames = frames_to_tensor([np.asarray(_photo((1280, 720)).rotate(7 * i)) for i in range(3)])
    cpu_rows, grid = video_patches(frames)
    gpu_rows, gpu_grid = video_patches(frames.cuda())
    assert gpu_grid == grid and gpu_rows.is_cuda
    assert (gpu_rows.cpu() - cpu_rows).abs().max() <= VIDEO_TOL


def test_video_errors_name_the_item(tmp_path):
    with pytest.raises(InputError, match="clip 1: the video has no frames"):
        frames_to_tensor(np.zeros((0, 8, 8, 3), np.uint8), "clip 1")
    with pytest.raises(InputError, match="clip 1: the video has no frames"):
        frames_to_tensor([], "clip 1")
    with pytest.raises(InputError, match="clip 1: all frames must have the same size"):
        frames_to_tensor([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)], "clip 1")
    with pytest.raises(MissingFileError, match="clip 1: video file .*missing.mp4"):
        read_video(tmp_path / "missing.mp4", name="clip 1")
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(InputError, match="clip 1: cannot (open|decode) .*junk.mp4"):
        read_video(tmp_path / "junk.mp4", name="clip 1")
    with pytest.raises(InputError, match="clip 1: .*has no video stream"):
        read_video(SPEECH, name="clip 1")
