"""Choosing the attention backend model-wide, and the flash-attn path's plumbing.

flash-attn needs CUDA, so its calls are checked here against a stand-in written from flash-attn's documented
contract: `flash_attn_func(q, k, v, softmax_scale=None, causal=False)` on [batch, time, heads, head_dim] with
fewer key/value heads allowed (GQA) and the causal mask aligned to the bottom-right corner when the query is
shorter than the keys; `flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
max_seqlen_k, causal=False)` on packed [total, heads, head_dim] with int32 cumulative lengths. The stand-in
counts its calls, so a path that silently fell back to SDPA fails these tests too.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_audio_encoder import RATE, log_mel, speech
from test_positions import ASSISTANT, USER, Prompt, batch
from test_vision_encoder import image_inputs, photo

from qwen3omni.errors import InputError
from qwen3omni.generation.text import generate_text
from qwen3omni.model.omni import Qwen3Omni
from qwen3omni.modules import attention
from qwen3omni.modules.attention import attend, attend_segments

from reference import max_rel_err

TOL = 1e-4  # the stand-in and SDPA differ by summation order only (~1e-6)
WRONG = 1e-2  # what a wrong stand-in (a mask misaligned, causality dropped) moves the outputs by, at least


def _dense(q_BTHD, k_BTHD, v_BTHD, scale, causal, top_left=False):
    """Attention written out from the contract: scores, mask, softmax, weighted values."""
    Tq, H, D = q_BTHD.shape[1:]
    Tk, Hk = k_BTHD.shape[1:3]
    assert H % Hk == 0, "flash-attn needs the query heads to be a multiple of the key/value heads"
    k_BTHD, v_BTHD = (t.repeat_interleave(H // Hk, dim=2) for t in (k_BTHD, v_BTHD))
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q_BTHD, k_BTHD) * scale
    if causal:
        shift = 0 if top_left else Tk - Tq  # query i sees keys up to i + shift
        allowed = torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + shift
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v_BTHD)


class FakeFlash:
    """flash_attn_func and flash_attn_varlen_func per the contract above, with call counts."""

    def __init__(self, top_left=False, ignore_causal=False, one_block=False):
        # the last three make it wrong on purpose, to show the tests can tell
        self.top_left, self.ignore_causal, self.one_block = top_left, ignore_causal, one_block
        self.dense_calls = self.varlen_calls = 0

    def func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **unused):
        assert q.dim() == 4 and k.shape[:2] == v.shape[:2] == (q.shape[0], k.shape[1]) and dropout_p == 0.0
        self.dense_calls += 1
        return _dense(q, k, v, softmax_scale, causal and not self.ignore_causal, self.top_left)

    def varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False, **unused):
        assert q.dim() == 3 and cu_q.dtype == cu_k.dtype == torch.int32 and dropout_p == 0.0
        lengths = (cu_q[1:] - cu_q[:-1]).tolist()
        assert isinstance(max_q, int) and max_q == max(lengths) and torch.equal(cu_q, cu_k) and max_k == max_q
        self.varlen_calls += 1
        out = torch.empty_like(q)
        bounds = [0, q.shape[0]] if self.one_block else cu_q.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            piece = (t[None, start:end] for t in (q, k, v))
            out[start:end] = _dense(*piece, softmax_scale, causal and not self.ignore_causal)[0]
        return out


def install(monkeypatch, fake: FakeFlash) -> FakeFlash:
    monkeypatch.setattr(attention, "flash_attn_func", fake.func)
    monkeypatch.setattr(attention, "flash_attn_varlen_func", fake.varlen)
    monkeypatch.setattr(attention, "flash_usable", lambda q: True)  # CPU fp32 stands in for CUDA bf16
    return fake


# ---- the kernels' calling convention ------------------------------------------------------------------------------
def qkv(Tq, Tk, H=4, Hk=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, H, Tq, D, generator=g) * 2, torch.randn(1, Hk, Tk, D, generator=g) * 2,
            torch.randn(1, Hk, Tk, D, generator=g))


@pytest.mark.parametrize("Tq, Tk, causal", [(6, 6, True), (3, 7, True), (1, 9, True), (5, 5, False)])
def test_dense_call_matches_sdpa(monkeypatch, Tq, Tk, causal):
    q, k, v = qkv(Tq, Tk)
    want = attend(q, k, v, causal=causal, backend="sdpa")
    fake = install(monkeypatch, FakeFlash())
    got = attend(q, k, v, causal=causal, backend="flash", scale=None)
    assert fake.dense_calls == 1
    assert max_rel_err(got, want) < TOL
    if causal and 1 < Tq < Tk:  # a query block after a cache: the mask's alignment matters
        install(monkeypatch, FakeFlash(top_left=True))
        assert max_rel_err(attend(q, k, v, causal=causal, backend="flash"), want) > WRONG


def test_a_masked_call_stays_on_sdpa(monkeypatch):
    """flash-attn takes no mask: padding, windows and static caches run SDPA even with backend "flash"."""
    q, k, v = qkv(1, 5)
    mask = torch.tensor([[[[False, True, True, True, True]]]])
    fake = install(monkeypatch, FakeFlash())
    got = attend(q, k, v, mask=mask, backend="flash")
    assert fake.dense_calls == 0
    assert max_rel_err(got, attend(q, k, v, mask=mask, backend="sdpa")) < TOL


def test_varlen_call_matches_sdpa(monkeypatch):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(11, 3, 8, generator=g) * 2 for _ in range(3))
    cu = torch.tensor([0, 4, 4, 9, 11])  # int64 on purpose (and an empty segment): the call converts
    want = attend_segments(q, k, v, cu, backend="sdpa")
    fake = install(monkeypatch, FakeFlash())
    assert max_rel_err(attend_segments(q, k, v, cu, backend="flash"), want) < TOL
    assert fake.varlen_calls == 1
    install(monkeypatch, FakeFlash(one_block=True))
    assert max_rel_err(attend_segments(q, k, v, cu, backend="flash"), want) > WRONG


# ---- a whole model ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def thinker(tiny_checkpoint):
    return Qwen3Omni.from_pretrained(tiny_checkpoint.path, dtype=torch.float32, components={"thinker"}).thinker


@pytest.fixture(scope="module")
def image_and_speech():
    """One unpadded row (so the decoder's prefill has no mask): an image, speech and text."""
    pixels, grids = image_inputs([photo()])
    features = log_mel([speech()[: int(1.3 * RATE)]])
    (g,), mel = grids.tolist(), int(features[1].sum())
    prompt = Prompt().turn(USER, lambda p: p.text(2).image(*g).audio(mel).text(3)).turn(ASSISTANT)
    inputs = batch(prompt)
    return dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                image_grid_thw=inputs["image_grid_thw"], pixel_values=pixels,
                input_features=features[0], feature_attention_mask=features[1])


