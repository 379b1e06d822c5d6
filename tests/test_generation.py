"""End-to-end generation and streaming vs transformers (issue 7).

Greedy thinker + greedy talker: token for token, code for code, waveform within 1e-4, for text, audio, image
and video-with-audio prompts built by our processor, and for a 2-row batch whose rows stop at different times.
"""

from __future__ import annotations

import copy

import pytest
import torch
from processor_fixtures import PHOTO, VIDEO, make_checkpoint_folder, speech

from qwen3omni.errors import InputError
from qwen3omni.model.omni import Qwen3Omni
from qwen3omni.processing import Processor

from reference import save_reference

WAVE_TOL = 1e-4
SYSTEM = {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]}


def user(*items):
    return [SYSTEM, {"role": "user", "content": list(items)}]


def text(t):
    return {"type": "text", "text": t}


class Pair:
    """A reference model and ours loaded from its checkpoint, plus a processor for that folder."""

    def __init__(self, ref, folder):
        save_reference(ref, folder)
        make_checkpoint_folder(folder, role_tokens=True)
        self.ref = ref
        self.ours = Qwen3Omni.from_pretrained(folder, dtype=torch.float32)
        self.processor = Processor.from_pretrained(folder)
        self.ref_codes = []
        original = ref.code2wav.chunked_decode

        def capture(codes, *args, **kwargs):  # record the codes the reference decodes
            self.ref_codes.append(codes.clone())
            return original(codes, *args, **kwargs)

        ref.code2wav.chunked_decode = capture

    def both(self, batch, max_new_tokens=12, talker_max_new_tokens=24, talker_use_audio_in_video=None, **kw):
        self.ref_codes.clear()
        ref_kw = {k: v for k, v in batch.items() if k != "use_audio_in_video"}
        if talker_use_audio_in_video is not None:
            ref_kw["talker_use_audio_in_video"] = talker_use_audio_in_video
        with torch.no_grad():
            ref_seq, ref_wav = self.ref.generate(
                **ref_kw, use_audio_in_video=bool(batch.get("use_audio_in_video", False)),
                thinker_max_new_tokens=max_new_tokens, thinker_do_sample=False, talker_do_sample=False,
                talker_max_new_tokens=talker_max_new_tokens, **{f"thinker_{k}": v for k, v in kw.items()},
            )
        ours = self.ours.generate(
            **batch, max_new_tokens=max_new_tokens, talker_do_sample=False,
            talker_max_new_tokens=talker_max_new_tokens, **kw,
        )
        return ref_seq, ref_wav, ours


@pytest.fixture(scope="module")
def pair(tiny_checkpoint, tmp_path_factory):
    return Pair(tiny_checkpoint.reference, tmp_path_factory.mktemp("generation"))


def assert_same(ref_seq, ref_wav, ours, ref_codes):
    assert torch.equal(ours.sequences, ref_seq)
    wavs = [ref_wav.reshape(-1)] if isinstance(ref_wav, torch.Tensor) else ref_wav
    assert len(ours.audio) == len(wavs)
    for b, (r, o) in enumerate(zip(wavs, ours.audio)):
        assert o.shape == r.shape, b
        assert (o - r).abs().max() < WAVE_TOL, b
        assert r.abs().max() > 1e-2, "the fixture's waveform must carry signal"
        assert torch.equal(ours.codes[b], ref_codes[0][b, :, : ours.codes[b].shape[1]]), b


def test_text_only(pair):
    batch = pair.processor(user(text("Tell me a story about a cat.")))
    ref_seq, ref_wav, ours = pair.both(batch)
    assert_same(ref_seq, ref_wav, ours, pair.ref_codes)
    assert ours.codes[0].shape[0] == 16 and ours.codes[0].shape[1] > 5


def test_audio_prompt(pair):
    batch = pair.processor(user({"type": "audio", "audio": speech()[:48000]}, text("What is said?")))
    assert_same(*pair.both(batch), pair.ref_codes)


