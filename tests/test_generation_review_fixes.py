"""Regression tests for the generation review (/tmp/review/generation/REPORT.md).

- a one-token answer: `stream` tells the talker the text ended at step 0 (tts_eos), as `generate` and
  transformers do;
- right-padded masks and all-padding rows are refused (generation needs the processor's left padding);
- `talker_max_new_tokens` is checked against the talker's positions before the thinker runs;
- `generator`, `eos_token_id`, `return_audio` and `cuda_graphs` are checked (or normalised) up front;
- a prompt that pre-fills the answer start is refused when speech is asked for.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_generation import WAVE_TOL, Pair, text, user

from qwen3omni.errors import InputError

GREEDY_SPEECH = dict(talker_do_sample=False, talker_max_new_tokens=8)


class ThinkerRan(Exception):
    """Raised by a patched thinker: the call got past every up-front check."""


@pytest.fixture(scope="module")
def pair(tiny_checkpoint, tmp_path_factory):
    return Pair(tiny_checkpoint.reference, tmp_path_factory.mktemp("review_fixes"))


@pytest.fixture(scope="module")
def batch(pair):
    return pair.processor(user(text("Tell me a story about a cat.")))


@pytest.fixture
def thinker_must_not_run(pair, monkeypatch):
    def boom(*args, **kwargs):
        raise ThinkerRan

    monkeypatch.setattr(pair.ours.thinker, "forward", boom)


def streamed(model, batch, **kw):
    events = list(model.stream(**batch, **kw))
    tokens = torch.cat([e.data for e in events if e.kind == "text"])
    audio = [e.data for e in events if e.kind == "audio"]
    return tokens, torch.cat(audio) if audio else torch.zeros(0)


def assert_wave(ours: torch.Tensor, ref: torch.Tensor):
    ref = ref.reshape(-1)
    assert ours.shape == ref.shape and ref.abs().max() > 1e-2
    assert (ours - ref).abs().max() < WAVE_TOL


# ---- 1. one-token answers: stream == generate == transformers ------------------------------------------------


# transformers cannot run a one-token answer at batch size 1 (it builds the talker's head from the thinker's
# inputs, which then lack the answer token), but in a batch a row that stops on its first token reads tts_eos at
# step 0: the rule `generate` applies to every one-token answer, and now `stream` too.


def test_one_token_answer_streams_as_generate(pair, batch):
    offline = pair.ours.generate(**batch, max_new_tokens=1, **GREEDY_SPEECH)
    tokens, audio = streamed(pair.ours, batch, max_new_tokens=1, **GREEDY_SPEECH)
    assert torch.equal(tokens, offline.sequences[0, batch["input_ids"].shape[1] :])
    assert_wave(audio, offline.audio[0])


def test_eos_as_first_token_streams_the_reference_speech(pair):
    prompts = [user(text("Tell me a long story about a cat and a dog.")), user(text("Hi!"))]
    two = pair.processor(prompts)
    firsts = pair.ours.generate(**two, max_new_tokens=1, return_audio=False).sequences[:, -1].tolist()
    assert firsts[0] != firsts[1], "the fixture needs rows that do not stop together"
    with torch.no_grad():
        ref_seq, ref_wavs = pair.ref.generate(
            input_ids=two["input_ids"], attention_mask=two["attention_mask"], thinker_max_new_tokens=2,
            thinker_eos_token_id=firsts[1], thinker_do_sample=False, talker_do_sample=False, talker_max_new_tokens=8,
        )
    assert ref_seq[1, two["input_ids"].shape[1]].item() == firsts[1]  # the reference's row 1 stopped at once
    alone = pair.processor(prompts[1])
    offline = pair.ours.generate(**alone, max_new_tokens=2, eos_token_id=firsts[1], **GREEDY_SPEECH)
    assert offline.sequences.shape[1] == alone["input_ids"].shape[1] + 1
    assert_wave(offline.audio[0], ref_wavs[1])
    _, audio = streamed(pair.ours, alone, max_new_tokens=2, eos_token_id=firsts[1], **GREEDY_SPEECH)
    assert_wave(audio, ref_wavs[1])


# ---- 2. left padding only ------------------------------------------------------------------------------------


def right_padded(batch):
    """The processor's left-padded 2-row batch with each row's tokens moved to the left (right padding)."""
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    for b in range(ids.shape[0]):
        shift = int((mask[b] == 0).sum())
        ids[b], mask[b] = ids[b].roll(-shift), mask[b].roll(-shift)
    return ids, mask


def test_right_padded_batch_is_refused(pair):
    batch = pair.processor([user(text("Tell me a long story about a cat and a dog.")), user(text("Hi!"))])
    assert batch["attention_mask"][1, 0] == 0, "the fixture needs a padded row"
    ids, mask = right_padded(batch)
    with pytest.raises(InputError, match=r"attention_mask: row 1 has padding after a token.*left padding"):
        pair.ours.generate(ids, mask, max_new_tokens=2, return_audio=False)
    with pytest.raises(InputError, match=r"attention_mask: row 1"):
        pair.ours.thinker.generate(ids, mask, max_new_tokens=2)


def test_all_padding_row_is_refused(pair, batch):
    ids = batch["input_ids"].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(InputError, match=r"attention_mask: row 1 is all zeros"):
        pair.ours.generate(ids, mask, max_new_tokens=2, return_audio=False)
    with pytest.raises(InputError, match=r"attention_mask: row 0 is all zeros"):
        list(pair.ours.stream(batch["input_ids"], torch.zeros_like(batch["input_ids"]), max_new_tokens=2))


# ---- 3. talker_max_new_tokens against the talker's positions ------------------------------------------------


def test_talker_max_new_tokens_is_bounded_before_the_thinker_runs(pair, batch, thinker_must_not_run):
    limit = pair.ours.config.talker.text.max_position_embeddings
    with pytest.raises(InputError, match=r"talker_max_new_tokens.*1000000000000.*max_position_embeddings") as err:
        pair.ours.generate(**batch, max_new_tokens=2, talker_max_new_tokens=10**12)
    most = int(str(err.value).rsplit("at most ", 1)[1])
    assert 0 < most < limit
    with pytest.raises(InputError, match="talker_max_new_tokens"):
        list(pair.ours.stream(**batch, max_new_tokens=2, talker_max_new_tokens=most + 1))
    with pytest.raises(ThinkerRan):  # the largest allowed value passes the check
        pair.ours.generate(**batch, max_new_tokens=2, talker_max_new_tokens=most)


# ---- 4. knob types ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"generator": 42}, r"generator: expected a torch.Generator.*42"),
        ({"generator": 42, "do_sample": False}, r"generator: expected a torch.Generator"),  # talker sampling only
        ({"eos_token_id": True}, r"eos_token_id: expected a token id.*True"),
        ({"eos_token_id": [5, False]}, r"eos_token_id: expected"),
        ({"eos_token_id": torch.tensor(5.0)}, r"eos_token_id: expected.*float32"),
        ({"eos_token_id": -1}, r"eos_token_id: expected"),
        ({"return_audio": "no"}, r"return_audio: expected True, False or None, got 'no'"),
        ({"cuda_graphs": "off"}, r"cuda_graphs: expected True, False or None, got 'off'"),
        ({"cuda_graphs": 0}, r"cuda_graphs: expected True, False or None, got 0"),
    ],
)
def test_bad_knob_types_are_refused_up_front(pair, batch, thinker_must_not_run, kw, match):
    with pytest.raises(InputError, match=match):
        pair.ours.generate(**batch, max_new_tokens=2, **kw)


@pytest.mark.parametrize(
    "as_type",
    [np.int64, torch.tensor, lambda i: torch.tensor([i]), lambda i: np.array([i, i + 1])],
    ids=["numpy-int", "0-d-tensor", "1-d-tensor", "numpy-array"],
)
def test_integer_eos_ids_of_other_types_act_like_ints(pair, batch, as_type):
    first = pair.ours.generate(**batch, max_new_tokens=1, return_audio=False).sequences[0, -1].item()
    got = pair.ours.generate(**batch, max_new_tokens=4, eos_token_id=as_type(first), return_audio=False)
    assert got.sequences.shape[1] == batch["input_ids"].shape[1] + 1  # it stopped on its first token
    assert got.sequences[0, -1].item() == first


# ---- 6. a pre-filled answer start -------------------------------------------------------------------------


def test_prefilled_answer_is_refused_for_speech_only(pair, batch):
    ids = torch.cat([batch["input_ids"], torch.tensor([[83, 117, 114]])], dim=1)
    mask = torch.ones_like(ids)
    with pytest.raises(InputError, match=r"input_ids: with return_audio=True .*assistant.*3 token\(s\) after it"):
        pair.ours.generate(ids, mask, max_new_tokens=2, **GREEDY_SPEECH)
    with pytest.raises(InputError, match=r"input_ids: with return_audio=True"):
        list(pair.ours.stream(ids[:, :-4], mask[:, :-4], max_new_tokens=2, **GREEDY_SPEECH))  # ends mid-head
    out = pair.ours.generate(ids, mask, max_new_tokens=2, return_audio=False)  # text continues the pre-fill
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)


@pytest.mark.parametrize("temperature", [1e-300, 1e-46, 1e-40, 1e-30, 5e-5])
def test_a_tiny_temperature_samples_the_best_token_instead_of_nan(temperature):
    """logits / 1e-40 overflows; the draw must still be finite and (the distribution being one-hot) the argmax,
    including for bf16 logits and with top-p/min-p on top."""
    from qwen3omni.generation.sampling import SamplingConfig, choose, warp

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 20
    for dtype in (torch.float32, torch.bfloat16):
        for extra in ({}, {"top_p": 0.9}, {"min_p": 0.1}):
            s = SamplingConfig(do_sample=True, temperature=temperature, **extra)
            probs = warp(logits.to(dtype).float(), s).softmax(-1)
            assert torch.isfinite(probs).all(), (dtype, extra)
            got = choose(logits.to(dtype), s, torch.Generator().manual_seed(1))
            assert torch.equal(got, logits.to(dtype).argmax(-1)), (dtype, extra)


def test_usual_temperatures_divide_as_before():
    """Above the cut-off the logits are divided as transformers divides them (bit for bit), so seeded draws
    stay equal to the reference's."""
    from qwen3omni.generation.sampling import TINY_TEMPERATURE, SamplingConfig, warp

    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(3)) * 5
    for t in (TINY_TEMPERATURE, 0.3, 0.9, 1.7):
        assert torch.equal(warp(logits, SamplingConfig(do_sample=True, temperature=t)), logits / t)