@torch.no_grad()
def test_thinker_with_flash_matches_sdpa(monkeypatch, thinker, image_and_speech):
    want = thinker(**image_and_speech).logits
    fake = install(monkeypatch, FakeFlash())
    attention.set_attention_backend(thinker, "flash")
    try:
        got = thinker(**image_and_speech).logits
        calls = (fake.dense_calls, fake.varlen_calls)
        install(monkeypatch, FakeFlash(ignore_causal=True, one_block=True))
        wrong = thinker(**image_and_speech).logits
    finally:
        attention.set_attention_backend(thinker, "sdpa")
    layers = len(thinker.model.layers)
    encoder_layers = len(thinker.audio_tower.layers) + len(thinker.visual.blocks)
    assert calls == (layers, encoder_layers)  # every decoder layer and every encoder layer took the flash path
    assert max_rel_err(got, want) < TOL
    assert max_rel_err(wrong, want) > WRONG


@torch.no_grad()
def test_greedy_decoding_with_flash_is_identical(monkeypatch, thinker, image_and_speech):
    want = generate_text(thinker, **image_and_speech, max_new_tokens=6).new_tokens
    fake = install(monkeypatch, FakeFlash())
    attention.set_attention_backend(thinker, "flash")
    try:
        got = generate_text(thinker, **image_and_speech, max_new_tokens=6).new_tokens
    finally:
        attention.set_attention_backend(thinker, "sdpa")
    assert fake.dense_calls > len(thinker.model.layers)  # prefill and the decode steps
    assert torch.equal(got, want)


# ---- choosing a backend -------------------------------------------------------------------------------------------
def test_set_attention_backend_reaches_every_attention(tiny_model):
    attentions = [m for m in tiny_model.modules() if isinstance(m, attention.Attention)]
    towers = [tiny_model.thinker.audio_tower, tiny_model.thinker.visual]
    expected = (len(tiny_model.thinker.model.layers) + len(tiny_model.talker.model.layers)
                + len(tiny_model.talker.code_predictor.model.layers) + len(tiny_model.code2wav.pre_transformer.layers))
    assert len(attentions) == expected
    try:
        tiny_model.set_attention_backend("eager")
        assert {m.backend for m in attentions + towers} == {"eager"}
    finally:
        tiny_model.set_attention_backend("sdpa")
    assert {m.backend for m in attentions + towers} == {"sdpa"}


def test_bad_backend_names_the_argument(tiny_model, tiny_checkpoint, monkeypatch):
    with pytest.raises(InputError, match=r"backend: expected one of \['sdpa', 'eager', 'flash'\], got 'fast'"):
        tiny_model.set_attention_backend("fast")
    # checked before anything is read: a bad name with a good path fails fast, naming the argument
    with pytest.raises(InputError, match="attention: expected one of"):
        Qwen3Omni.from_pretrained(tiny_checkpoint.path, attention="flash2")
    monkeypatch.setattr(attention, "flash_attn_func", None)
    with pytest.raises(InputError, match="'flash' needs the flash-attn package"):
        tiny_model.set_attention_backend("flash")
    assert {m.backend for m in tiny_model.modules() if isinstance(m, attention.Attention)} == {"sdpa"}
