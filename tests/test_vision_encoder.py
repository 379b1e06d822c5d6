"""Vision encoder against the reference: two real images of different odd sizes and a real 4-frame video.

Media: tests/data/photo_chelsea_333x221.jpg (scikit-image "chelsea", CC0) and a crop of it at 157 x 103,
tests/data/video_coffee_speech.mp4 (scikit-image "coffee" pan, CC0), features from transformers' Qwen2-VL
image and video processors with the released settings.

Calibration (tiny config, sensitive init, fp32 CPU; max |ours - ref| / max |ref|, final and deepstack):
ours vs the reference 8.5e-7 (we run the patch Conv3d as one matmul and group attention segments); the
reference's eager vs SDPA 7e-7; attention across a video's frames 2.5e-2, half-pixel instead of
corner-aligned position interpolation 0.36, rows and columns swapped in the 2-D rotary 0.21. The tolerance
sits between: 1e-4 (1e-5 for the reference's own paths).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3omni.config import Qwen3OmniConfig
from qwen3omni.errors import InputError
from qwen3omni.model import vision_encoder
from qwen3omni.model.vision_encoder import VisionEncoder

from reference import max_rel_err, reference_config, released_weights, sensitive_init_, tiny_config

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
PHOTO = DATA / "photo_chelsea_333x221.jpg"
VIDEO = DATA / "video_coffee_speech.mp4"
TOL = 1e-4
WRONG = 1e-2


# ---- real media through the reference processors -----------------------------------------------------------
def photo():
    from PIL import Image

    return Image.open(PHOTO).convert("RGB")


def video_frames(n: int = 4, stride: int = 8) -> np.ndarray:
    """`n` frames `stride` apart (the file is 12 fps: 1.5 frames per second with the default stride)."""
    import av

    with av.open(str(VIDEO)) as container:
        frames = []
        for i, frame in enumerate(container.decode(video=0)):
            if i % stride == 0:
                frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == n:
                break
    return np.stack(frames)  # [n, H, W, 3]


def image_inputs(images):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=3136, max_pixels=12845056
    )
    out = processor(images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def video_inputs(frames, max_pixels: int | None = None):
    """Qwen2-VL video features; by default with transformers' frame-size limits (the released checkpoint ships
    no video processor config), or with frames kept at most `max_pixels`."""
    import warnings

    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    limits = {} if max_pixels is None else {"min_pixels": 3136, "max_pixels": max_pixels}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = Qwen2VLVideoProcessor(
            patch_size=16, temporal_patch_size=2, merge_size=2, do_sample_frames=False, cap_pixels_per_frame=False,
            **limits,
        )
        out = processor(videos=[frames], return_tensors="pt")
    return out["pixel_values_videos"], out["video_grid_thw"]


@functools.lru_cache(maxsize=1)
def media():
    """(pixel_values, grid_thw): the photo, a 157 x 103 crop of it, and 4 video frames, in that order."""
    image = photo()
    pixels, grids = image_inputs([image, image.crop((40, 20, 197, 123))])
    video_pixels, video_grid = video_inputs(video_frames(4))
    return torch.cat([pixels, video_pixels]), torch.cat([grids, video_grid])


# ---- layout -------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _ours() -> dict[str, list[int]]:
    from qwen3omni.checkpoint import export_state_dict
    from qwen3omni.model.omni import Qwen3Omni

    config = Qwen3OmniConfig.from_pretrained(ROOT / "configs" / "qwen3-omni-30b-a3b-instruct.json")
    with torch.device("meta"):
        model = Qwen3Omni(config, components={"thinker"})
    return {name: list(t.shape) for name, t in export_state_dict(model).items()}


def released_names_with_prefix(prefix: str) -> dict[str, list[int]]:
    return released_weights(prefix)


def our_names_with_prefix(prefix: str) -> dict[str, list[int]]:
    return {k: v for k, v in _ours().items() if k.startswith(prefix)}


# ---- fixtures -----------------------------------------------------------------------------------------------
def build_pair(overrides=None, seed=0):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeVisionEncoder

    cfg = tiny_config({f"thinker_config.vision_config.{k}": v for k, v in (overrides or {}).items()})
    ref = Qwen3OmniMoeVisionEncoder._from_config(reference_config(cfg).thinker_config.vision_config)
    sensitive_init_(ref, seed)
    ref = ref.float().eval()
    ours = VisionEncoder(Qwen3OmniConfig.from_dict(cfg).thinker.vision).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def pair():
    return build_pair()


def run_reference(ref, pixels, grid):
    with torch.no_grad():
        out = ref(pixels, grid_thw=grid)
    return out.pooler_output, list(out.deepstack_features)


def run_ours(ours, pixels, grid):
    with torch.no_grad():
        return ours(pixels, grid)


def worst(got, expected) -> float:
    (merged, deep), (ref_merged, ref_deep) = got, expected
    assert merged.shape == ref_merged.shape and len(deep) == len(ref_deep)
    return max([max_rel_err(merged, ref_merged)] + [max_rel_err(a, b) for a, b in zip(deep, ref_deep)])


def set_attention(encoder, attn: str) -> None:
    """Switch a standalone reference encoder between its "eager" and "sdpa" attention paths."""
    for module in encoder.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = attn

# ---- tests --------------------------------------------------------------------------------------------------
def test_images_and_video_match_the_reference(pair):
    ref, ours = pair
    pixels, grid = media()
    assert grid[:, 1:].tolist() == [[14, 20], [6, 10], [18, 26]] and grid[:, 0].tolist() == [1, 1, 2]
    got = run_ours(ours, pixels, grid)
    assert got[0].shape == (pixels.shape[0] // 4, 64) and len(got[1]) == 3
    assert worst(got, run_reference(ref, pixels, grid)) < TOL


def _half_pixel_taps(index, size, side):
    src = ((index.float() + 0.5) * side / size - 0.5).clamp(min=0)
    lower = src.floor()
    taps = lower.long()[:, None] + torch.arange(2)
    weights = (1 - (src[:, None] - lower[:, None] - torch.arange(2)).abs()).clamp(min=0)
    return taps.clamp(0, side - 1), weights


def _one_segment_per_grid(grid_thw):
    return torch.nn.functional.pad(grid_thw.prod(-1).cumsum(0), (1, 0)).to(torch.int32)


def _swapped(rotary):
    return lambda positions, dtype: rotary(positions.flip(0), dtype)


def test_tolerance_calibration(pair, monkeypatch):
    ref, ours = pair
    pixels, grid = media()
    expected = run_reference(ref, pixels, grid)
    try:
        set_attention(ref, "eager")
        assert worst(run_reference(ref, pixels, grid), expected) < TOL / 10
    finally:
        set_attention(ref, "sdpa")
    rotary = ours.rotary.forward
    variants = {
        "attention across frames": lambda m: m.setattr(vision_encoder, "frame_seqlens", _one_segment_per_grid),
        "half-pixel interpolation": lambda m: m.setattr(vision_encoder, "_hat_taps", _half_pixel_taps),
        "rows and columns swapped": lambda m: m.setattr(ours.rotary, "forward", _swapped(rotary)),
    }
    for name, apply in variants.items():
        with monkeypatch.context() as m:
            apply(m)
            moved = worst(run_ours(ours, pixels, grid), expected)
        assert moved > WRONG, f"{name} moved the output by only {moved:.2e}"


def test_other_config_unsorted_deepstack_and_smaller_table():
    """Deepstack layers listed out of order (features come in layer order) and a 6 x 6 position table."""
    ref, ours = build_pair({"deepstack_visual_indexes": [2, 0], "num_position_embeddings": 36}, seed=3)
    pixels, grid = media()
    pixels, grid = pixels[: int(grid[:2].prod(-1).sum())], grid[:2]
    assert worst(run_ours(ours, pixels, grid), run_reference(ref, pixels, grid)) < TOL


def test_grids_of_one_merge_block_and_many_frames(pair):
    """Smallest grids (2 x 2 patches, where corner alignment divides by zero without care) and 5 frame pairs."""
    ref, ours = pair
    torch.manual_seed(0)
    grid = torch.tensor([[1, 2, 2], [5, 2, 4], [1, 4, 2]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 1536)
    assert worst(run_ours(ours, pixels, grid), run_reference(ref, pixels, grid)) < TOL


def test_bad_inputs_raise_input_errors(pair):
    _, ours = pair
    with pytest.raises(InputError, match="pixel_values"):
        ours(torch.zeros(16, 100), torch.tensor([[1, 4, 4]]))
    with pytest.raises(InputError, match="describes 16 patches"):
        ours(torch.zeros(12, 1536), torch.tensor([[1, 4, 4]]))
    with pytest.raises(InputError, match="multiples of 2"):
        ours(torch.zeros(12, 1536), torch.tensor([[1, 4, 3]]))


def test_layout_matches_the_released_checkpoint():
    prefix = "thinker.visual."
    ours = our_names_with_prefix(prefix)
    assert ours and ours == released_names_with_prefix(prefix)