def test_image_prompt(pair):
    batch = pair.processor(user({"type": "image", "image": str(PHOTO)}, text("Describe it.")))
    assert_same(*pair.both(batch), pair.ref_codes)


def test_video_with_audio_prompt(pair, monkeypatch):
    """transformers 5.24's talker cannot place an audio-in-video prompt: it is not given `use_audio_in_video`
    and its position code reads an audio config its own config lacks. Given both, as we do, it agrees."""
    conv = user({"type": "video", "video": str(VIDEO)}, text("What happens?"))
    batch = pair.processor(conv, use_audio_in_video=True)
    assert batch["use_audio_in_video"]
    ref_talker_config = pair.ref.talker.config
    monkeypatch.setattr(ref_talker_config, "audio_config", pair.ref.config.thinker_config.audio_config, raising=False)
    assert_same(*pair.both(batch, talker_use_audio_in_video=True), pair.ref_codes)


@pytest.fixture(scope="module")
def stopping_pair(tiny_checkpoint, tmp_path_factory):
    """A reference whose talker emits codec EOS wherever it would have chosen one particular code, so the two
    rows of a batch stop speaking at different frames."""
    ref = copy.deepcopy(tiny_checkpoint.reference)
    probe = Pair(copy.deepcopy(ref), tmp_path_factory.mktemp("probe"))
    batch = two_rows(probe.processor)
    first = probe.ours.generate(**batch, max_new_tokens=12, talker_do_sample=False, talker_max_new_tokens=24)
    row0, row1 = first.codes[0][0].tolist(), first.codes[1][0].tolist()
    stop = next(c for i, c in enumerate(row1) if i >= 3 and c not in row1[:i] and c not in row0)
    eos = ref.config.talker_config.codec_eos_token_id
    with torch.no_grad():
        ref.talker.codec_head.weight[eos] = 2.0 * ref.talker.codec_head.weight[stop]
    return Pair(ref, tmp_path_factory.mktemp("stopping"))


def two_rows(processor):
    return processor([user(text("Tell me a long story about a cat and a dog.")), user(text("Hi!"))])


def test_two_row_batch_rows_stop_independently(stopping_pair):
    p = stopping_pair
    batch = two_rows(p.processor)
    probe = p.ours.generate(**batch, max_new_tokens=12, return_audio=False)
    eos = [151645, int(probe.sequences[1, batch["input_ids"].shape[1] + 4])]  # row 1's text ends at token 5
    ref_seq, ref_wav, ours = p.both(batch, eos_token_id=eos)
    answer = ours.sequences[:, batch["input_ids"].shape[1] :]
    assert (answer[1, 5:] == eos[0]).all(), "row 1 stops early and is padded"
    assert ours.codes[0].shape[1] != ours.codes[1].shape[1], "the rows' speech has different lengths"
    assert_same(ref_seq, ref_wav, ours, p.ref_codes)


