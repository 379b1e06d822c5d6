"""Token counts and TM-RoPE position ids, as small pure functions.

The audio length rule lives here because both the processor (how many `<|audio_pad|>` tokens to write) and
the audio encoder (how many features it returns) must agree on it.

TM-RoPE gives every prompt token three position ids (temporal, height, width), laid out left to right:
- text, and the start/end markers around media, count up by one on all three axes;
- audio tokens (one per ~80 ms) also count up by one;
- an image's merged patches share one temporal id and take row / column ids from the merged grid;
- a video's frames take temporal ids from their timestamps (`second_per_grid * position_id_per_seconds`);
- a video with its own audio track (`use_audio_in_video`) interleaves video frames and audio tokens by
  temporal id;
- each item starts one past the largest id of what came before it.
Ids are float32 (video timestamps may be fractional) and every addition below happens in float32 in the same
order as in the released implementation, so fractional ids round the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError


def _ceil_half(n):
    # One stride-2, kernel-3, padding-1 convolution: ceil(n / 2) outputs (0 for an empty input).
    return -(-n // 2)


def audio_token_count(mel_frames, n_window: int = 50):
    """Audio tokens the AuT encoder emits for `mel_frames` log-mel frames (int or integer tensor).

    The encoder cuts the features into chunks of `2 * n_window` frames and runs three stride-2 convolutions
    on each chunk separately, so a full chunk of 100 frames gives 13 tokens (one per 80 ms, nearly) and the
    tail chunk gives ceil(ceil(ceil(rest / 2) / 2) / 2).
    """
    chunk = 2 * n_window
    per_chunk = _ceil_half(_ceil_half(_ceil_half(chunk)))
    rest = mel_frames % chunk
    return (mel_frames // chunk) * per_chunk + _ceil_half(_ceil_half(_ceil_half(rest)))


def text_positions(attention_mask, shape, device=None):
    """TM-RoPE ids [3, B, T] for text: equal on all axes, counting real tokens only (left padding gets 1,
    as the reference writes; padded positions are masked anyway)."""
    import torch

    B, T = shape
    if attention_mask is None:
        return torch.arange(T, device=device, dtype=torch.float32).expand(3, B, T)
    mask = attention_mask.bool()
    pos = mask.float().cumsum(-1) - 1
    return pos.masked_fill(~mask, 1.0).expand(3, B, T)


def continue_positions(position_ids: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """Ids [3, B, steps] for the next `steps` tokens after `position_ids` [3, B, T]: the last id of each row
    plus 1, 2, ... on all three axes (what decoding after a multimodal prompt uses)."""
    offsets = torch.arange(1, steps + 1, device=position_ids.device, dtype=position_ids.dtype)
    return position_ids[..., -1:] + offsets


# ---- what positions depend on ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MediaLayout:
    """Token ids and constants that TM-RoPE positions depend on."""

    image_token_id: int
    video_token_id: int
    audio_token_id: int
    vision_start_token_id: int
    audio_start_token_id: int
    spatial_merge_size: int
    position_id_per_seconds: float
    n_window: int = 50

    @classmethod
    def of(cls, cfg) -> MediaLayout:
        """From a ThinkerConfig (or any config with the same token-id fields, e.g. the talker's)."""
        vision, audio = getattr(cfg, "vision", None), getattr(cfg, "audio", None)
        return cls(
            cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id, cfg.vision_start_token_id,
            cfg.audio_start_token_id,
            vision.spatial_merge_size if vision is not None else cfg.spatial_merge_size,
            cfg.position_id_per_seconds,
            audio.n_window if audio is not None else 50,
        )


# ---- one function per modality: ids [3, n] for an item starting at `start` (a float32 scalar tensor) ------
def text_span(start: torch.Tensor, n: int) -> torch.Tensor:
    """Text, markers and audio: consecutive ids, equal on the three axes."""
    return torch.arange(n, dtype=torch.float32).expand(3, n) + start


def grid_span(start: torch.Tensor, t_index: torch.Tensor, grid_thw, merge: int) -> torch.Tensor:
    """Merged patches of an image or video: frame k has temporal id t_index[k], rows and columns count the
    merged grid; frames in order, each in raster order."""
    frames = t_index.shape[0]
    h, w = int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    t = t_index.float().view(-1, 1).expand(-1, h * w).flatten()
    rows = torch.arange(h, dtype=torch.float32).view(1, -1, 1).expand(frames, -1, w).flatten()
    cols = torch.arange(w, dtype=torch.float32).view(1, 1, -1).expand(frames, h, -1).flatten()
    return torch.stack([t, rows, cols]) + start


def image_span(start: torch.Tensor, grid_thw, layout: MediaLayout) -> torch.Tensor:
    t_index = torch.arange(int(grid_thw[0])) * layout.position_id_per_seconds
    return grid_span(start, t_index, grid_thw, layout.spatial_merge_size)


def video_span(start: torch.Tensor, grid_thw, second_per_grid: torch.Tensor, layout: MediaLayout) -> torch.Tensor:
    """Frame k (of temporal patches) sits at k * second_per_grid seconds, `position_id_per_seconds` ids each."""
    t_index = torch.arange(int(grid_thw[0])) * second_per_grid * layout.position_id_per_seconds
    return grid_span(start, t_index, grid_thw, layout.spatial_merge_size)


def interleave_by_time(video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge video ids [3, nv] and audio ids [3, na] by temporal id (video first on ties), as a video's tokens
    and its audio track's tokens are written into the prompt.

    Also returns the trailing run of the merged sequence that comes from one source only (what follows the
    last token of the source that ends first): the end marker continues after the largest id in that run.
    """
    merged_src = torch.cat([torch.zeros(video.shape[1]), torch.ones(audio.shape[1])])
    order = torch.sort(torch.cat([video[0], audio[0]]), stable=True).indices
    merged, src = torch.cat([video, audio], dim=1)[:, order], merged_src[order]
    if merged.shape[1] == 0:
        return merged, merged
    switches = (src != src[-1]).nonzero()
    tail_start = int(switches[-1]) + 1 if len(switches) else 0
    return merged, merged[:, tail_start:]


# ---- a prompt row ------------------------------------------------------------------------------------------
@dataclass
class _Media:
    """Grids and audio lengths of the whole batch, consumed in reading order across rows."""

    image_grid_thw: torch.Tensor | None
    video_grid_thw: torch.Tensor | None
    second_per_grid: torch.Tensor | None
    audio_tokens: torch.Tensor | None
    image: int = 0
    video: int = 0
    audio: int = 0

    def next_image(self):
        self.image += 1
        return _take(self.image_grid_thw, self.image - 1, "image_grid_thw", "image")

    def next_video(self):
        self.video += 1
        grid = _take(self.video_grid_thw, self.video - 1, "video_grid_thw", "video")
        seconds = _take(self.second_per_grid, self.video - 1, "video_second_per_grid", "video")
        return grid, seconds

    def next_audio(self) -> int:
        self.audio += 1
        return int(_take(self.audio_tokens, self.audio - 1, "feature_attention_mask", "audio"))


def _take(values, i: int, name: str, what: str):
    if values is None or i >= len(values):
        have = 0 if values is None else len(values)
        raise InputError(f"{name}: the prompt has more {what} items than the {have} entries given")
    return values[i]


def _find(ids: list[int], token: int, start: int) -> int | None:
    try:
        return ids.index(token, start)
    except ValueError:
        return None


def _row_items(ids: torch.Tensor, layout: MediaLayout) -> tuple[int, int, int, int]:
    """How many images, videos (plain or with their audio track), audios (standalone or a video's track) and
    videos with their audio track the row holds.

    Read from the tokens rather than from `use_audio_in_video`: a batch may mix videos with and without an
    audio track (the processor interleaves only the videos that have one), and each must get its own layout.
    """
    after_vision = ids[1:][ids[:-1] == layout.vision_start_token_id]
    images = int((after_vision == layout.image_token_id).sum())
    plain = int((after_vision == layout.video_token_id).sum())
    with_track = int((after_vision == layout.audio_start_token_id).sum())
    return images, plain + with_track, int((ids == layout.audio_start_token_id).sum()), with_track


def item_positions(kind: str, start: torch.Tensor, media: _Media, layout: MediaLayout):
    """Ids [3, n] of one media item's placeholders, and the run of them whose largest id the item's end
    markers follow (the whole item, except for a video with its audio track)."""
    if kind == "audio":
        span = text_span(start, media.next_audio())
    elif kind == "image":
        span = image_span(start, media.next_image(), layout)
    elif kind == "video":
        span = video_span(start, *media.next_video(), layout)
    else:
        n_audio = media.next_audio()
        grid, seconds = media.next_video()
        return interleave_by_time(video_span(start, grid, seconds, layout), text_span(start, n_audio))
    return span, span


def row_positions(ids: list[int], layout: MediaLayout, media: _Media) -> torch.Tensor:
    """Ids [3, len(ids)] for one unpadded prompt row: text runs and media items in reading order.

    Whether a video is interleaved with its audio track is read from its tokens (`<|vision_start|>` then
    `<|audio_start|>`), not from a flag."""
    ids_t = torch.tensor(ids, dtype=torch.long)
    images, videos, audios, with_track = _row_items(ids_t, layout)
    n_items = images + videos + audios - with_track  # a video with its track is one item
    has_vision = layout.image_token_id in ids or layout.video_token_id in ids
    has_audio = layout.audio_token_id in ids
    pieces: list[torch.Tensor] = []
    last_max = None  # largest id of the last piece placed: what follows starts one past it
    cursor = 0  # index of the first token not yet placed

    def place(piece: torch.Tensor, tail: torch.Tensor | None = None) -> None:
        nonlocal last_max
        if piece.shape[1]:
            pieces.append(piece)
            last_max = (piece if tail is None else tail).max()

    for _ in range(n_items):
        start = last_max + 1 if last_max is not None else torch.tensor(0.0)
        vision_at = _find(ids, layout.vision_start_token_id, cursor) if has_vision and (images or videos) else None
        audio_at = _find(ids, layout.audio_start_token_id, cursor) if has_audio and audios else None
        if vision_at is None and audio_at is None:
            raise InputError("input_ids: a media item's start marker is missing (count the placeholders)")
        at = min(i for i in (vision_at, audio_at) if i is not None)
        kind = _item_kind(ids, at, audio_at, layout)
        markers = 2 if kind == "audio_in_video" else 1  # <vision_start><audio_start> ... <audio_end><vision_end>
        if at > cursor:  # the text before the item
            place(text_span(start, at - cursor))
            start = start + (at - cursor)
        place(text_span(start, markers))
        span, tail = item_positions(kind, start + markers, media, layout)
        place(span, tail)
        _check_run(ids_t, at + markers, span.shape[1], kind, layout)
        images -= kind == "image"
        videos -= kind in ("video", "audio_in_video")
        audios -= kind in ("audio", "audio_in_video")
        cursor = at + markers + span.shape[1] + markers
        place(text_span(last_max + 1, markers))
    if cursor < len(ids):  # the text after the last item
        start = last_max + 1 if last_max is not None else torch.tensor(0.0)
        place(text_span(start, len(ids) - cursor))
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0)


def _check_run(ids: torch.Tensor, start: int, n: int, kind: str, layout: MediaLayout) -> None:
    """The item's placeholders must fill exactly the n tokens after its start marker(s)."""
    wanted = {
        "audio": [layout.audio_token_id], "image": [layout.image_token_id], "video": [layout.video_token_id],
        "audio_in_video": [layout.audio_token_id, layout.video_token_id],
    }[kind]
    run = ids[start : start + n + 1]
    inside = torch.isin(run, torch.tensor(wanted))
    if len(run) != n + 1 or not bool(inside[:n].all()) or bool(inside[n]):
        got = int(inside.cumprod(0).sum())
        raise InputError(
            f"input_ids: a {kind.replace('_', ' ')} item at index {start} has {got} placeholder tokens but its "
            f"grid / audio length gives {n}; the placeholder counts do not match the media inputs"
        )


def _item_kind(ids: list[int], at: int, audio_at: int | None, layout: MediaLayout) -> str:
    if at == audio_at:
        return "audio"
    follower = ids[at + 1] if at + 1 < len(ids) else None
    if follower == layout.image_token_id:
        return "image"
    if follower == layout.video_token_id:
        return "video"
    if audio_at == at + 1:
        return "audio_in_video"
    raise InputError(
        f"input_ids: <|vision_start|> at index {at} is followed by token {follower}, expected an image or video "
        "placeholder (or <|audio_start|> for a video with use_audio_in_video)"
    )


def rope_index(cfg, input_ids, attention_mask, audio_mel_lengths=None, image_grid_thw=None, video_grid_thw=None,
               video_second_per_grid=None, use_audio_in_video=False):
    """TM-RoPE position ids [3, B, T] (float) for a prompt with text, audio, images and video.

    Without any image or video grid the ids are plain text ids (`text_positions`), audio included, as the
    released model computes them. Otherwise left padding gets id 0; `attention_mask=None` means no padding.
    `use_audio_in_video` is accepted as the reference's `get_rope_index` takes it, but not needed: the tokens
    show which videos carry their audio track (see `row_positions`).
    """
    if image_grid_thw is None and video_grid_thw is None:
        return text_positions(attention_mask, input_ids.shape, input_ids.device)
    layout = MediaLayout.of(cfg)
    media = _Media(
        _as_cpu(image_grid_thw), _as_cpu(video_grid_thw),
        None if video_second_per_grid is None else torch.as_tensor(video_second_per_grid).float().cpu().reshape(-1),
        None if audio_mel_lengths is None else audio_token_count(_as_cpu(audio_mel_lengths).long(), layout.n_window),
    )
    B, T = input_ids.shape
    keep = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.cpu() == 1
    out = torch.zeros(3, B, T, dtype=torch.float32)
    for b, row in enumerate(input_ids.cpu()):
        ids = row[keep[b]].tolist()
        pos = row_positions(ids, layout, media)
        if pos.shape[1] != len(ids):
            raise InputError(
                f"input_ids: row {b} has {len(ids)} tokens but its media grids and audio lengths account for "
                f"{pos.shape[1]}; the placeholder counts do not match the media inputs"
            )
        out[:, b, keep[b]] = pos
    return out.to(input_ids.device)


def _as_cpu(x):
    return None if x is None else torch.as_tensor(x).cpu()
