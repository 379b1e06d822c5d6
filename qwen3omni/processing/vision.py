"""Images and video frames into vision-encoder patches.

Both go the same way: RGB, "smart resize" to multiples of 32 (16-pixel patches merged 2 x 2) inside a pixel
budget, normalise with the CLIP mean and std, then cut into `[N, 3 * 2 * 16 * 16]` rows ordered so that each
2 x 2 block of neighbouring patches (the merger's input) is contiguous. An image is one frame repeated over
the temporal patch of 2.

Images are resized with PIL's bicubic filter on uint8 pixels, as transformers' PIL-backed
`Qwen2VLImageProcessorPil` does; video frames with torch's antialiased bicubic interpolation on uint8, as
its torchvision-backed video processor does. The two resamplers differ slightly, so each path keeps its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..errors import InputError, MissingFileError, describe

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class VisionSettings:
    """Patch geometry, pixel budget and normalisation (the released image settings are the defaults)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 3136
    max_pixels: int = 12845056
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: int = PIL.Image.Resampling.BICUBIC

    @property
    def factor(self) -> int:
        """Side lengths are multiples of this: one merged patch."""
        return self.patch_size * self.merge_size


# Videos get a per-frame budget of 128..768 merged patches (transformers' Qwen3-Omni processor defaults).
VIDEO_SETTINGS = VisionSettings(min_pixels=128 * 32 * 32, max_pixels=768 * 32 * 32)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size an image is resized to: sides multiples of `factor`, area within [min_pixels, max_pixels].

    Each side is first rounded to the nearest multiple (Python's round, ties to even); if the area then
    leaves the budget, both sides are scaled by the same factor (down: floored, up: ceiled) to get back in.
    """
    if min(height, width) <= 0:
        raise InputError(f"image size: expected a non-empty image, got height={height}, width={width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InputError(
            f"image size: aspect ratio must be at most {MAX_ASPECT_RATIO}, got {height}x{width} "
            f"({max(height, width) / min(height, width):.1f})"
        )
    new_h, new_w = factor * round(height / factor), factor * round(width / factor)
    area = height * width
    if new_h * new_w > max_pixels:
        shrink = math.sqrt(area / max_pixels)
        new_h = max(factor, factor * math.floor(height / shrink / factor))
        new_w = max(factor, factor * math.floor(width / shrink / factor))
    elif new_h * new_w < min_pixels:
        grow = math.sqrt(min_pixels / area)
        new_h = factor * math.ceil(height * grow / factor)
        new_w = factor * math.ceil(width * grow / factor)
    return new_h, new_w


def patchify(frames_TCHW: torch.Tensor, settings: VisionSettings) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Cut normalised frames into encoder rows; returns `patches [t*h*w, C*T*p*p]` and the grid `(t, h, w)`.

    The frame count is padded to a multiple of the temporal patch by repeating the last frame.
    """
    p, m, tp = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    if short := -frames_TCHW.shape[0] % tp:
        frames_TCHW = torch.cat([frames_TCHW, frames_TCHW[-1:].expand(short, -1, -1, -1)])
    T, C, H, W = frames_TCHW.shape
    gt, gh, gw = T // tp, H // p, W // p
    blocks = frames_TCHW.reshape(gt, tp, C, gh // m, m, p, gw // m, m, p)
    # -> [t, h-block, w-block, h-in-block, w-in-block, C, tp, p, p]: one merged 2x2 group after another.
    rows = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, C * tp * p * p)
    return rows, (gt, gh, gw)


# ---------------------------------------------------------------------------------------------------------------
# Images


def load_image(source, name: str = "image") -> np.ndarray:
    """Any supported image input as an RGB uint8 array `[H, W, 3]`.

    `source` is a file path, a PIL image, or a numpy array / tensor: `[H, W]` grey, `[H, W, C]` or `[C, H, W]`
    with C in (1, 3, 4); channels-first wins when both readings fit. Floats are taken as [0, 1] and rounded to
    uint8. Transparency is composited onto white.
    """
    if isinstance(source, (str, Path)):
        source = _open_image(Path(source), name)
    if isinstance(source, PIL.Image.Image):
        return _pil_to_rgb(source, name)
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, name)
    raise InputError(f"{name}: expected a file path, PIL image, array or tensor, got {describe(source)}")


