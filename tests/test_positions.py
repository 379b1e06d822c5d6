"""TM-RoPE position ids: identical to the reference's `get_rope_index` for every kind of prompt.

Prompts are built by hand with the real special-token ids and the placeholder counts the processor writes
(from the grids and `audio_token_count`), so no tokenizer is needed.
"""

from __future__ import annotations

import random

import pytest
import torch

from qwen3omni.config import Qwen3OmniConfig
from qwen3omni.errors import InputError
from qwen3omni.model import positions
from qwen3omni.model.positions import audio_token_count, continue_positions, interleave_by_time, rope_index

from reference import tiny_config

IM_START, IM_END, SYSTEM, USER, ASSISTANT, NEWLINE = 151644, 151645, 8948, 872, 77091, 198
VISION_START, VISION_END, IMAGE, VIDEO = 151652, 151653, 151655, 151656
AUDIO_START, AUDIO_END, AUDIO = 151669, 151670, 151675
PAD = 151643
MERGE, PPS, N_WINDOW = 2, 13, 50


@pytest.fixture(scope="module")
def cfg():
    return Qwen3OmniConfig.from_dict(tiny_config()).thinker


# ---- prompt building ---------------------------------------------------------------------------------------
class Prompt:
    """A token list plus the media inputs its placeholders stand for (in reading order)."""

    def __init__(self):
        self.ids: list[int] = []
        self.images, self.videos, self.seconds, self.mel = [], [], [], []
        self._word = 1000

    def text(self, n: int) -> Prompt:
        self.ids += list(range(self._word, self._word + n))
        self._word += n
        return self

    def turn(self, role: int, build=None) -> Prompt:
        self.ids += [IM_START, role, NEWLINE]
        if build is not None:
            build(self)
            self.ids += [IM_END, NEWLINE]
        return self

    def audio(self, mel_frames: int) -> Prompt:
        self.mel.append(mel_frames)
        self.ids += [AUDIO_START] + [AUDIO] * int(audio_token_count(mel_frames, N_WINDOW)) + [AUDIO_END]
        return self

    def image(self, t: int, h: int, w: int) -> Prompt:
        self.images.append([t, h, w])
        self.ids += [VISION_START] + [IMAGE] * (t * h * w // MERGE**2) + [VISION_END]
        return self

    def video(self, t: int, h: int, w: int, seconds: float) -> Prompt:
        self.videos.append([t, h, w])
        self.seconds.append(seconds)
        self.ids += [VISION_START] + [VIDEO] * (t * h * w // MERGE**2) + [VISION_END]
        return self

    def video_with_audio(self, t: int, h: int, w: int, seconds: float, mel_frames: int) -> Prompt:
        """Video and audio placeholders interleaved by time, as the processor writes them."""
        self.videos.append([t, h, w])
        self.seconds.append(seconds)
        self.mel.append(mel_frames)
        video_t = [k * seconds * PPS for k in range(t) for _ in range(h * w // MERGE**2)]
        n_audio = int(audio_token_count(mel_frames, N_WINDOW))
        run, v, a = [], 0, 0
        while v < len(video_t) and a < n_audio:
            if video_t[v] <= a:
                run.append(VIDEO)
                v += 1
            else:
                run.append(AUDIO)
                a += 1
        run += [VIDEO] * (len(video_t) - v) + [AUDIO] * (n_audio - a)
        self.ids += [VISION_START, AUDIO_START] + run + [AUDIO_END, VISION_END]
        return self


def batch(*prompts: Prompt):
    """Left-padded input_ids / attention_mask and the media of all rows, concatenated in row order."""
    T = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p.ids):] = torch.tensor(p.ids)
        mask[b, T - len(p.ids):] = 1
    images = [g for p in prompts for g in p.images]
    videos = [g for p in prompts for g in p.videos]
    seconds = [s for p in prompts for s in p.seconds]
    mel = [m for p in prompts for m in p.mel]
    return dict(
        input_ids=ids,
        attention_mask=mask,
        image_grid_thw=torch.tensor(images, dtype=torch.long) if images else None,
        video_grid_thw=torch.tensor(videos, dtype=torch.long) if videos else None,
        video_second_per_grid=torch.tensor(seconds, dtype=torch.float32) if seconds else None,
        audio_mel_lengths=torch.tensor(mel, dtype=torch.long) if mel else None,
    )


def reference_ids(reference_thinker, inputs, use_audio_in_video=False):
    pos, _ = reference_thinker.get_rope_index(
        inputs["input_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"], inputs["attention_mask"],
        use_audio_in_video, inputs["audio_mel_lengths"], inputs["video_second_per_grid"],
    )
    return pos


def ours(cfg, inputs, use_audio_in_video=False):
    return rope_index(cfg, use_audio_in_video=use_audio_in_video, **inputs)


def assert_identical(cfg, reference_thinker, inputs, use_audio_in_video=False):
    expected = reference_ids(reference_thinker, inputs, use_audio_in_video)
    got = ours(cfg, inputs, use_audio_in_video)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, expected.float()), (got - expected).abs().max()
    return got


def user_turn(build):
    return lambda p: p.turn(USER, build)


# ---- the cases of the issue --------------------------------------------------------------------------------
def test_text_only(cfg, tiny_checkpoint):
    p = Prompt().turn(SYSTEM, lambda p: p.text(5)).turn(USER, lambda p: p.text(9)).turn(ASSISTANT)
    got = assert_identical(cfg, tiny_checkpoint.reference.thinker, batch(p))
    assert torch.equal(got[0, 0], torch.arange(len(p.ids), dtype=torch.float32))


def test_one_audio(cfg, tiny_checkpoint):
    # Without an image or video grid the reference gives audio plain consecutive ids, like text.
    p = Prompt().turn(USER, lambda p: p.text(3).audio(713).text(4)).turn(ASSISTANT)
    assert_identical(cfg, tiny_checkpoint.reference.thinker, batch(p))


def test_one_image(cfg, tiny_checkpoint):
    p = Prompt().turn(USER, lambda p: p.text(2).image(1, 14, 20).text(6)).turn(ASSISTANT)
    got = assert_identical(cfg, tiny_checkpoint.reference.thinker, batch(p))
    first = p.ids.index(IMAGE)
    assert got[:, 0, first].tolist() == [first] * 3  # the grid starts one past the <|vision_start|> id
    assert got[1, 0, first + 9] == first + 0 and got[2, 0, first + 9] == first + 9  # row 0, column 9


def test_one_video(cfg, tiny_checkpoint):
    # 12 fps with 2 frames per temporal patch: 1/6 s per grid -> fractional temporal ids (13/6 apart).
    p = Prompt().turn(USER, lambda p: p.video(5, 6, 8, 2 / 12).text(7)).turn(ASSISTANT)
    got = assert_identical(cfg, tiny_checkpoint.reference.thinker, batch(p))
    assert got.frac().abs().sum() > 0


def test_video_with_audio_in_video(cfg, tiny_checkpoint):
    p = Prompt().turn(USER, lambda p: p.video_with_audio(4, 4, 6, 0.5, 430).text(3)).turn(ASSISTANT)
    assert_identical(cfg, tiny_checkpoint.reference.thinker, batch(p), use_audio_in_video=True)


def test_video_outlasting_its_audio(cfg, tiny_checkpoint):
    # The audio track ends before the last frames: the end markers continue after the trailing video run.
    p = Prompt().turn(USER, lambda p: p.video_with_audio(6, 8, 8, 1.0, 60).text(3)).turn(ASSISTANT)
    assert_identical(cfg, tiny_checkpoint.reference.thinker, batch(p), use_audio_in_video=True)


def test_audio_in_video_ending_with_an_audio_run(cfg, tiny_checkpoint):
    # One grid of 4x4 merged patches, then 2 audio tokens: the end markers continue after the audio run
    # (largest id start + 1), not after the largest row / column id of the grid (start + 3).
    p = Prompt().turn(USER, lambda p: p.video_with_audio(1, 8, 8, 1.0, 10).text(2)).turn(ASSISTANT)
    inputs = batch(p)
    got = assert_identical(cfg, tiny_checkpoint.reference.thinker, inputs, use_audio_in_video=True)
    video = inputs["input_ids"][0] == VIDEO
    assert got[0, 0, p.ids.index(AUDIO_END)] <= got[:, 0, video].max()


def test_several_items_in_one_turn(cfg, tiny_checkpoint):
    p = Prompt().turn(USER, lambda p: (
        p.text(2).image(1, 6, 10).audio(250).video(3, 4, 4, 2 / 25).image(1, 2, 2).audio(100).text(5)
    )).turn(ASSISTANT)
    assert_identical(cfg, tiny_checkpoint.reference.thinker, batch(p))


def test_multi_turn_conversation(cfg, tiny_checkpoint):
    p = (
        Prompt()
        .turn(SYSTEM, lambda p: p.text(6))
        .turn(USER, lambda p: p.image(1, 8, 6).text(4))
        .turn(ASSISTANT, lambda p: p.text(11))
        .turn(USER, lambda p: p.audio(420).video(2, 6, 6, 1.0).text(3))
        .turn(ASSISTANT, lambda p: p.text(4))
        .turn(USER, lambda p: p.text(2))
        .turn(ASSISTANT)
    )
    assert_identical(cfg, tiny_checkpoint.reference.thinker, batch(p))


def test_batch_with_left_padding(cfg, tiny_checkpoint):
    long = Prompt().turn(USER, lambda p: p.image(1, 10, 8).audio(333).text(4)).turn(ASSISTANT)
    short = Prompt().turn(USER, lambda p: p.video(2, 4, 6, 0.5).text(2)).turn(ASSISTANT)
    inputs = batch(long, short)
    got = assert_identical(cfg, tiny_checkpoint.reference.thinker, inputs)
    pad = int((inputs["attention_mask"][1] == 0).sum())
    assert pad > 0 and torch.equal(got[:, 1, :pad], torch.zeros(3, pad))  # padding keeps id 0 here


def test_batch_with_audio_in_video_rows(cfg, tiny_checkpoint):
    a = Prompt().turn(USER, lambda p: p.video_with_audio(3, 4, 4, 2 / 3, 180).image(1, 4, 4)).turn(ASSISTANT)
    b = Prompt().turn(USER, lambda p: p.audio(90).video_with_audio(2, 2, 4, 1.5, 300)).turn(ASSISTANT)
    assert_identical(cfg, tiny_checkpoint.reference.thinker, batch(a, b), use_audio_in_video=True)


@pytest.mark.parametrize("seed", range(12))
def test_random_prompts(cfg, tiny_checkpoint, seed):
    """Random mixes, grids, fractional seconds per grid and batch layouts."""
    rng = random.Random(seed)
    in_video = seed % 3 == 0
    prompts = []
    for _ in range(rng.randint(1, 3)):
        p = Prompt()
        for _ in range(rng.randint(1, 3)):
            def content(p):
                for _ in range(rng.randint(0, 4)):
                    kind = rng.choice(["text", "image", "audio", "video"])
                    seconds = rng.choice([0.5, 1.0, 2 / 3, 2 / 12, 2 / 25, 0.37])
                    grid = (rng.randint(1, 4), 2 * rng.randint(1, 5), 2 * rng.randint(1, 5))
                    if kind == "text":
                        p.text(rng.randint(1, 6))
                    elif kind == "image":
                        p.image(1, *grid[1:])
                    elif kind == "audio":
                        p.audio(rng.randint(1, 900))
                    elif in_video:
                        p.video_with_audio(*grid, seconds, rng.randint(1, 900))
                    else:
                        p.video(*grid, seconds)
            p.turn(USER, content).turn(ASSISTANT, lambda p: p.text(rng.randint(1, 3)))
        prompts.append(p.turn(ASSISTANT))
    inputs = batch(*prompts)
    if inputs["image_grid_thw"] is None and inputs["video_grid_thw"] is None:
        inputs["image_grid_thw"] = torch.zeros(0, 3, dtype=torch.long)  # still the multimodal path
    assert_identical(cfg, tiny_checkpoint.reference.thinker, inputs, use_audio_in_video=in_video)


# ---- pure helpers and errors -------------------------------------------------------------------------------
def test_interleave_by_time_prefers_video_on_ties():
    video = torch.tensor([[0.0, 0.0, 2.0, 2.0]]).expand(3, -1)
    audio = torch.arange(3.0).expand(3, -1)
    merged, tail = interleave_by_time(video, audio)
    assert merged[0].tolist() == [0, 0, 0, 1, 2, 2, 2]
    assert tail[0].tolist() == [2]  # the audio ran last, alone


def test_continue_positions_counts_on_from_the_last_id():
    pos = torch.tensor([[[0.0, 5.0, 9.0]], [[0.0, 7.0, 9.0]], [[0.0, 8.0, 9.0]]])
    assert continue_positions(pos, 2)[:, 0].tolist() == [[10.0, 11.0]] * 3


def test_media_layout_reads_the_talker_config_too():
    talker = Qwen3OmniConfig.from_dict(tiny_config()).talker
    layout = positions.MediaLayout.of(talker)
    assert (layout.spatial_merge_size, layout.position_id_per_seconds, layout.audio_start_token_id) == (2, 13, 151669)


def test_placeholder_count_mismatch_is_an_input_error(cfg):
    p = Prompt().turn(USER, lambda p: p.image(1, 4, 4)).turn(ASSISTANT)
    inputs = batch(p)
    inputs["image_grid_thw"] = torch.tensor([[1, 4, 6]])
    with pytest.raises(InputError, match="placeholder"):
        ours(cfg, inputs)


def test_missing_grid_is_an_input_error(cfg):
    p = Prompt().turn(USER, lambda p: p.image(1, 4, 4).image(1, 2, 2)).turn(ASSISTANT)
    inputs = batch(p)
    inputs["image_grid_thw"] = inputs["image_grid_thw"][:1]
    with pytest.raises(InputError, match="image_grid_thw"):
        ours(cfg, inputs)
