"""Property-based tests (hypothesis) of the processor and the position-id functions (issue 9).

For random audio lengths and rates, image sizes and aspect ratios, frame counts, and mixes of items over a batch:
- nothing raises anything but our errors (an InputError for a medium that cannot be used, with its name);
- every placeholder count equals what the encoders emit: audio tokens = `audio_token_count` of the clip's mel
  frames = rows of the tiny AudioEncoder; image / video tokens = grid product / merge² = rows of the tiny
  VisionEncoder; and the tiny thinker accepts the batch (it checks the counts again when it scatters);
- `rope_index` gives one (t, h, w) id triple per token, text tokens equal ids on the three axes, increasing.
Random token sequences with inconsistent grids and lengths reach `rope_index` too: our error or a full answer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from test_positions import AUDIO, AUDIO_END, AUDIO_START, IMAGE, VIDEO, VISION_END, VISION_START, Prompt, batch

from qwen3omni.demo import byte_level_tokenizer, tiny_config
from qwen3omni.errors import InputError, Qwen3OmniError
from qwen3omni.model.positions import audio_token_count, rope_index
from qwen3omni.model.thinker import Thinker
from qwen3omni.processing import Processor

# Modest example counts: the five tests together take ~30 s on two busy CPU cores; derandomize keeps CI stable.
SETTINGS = settings(max_examples=8, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MERGE = 2


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    cfg = tiny_config()
    with torch.no_grad():
        thinker = Thinker(cfg.thinker).eval()
    return cfg, thinker, Processor(byte_level_tokenizer())


def noise(n: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def picture(h: int, w: int, channels: int, seed: int) -> np.ndarray:
    shape = (h, w) if channels == 0 else (h, w, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def counts(ids: torch.Tensor, cfg) -> dict[str, int]:
    t = cfg.thinker
    return {k: int((ids == i).sum()) for k, i in (("audio", t.audio_token_id), ("image", t.image_token_id),
                                                  ("video", t.video_token_id))}


def check_positions(cfg, batch_: dict) -> torch.Tensor:
    """rope_index on a processor batch: one id triple per token; text tokens equal on all axes, increasing."""
    ids, mask = batch_["input_ids"], batch_["attention_mask"]
    fam = batch_.get("feature_attention_mask")
    pos = rope_index(cfg.thinker, ids, mask, None if fam is None else fam.sum(-1), batch_.get("image_grid_thw"),
                     batch_.get("video_grid_thw"), batch_.get("video_second_per_grid"),
                     batch_.get("use_audio_in_video", False))
    assert pos.shape == (3, *ids.shape) and bool(torch.isfinite(pos).all())
    t = cfg.thinker
    media = torch.isin(ids, torch.tensor([t.audio_token_id, t.image_token_id, t.video_token_id]))
    for b in range(ids.shape[0]):
        text = mask[b].bool() & ~media[b]
        p = pos[:, b, text]
        assert torch.equal(p[0], p[1]) and torch.equal(p[1], p[2])
        assert bool((p[0, 1:] > p[0, :-1]).all()), "text ids must increase"
        assert float(pos[:, b, mask[b].bool()][:, 0].abs().max()) == 0.0, "each row starts at id 0"
    return pos


def check_encoders(parts, batch_: dict) -> None:
    """Placeholder counts = encoder output counts, per modality, in the tiny thinker's own forward (hooks record
    what its audio and vision encoders emit); the thinker then scatters them into the placeholders."""
    cfg, thinker, _ = parts
    emitted = {"audio": [], "visual": []}
    hooks = [thinker.audio_tower.register_forward_hook(lambda m, a, out: emitted["audio"].append(out.shape[0])),
             thinker.visual.register_forward_hook(lambda m, a, out: emitted["visual"].append(out))]
    try:
        with torch.no_grad():
            out = thinker(**batch_, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    assert out.logits.shape[:2] == (batch_["input_ids"].shape[0], 1)
    found = counts(batch_["input_ids"], cfg)
    if "input_features" in batch_:
        lengths = batch_["feature_attention_mask"].sum(-1)
        assert [found["audio"]] == emitted["audio"]
        assert found["audio"] == int(audio_token_count(lengths, cfg.thinker.audio.n_window).sum())
    else:
        assert found["audio"] == 0 and not emitted["audio"]
    visual = iter(emitted["visual"])
    for kind, grid in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
        if grid in batch_:
            merged, deepstack = next(visual)
            assert found[kind] == merged.shape[0] == int(batch_[grid].prod(-1).sum()) // MERGE**2
            assert all(d.shape == merged.shape for d in deepstack)
        else:
            assert found[kind] == 0
    check_positions(cfg, batch_)


def audio_item(samples: int, rate: int, seed: int) -> dict:
    return {"type": "audio", "audio": noise(samples, seed), "sampling_rate": rate}


# ---- one modality at a time --------------------------------------------------------------------------------------
@SETTINGS
@given(clips=st.lists(st.tuples(st.integers(0, 16000 * 9), st.sampled_from([8000, 16000, 24000, 44100])),
                      min_size=1, max_size=3),
       seed=st.integers(0, 2**16))
def test_audio_lengths(parts, clips, seed):
    cfg, _, processor = parts
    conversation = [{"role": "user", "content": [audio_item(n, rate, seed + i) for i, (n, rate) in enumerate(clips)]}]
    try:
        out = processor(conversation)
    except InputError as e:
        resampled = [math.floor(n * 16000 / rate) if rate != 16000 else n for n, rate in clips]
        assert min(resampled) <= 201 + 2, f"a usable clip was refused: {e}"
        assert "audio" in str(e)
        return
    mask = out["feature_attention_mask"]
    for row, (n, rate) in zip(mask, clips):
        samples = round(n * 16000 / rate)
        assert abs(int(row.sum()) - math.ceil(samples / 160)) <= 1, "features must cover every sample"
    check_encoders(parts, out)


@SETTINGS
@given(sizes=st.lists(st.tuples(st.integers(1, 400), st.integers(1, 400), st.sampled_from([0, 1, 3, 4])),
                      min_size=1, max_size=3),
       seed=st.integers(0, 2**16))
def test_image_sizes_and_aspect_ratios(parts, sizes, seed):
    cfg, _, processor = parts
    images = [{"type": "image", "image": picture(h, w, c, seed + i)} for i, (h, w, c) in enumerate(sizes)]
    try:
        out = processor([{"role": "user", "content": images}])
    except InputError as e:
        # channels-first wins for [C, H, W]-looking arrays, so compare with the aspect ratio either way
        assert any(max(h, w) / min(h, w) > 200 or min(h, w) < 5 for h, w, _ in sizes), f"refused: {e}"
        assert "aspect ratio" in str(e) or "image" in str(e)
        return
    grid = out["image_grid_thw"]
    assert grid.shape == (len(sizes), 3) and bool((grid[:, 0] == 1).all())
    assert bool((grid[:, 1:] % MERGE == 0).all())
    check_encoders(parts, out)


@settings(SETTINGS, max_examples=6)
@given(frames=st.integers(1, 6), h=st.integers(4, 64), w=st.integers(4, 64), fps=st.floats(0.5, 30.0),
       seed=st.integers(0, 2**16))
def test_video_frame_counts(parts, frames, h, w, fps, seed):
    cfg, _, processor = parts
    video = np.stack([picture(h, w, 3, seed + k) for k in range(frames)])
    try:
        out = processor([{"role": "user", "content": [{"type": "video", "video": video, "fps": fps}]}])
    except InputError as e:
        assert max(h, w) / min(h, w) > 200 or "video" in str(e), f"refused: {e}"
        return
    grid = out["video_grid_thw"]
    assert int(grid[0, 0]) == math.ceil(frames / 2), "frames are padded to whole temporal patches, none dropped"
    assert torch.allclose(out["video_second_per_grid"], torch.tensor([2 / fps]))
    check_encoders(parts, out)


# ---- mixes of items over a batch -----------------------------------------------------------------------------------
ITEM = st.one_of(
    st.tuples(st.just("text"), st.text(alphabet="abc xyz?", min_size=1, max_size=6)),
    st.tuples(st.just("audio"), st.integers(300, 16000 * 4)),
    st.tuples(st.just("image"), st.integers(8, 200), st.integers(8, 200)),
    st.tuples(st.just("video"), st.integers(1, 5), st.integers(8, 64), st.integers(8, 64), st.booleans(),
              st.integers(1600, 16000 * 3)),
)


@SETTINGS
@given(rows=st.lists(st.lists(ITEM, min_size=1, max_size=4), min_size=1, max_size=2), seed=st.integers(0, 2**16))
@example(rows=[[("video", 3, 40, 40, True, 16000), ("text", "x"), ("video", 2, 32, 48, False, 0)],
               [("audio", 4000), ("image", 20, 90), ("video", 1, 16, 16, True, 2000)]], seed=1)
def test_mixes_of_items(parts, rows, seed):
    """Rendered prompts plus flat media lists (`Processor.process`), videos with or without their audio track:
    a batch may mix both, and each video gets its own position layout."""
    cfg, _, processor = parts
    texts, audio, images, videos, tracks = [], [], [], [], []
    placeholder = {"audio": "<|audio_start|><|audio_pad|><|audio_end|>",
                   "image": "<|vision_start|><|image_pad|><|vision_end|>",
                   "video": "<|vision_start|><|video_pad|><|vision_end|>"}
    for r, items in enumerate(rows):
        body = ""
        for i, item in enumerate(items):
            s = seed + 10 * r + i
            kind = item[0]
            body += item[1] if kind == "text" else placeholder[kind]
            if kind == "audio":
                audio.append(noise(item[1], s))
            elif kind == "image":
                images.append(picture(item[1], item[2], 3, s))
            elif kind == "video":
                videos.append(np.stack([picture(item[2], item[3], 3, s + k) for k in range(item[1])]))
                tracks.append(noise(item[5], s) if item[4] else None)
        texts.append(f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n")
    use_track = any(t is not None for t in tracks)
    out = processor.process(texts, images=images, videos=videos, audio=audio, use_audio_in_video=use_track,
                            video_audio=tracks)
    assert out.get("use_audio_in_video", False) == use_track
    check_encoders(parts, out)
    if videos:  # every video token has the grid layout: row and column ids are not all equal to the temporal one
        pos = check_positions(cfg, out)
        video_pos = pos[:, out["input_ids"] == cfg.thinker.video_token_id]
        per_video = (out["video_grid_thw"].prod(-1) // MERGE**2).tolist()
        for p, grid in zip(video_pos.split(per_video, dim=1), out["video_grid_thw"].tolist()):
            if grid[1] > MERGE or grid[2] > MERGE:
                assert not torch.equal(p[1], p[2]) or not torch.equal(p[0], p[1])


# ---- the position functions on arbitrary (often inconsistent) inputs ----------------------------------------------
SEGMENT = st.one_of(
    st.tuples(st.just("text"), st.integers(1, 5)),
    st.tuples(st.just("audio"), st.integers(0, 700)),
    st.tuples(st.just("image"), st.integers(1, 2), st.integers(1, 4), st.integers(1, 4)),
    st.tuples(st.just("video"), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.floats(0.1, 3.0)),
    st.tuples(st.just("both"), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.floats(0.1, 3.0),
              st.integers(1, 700)),
)
STRAY = [AUDIO, AUDIO_START, AUDIO_END, IMAGE, VIDEO, VISION_START, VISION_END]


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(rows=st.lists(st.lists(SEGMENT, min_size=1, max_size=4), min_size=1, max_size=3),
       damage=st.tuples(st.sampled_from(["none", "cut", "stray", "grid", "drop", "mel", "seconds"]),
                        st.integers(0, 10**6), st.sampled_from(STRAY)),
       use_audio_in_video=st.booleans())
def test_rope_index_never_crashes(rows, damage, use_audio_in_video):
    cfg = tiny_config().thinker
    prompts = []
    for segments in rows:
        p = Prompt()
        for seg in segments:
            kind, *args = seg
            if kind == "text":
                p.text(args[0])
            elif kind == "audio":
                p.audio(args[0])
            elif kind == "image":
                p.image(args[0], MERGE * args[1], MERGE * args[2])
            elif kind == "video":
                p.video(args[0], MERGE * args[1], MERGE * args[2], args[3])
            else:
                p.video_with_audio(args[0], MERGE * args[1], MERGE * args[2], args[3], args[4])
        prompts.append(p)
    inputs = batch(*prompts)
    how, at, token = damage
    if how != "none":
        ids = inputs["input_ids"]
        if how == "cut" and ids.shape[1] > 1:
            keep = 1 + at % (ids.shape[1] - 1)
            inputs["input_ids"], inputs["attention_mask"] = ids[:, -keep:], inputs["attention_mask"][:, -keep:]
        elif how == "stray":
            ids[at % ids.shape[0], at % ids.shape[1]] = token
        elif how == "grid" and inputs["image_grid_thw"] is not None:
            inputs["image_grid_thw"][at % len(inputs["image_grid_thw"]), 1 + at % 2] += MERGE
        elif how == "drop" and inputs["video_grid_thw"] is not None:
            inputs["video_grid_thw"] = inputs["video_grid_thw"][:-1]
        elif how == "mel" and inputs["audio_mel_lengths"] is not None:
            inputs["audio_mel_lengths"][at % len(inputs["audio_mel_lengths"])] += 1 + at % 300
        elif how == "seconds" and inputs["video_second_per_grid"] is not None:
            inputs["video_second_per_grid"] = inputs["video_second_per_grid"][:-1]
    try:
        pos = rope_index(cfg, inputs["input_ids"], inputs["attention_mask"], inputs["audio_mel_lengths"],
                         inputs["image_grid_thw"], inputs["video_grid_thw"], inputs["video_second_per_grid"],
                         use_audio_in_video)
    except Qwen3OmniError as e:
        assert isinstance(e, InputError)
        assert how != "none", f"a consistent prompt was refused: {e}"
        event("refused")
        return
    event("answered" if how == "none" else "answered despite damage")
    assert pos.shape == (3, *inputs["input_ids"].shape)