def _open_image(path: Path, name: str) -> PIL.Image.Image:
    if not path.is_file():
        raise MissingFileError(f"{name}: image file {str(path)!r} does not exist")
    try:
        with PIL.Image.open(path) as img:
            img.load()
            return img
    except (PIL.UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{name}: cannot read {str(path)!r} as an image: {e}") from None


def _pil_to_rgb(img: PIL.Image.Image, name: str) -> np.ndarray:
    if img.width == 0 or img.height == 0:
        raise InputError(f"{name}: the image is empty ({img.width}x{img.height} pixels)")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        white = PIL.Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = PIL.Image.alpha_composite(white, img.convert("RGBA"))
    return np.asarray(img.convert("RGB"))


def _channels_last(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        return np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        return array
    raise InputError(f"{name}: expected [H, W], [H, W, C] or [C, H, W] pixels with C in (1, 3, 4), "
                     f"got {describe(array)}")


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    hwc = _channels_last(array, name)
    if hwc.shape[0] == 0 or hwc.shape[1] == 0:
        raise InputError(f"{name}: the image is empty, got {describe(array)}")
    if hwc.dtype != np.uint8:
        hwc = _float_to_uint8(hwc, name)
    if hwc.shape[-1] == 1:
        return np.repeat(hwc, 3, axis=-1)
    if hwc.shape[-1] == 4:  # blend onto white, rounding as the reference does for arrays
        alpha = hwc[..., 3:] / 255
        return np.round(alpha * hwc[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(hwc)


def _float_to_uint8(hwc: np.ndarray, name: str) -> np.ndarray:
    if hwc.dtype.kind not in "fiu" or not np.isfinite(hwc).all():
        raise InputError(f"{name}: expected finite numeric pixels, got {describe(hwc)}")
    if hwc.dtype.kind == "f":
        if hwc.min() < 0 or hwc.max() > 1:
            raise InputError(f"{name}: float pixels must lie in [0, 1], got [{hwc.min()}, {hwc.max()}]")
        return np.round(hwc * 255).astype(np.uint8)
    if hwc.min() < 0 or hwc.max() > 255:
        raise InputError(f"{name}: integer pixels must lie in [0, 255], got [{hwc.min()}, {hwc.max()}]")
    return hwc.astype(np.uint8)


def _normalise_image(rgb_HWC: np.ndarray, settings: VisionSettings) -> torch.Tensor:
    # Same arithmetic as the reference: rescale in float64, then normalise in float32.
    scaled = (rgb_HWC.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(settings.image_mean, dtype=np.float32)
    std = np.asarray(settings.image_std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(((scaled - mean) / std).transpose(2, 0, 1)))


def image_patches(rgb_HWC: np.ndarray, settings: VisionSettings = VisionSettings()):
    """One RGB uint8 image into `(patches [h*w, 1536], grid (1, h, w))`."""
    height, width = rgb_HWC.shape[:2]
    new_h, new_w = smart_resize(height, width, settings.factor, settings.min_pixels, settings.max_pixels)
    resized = np.asarray(PIL.Image.fromarray(rgb_HWC).resize((new_w, new_h), resample=settings.resample))
    frame_CHW = _normalise_image(resized, settings)
    return patchify(frame_CHW[None].expand(settings.temporal_patch_size, -1, -1, -1), settings)


def process_images(images: Sequence, settings: VisionSettings = VisionSettings(), names=None):
    """Images (any form `load_image` takes) into `pixel_values [N, 1536]` and `image_grid_thw [n, 3]`."""
    rows, grids = [], []
    for i, image in enumerate(images):
        name = names[i] if names else f"image {i}"
        patches, grid = image_patches(load_image(image, name), settings)
        rows.append(patches)
        grids.append(grid)
    return torch.cat(rows), torch.tensor(grids, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------------
# Video frames


def frames_to_tensor(frames, name: str = "video") -> torch.Tensor:
    """Video frames as a uint8 tensor `[T, 3, H, W]`.

    `frames` is a `[T, H, W, C]` or `[T, C, H, W]` array / tensor (C in 1, 3, 4) or a list of images in any
    form `load_image` takes; all frames must have the same size.
    """
    if isinstance(frames, (np.ndarray, torch.Tensor)) and frames.ndim == 4:
        if frames.shape[0] == 0:
            raise InputError(f"{name}: the video has no frames")
        as_array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else frames
        if as_array.shape[1] in (1, 3, 4):
            as_array = np.moveaxis(as_array, 1, -1)
        frames = list(as_array)
    if not isinstance(frames, (list, tuple)):
        raise InputError(f"{name}: expected a video file path, a [T, H, W, C] array or a list of frames, "
                         f"got {describe(frames)}")
    if len(frames) == 0:
        raise InputError(f"{name}: the video has no frames")
    rgb = [load_image(frame, f"{name}, frame {i}") for i, frame in enumerate(frames)]
    sizes = {f.shape for f in rgb}
    if len(sizes) > 1:
        raise InputError(f"{name}: all frames must have the same size, got {sorted(sizes)}")
    return torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).contiguous()


def resize_frames(frames_TCHW: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize of uint8 frames, always with torch's native uint8 CPU kernel.

    That kernel (what torchvision uses on the CPU) rounds between its horizontal and vertical passes; a float
    resize on a GPU differs from it by up to ~12 levels near sharp edges, so frames on another device make a
    round trip through the CPU to stay identical to the reference.
    """
    if tuple(frames_TCHW.shape[-2:]) == tuple(size):
        return frames_TCHW
    resized = F.interpolate(frames_TCHW.cpu(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return resized.to(frames_TCHW.device)


def _normalise_frames(frames_TCHW: torch.Tensor, settings: VisionSettings) -> torch.Tensor:
    # Rescale and normalise fused into one step on the 0..255 scale, in float32 (the reference's arithmetic).
    scale = 1.0 / (1 / 255)
    mean = (torch.tensor(settings.image_mean, device=frames_TCHW.device) * scale)[:, None, None]
    std = (torch.tensor(settings.image_std, device=frames_TCHW.device) * scale)[:, None, None]
    return (frames_TCHW.to(torch.float32) - mean) / std


def video_patches(frames_TCHW: torch.Tensor, settings: VisionSettings = VIDEO_SETTINGS):
    """uint8 frames `[T, 3, H, W]` into `(patches [t*h*w, 1536], grid (t, h, w))`."""
    height, width = frames_TCHW.shape[-2:]
    size = smart_resize(height, width, settings.factor, settings.min_pixels, settings.max_pixels)
    return patchify(_normalise_frames(resize_frames(frames_TCHW, size), settings), settings)