def count_frames(model):
    """Wrap the talker's per-frame code prediction to count frames as they are produced."""
    calls = {"frames": 0}
    original = model.talker.predict_residual

    def counted(*args, **kwargs):
        calls["frames"] += 1
        return original(*args, **kwargs)

    model.talker.predict_residual = counted
    return calls, lambda: setattr(model.talker, "predict_residual", original)


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_stream_matches_generate_and_starts_early(pair, chunk):
    batch = pair.processor(user(text("Tell me a story about a cat.")))
    offline = pair.ours.generate(**batch, max_new_tokens=12, talker_do_sample=False, talker_max_new_tokens=24)
    calls, restore = count_frames(pair.ours)
    frames_at_first_audio, events = None, []
    kw = dict(max_new_tokens=12, talker_do_sample=False, talker_max_new_tokens=24, audio_chunk_frames=chunk)
    try:
        for ev in pair.ours.stream(**batch, **kw):
            if ev.kind == "audio" and frames_at_first_audio is None:
                frames_at_first_audio = calls["frames"]
            events.append(ev)
    finally:
        restore()
    assert frames_at_first_audio is not None and frames_at_first_audio <= 2
    texts = torch.cat([e.data for e in events if e.kind == "text"])
    assert torch.equal(texts, offline.sequences[0, batch["input_ids"].shape[1] :])
    audio = torch.cat([e.data for e in events if e.kind == "audio"])
    full = pair.ours.code2wav(offline.codes[0][None]).reshape(-1)
    assert audio.shape == full.shape == offline.audio[0].shape
    assert (audio - full).abs().max() < WAVE_TOL
    assert (audio - offline.audio[0]).abs().max() < WAVE_TOL
    # pushes of 1, 2, 4, ... frames up to `chunk` (the last push may be shorter)
    sizes, left, size = [], offline.codes[0].shape[-1], 1
    while left > 0:
        sizes.append(min(size, left))
        left, size = left - size, min(2 * size, chunk)
    assert [e.data.numel() for e in events if e.kind == "audio"][1:-1] == [1920 * n for n in sizes[1:-1]]
    assert sum(e.kind == "audio" for e in events) == len(sizes)


def test_stream_text_only(pair):
    batch = pair.processor(user(text("Hi")))
    offline = pair.ours.generate(**batch, max_new_tokens=8, return_audio=False)
    events = list(pair.ours.stream(**batch, max_new_tokens=8, return_audio=False))
    assert {e.kind for e in events} == {"text"}
    assert torch.equal(torch.cat([e.data for e in events]), offline.sequences[0, batch["input_ids"].shape[1] :])
    assert offline.audio is None


def test_speakers(pair):
    batch = pair.processor(user(text("Hi")))
    kw = dict(max_new_tokens=3, talker_do_sample=False, talker_max_new_tokens=4)
    a = pair.ours.generate(**batch, speaker="CHELSIE", **kw)
    b = pair.ours.generate(**batch, speaker="aiden", **kw)
    assert not torch.equal(a.codes[0], b.codes[0])
    with pytest.raises(InputError, match=r"speaker.*'bob'.*aiden.*chelsie.*ethan"):
        pair.ours.generate(**batch, speaker="bob", **kw)


@pytest.mark.parametrize(
    "kw,match",
    [({"do_sample": True, "temperature": 0.0}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
     ({"talker_top_p": 0.0}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"colour": 1}, "colour")],
)
def test_bad_knobs(pair, kw, match):
    batch = pair.processor(user(text("Hi")))
    with pytest.raises(InputError, match=match):
        pair.ours.generate(**batch, **kw)


def test_sampling_is_seeded(pair):
    batch = pair.processor(user(text("Hi")))
    kw = dict(max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, talker_max_new_tokens=6)
    a = pair.ours.generate(**batch, generator=torch.Generator().manual_seed(3), **kw)
    b = pair.ours.generate(**batch, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.codes[0], b.codes[0])


def test_thinker_only_checkpoint_generates_text_only(pair, tmp_path):
    thinker_only = Qwen3Omni(pair.ours.config, components={"thinker"})
    thinker_only.load_state_dict(pair.ours.state_dict(), strict=False)
    thinker_only.save_pretrained(tmp_path / "thinking")
    model = Qwen3Omni.from_pretrained(tmp_path / "thinking", dtype=torch.float32)
    assert not model.config.enable_audio_output and model.talker is None
    batch = pair.processor(user(text("Hi")))
    out = model.generate(**batch, max_new_tokens=5)
    assert out.audio is None and out.codes is None
    full = pair.ours.generate(**batch, max_new_tokens=5, return_audio=False)
    assert torch.equal(out.sequences, full.sequences)
    with pytest.raises(InputError, match="return_audio=True"):
        model.generate(**batch, max_new_tokens=5, return_audio=True)
