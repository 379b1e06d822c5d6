"""The KV cache's static mode (what CUDA graphs and torch.compile need) computes what the dynamic mode does.

Static mode keeps the write offset on the device, writes with index_copy_ and attends over the whole buffer
with a mask, so every decode step has the same shapes. These tests run the tiny model's decoders both ways on
CPU: logits equal (up to summation order), with left padding, for a static prefill too, and for the code
predictor's rewound per-frame cache. A mask that let the model see the unwritten (zero) slots would change the
logits by O(1), which the first test checks so the comparison cannot pass vacuously.
"""

from __future__ import annotations

import pytest
import torch

from qwen3omni.modules.kv_cache import KVCache

from reference import max_rel_err

TOL = 1e-5


def greedy_logits(thinker, ids, mask, steps, static_from: str | None):
    """Per-step last-position logits of a greedy decode; static mode from 'prefill', 'decode' or never."""
    B, T = ids.shape
    cache = thinker.model.new_cache(B, T + steps + 3)
    if static_from == "prefill":
        cache.set_static(True)
    out = thinker(input_ids=ids, attention_mask=mask, cache=cache, logits_to_keep=1)
    if static_from == "decode":
        cache.set_static(True)
    logits, pos = [out.logits[:, -1]], out.position_ids[..., -1:]
    for _ in range(steps):
        token = logits[-1].argmax(-1)
        pos = pos + 1
        out = thinker(input_ids=token[:, None], position_ids=pos, cache=cache)
        logits.append(out.logits[:, -1])
    if cache.static:
        assert int(cache.position) == cache.length == T + steps
    return torch.stack(logits, 1)


@pytest.mark.parametrize("static_from", ["decode", "prefill"])
@pytest.mark.parametrize("padded", [False, True])
def test_thinker_decode_static_equals_dynamic(tiny_model, static_from, padded):
    thinker = tiny_model.thinker
    ids = torch.randint(0, 150000, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
    with torch.no_grad():
        want = greedy_logits(thinker, ids, mask, 5, None)
        got = greedy_logits(thinker, ids, mask, 5, static_from)
    assert max_rel_err(got, want) < TOL


def test_static_mask_hides_unwritten_slots(tiny_model):
    """Calibration: attending to the buffer's unwritten (zero) slots, i.e. no mask, changes the logits."""
    thinker = tiny_model.thinker
    ids = torch.randint(0, 150000, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = greedy_logits(thinker, ids, None, 3, None)
        original = KVCache.static_mask
        try:
            KVCache.static_mask = lambda self, q_len, window=None: torch.ones(  # noqa: E731
                1, 1, q_len, self.capacity, dtype=torch.bool
            )
            wrong = greedy_logits(thinker, ids, None, 3, "decode")
        finally:
            KVCache.static_mask = original
    assert max_rel_err(wrong, want) > 1e-2


def test_static_cache_cannot_grow():
    cache = KVCache(1, 1, 1, 4, capacity=3, dtype=torch.float32)
    cache.set_static(True)
    cache.reserve(3)
    with pytest.raises(RuntimeError, match="cannot grow"):
        cache.reserve(4)


def test_rewind_and_host_only_advance_keep_offsets_in_step():
    cache = KVCache(1, 1, 1, 4, capacity=8, dtype=torch.float32)
    cache.advance(3)
    cache.set_static(True)
    assert int(cache.position) == 3
    cache.advance(2)
    assert cache.length == 5 and int(cache.position) == 5
    cache.advance(1, on_device=False)  # a replayed graph already moved the device offset
    assert cache.length == 6 and int(cache.position) == 5
    cache.length = 0
    assert int(cache.position) == 0
    cache.set_static(False)
    assert cache.position is None and not cache.static


def test_code_predictor_with_static_cache(tiny_model):
    """The code predictor rewinds its cache every frame (`cache.length = 0`); in static mode that rewinds the
    device offset too, and the codes and logits equal the dynamic cache's, frame after frame."""
    talker = tiny_model.talker
    C = talker.config.text.hidden_size
    g = torch.Generator().manual_seed(2)
    static = talker.code_predictor.new_cache(1)
    static.set_static(True)
    dynamic = talker.code_predictor.new_cache(1)
    with torch.no_grad():
        for _ in range(2):
            hidden = torch.randn(1, C, generator=g)
            code0 = torch.randint(0, 100, (1,), generator=g)
            want = talker.predict_residual(hidden, code0, cache=dynamic, return_logits=True)
            got = talker.predict_residual(hidden, code0, cache=static, return_logits=True)
            assert torch.equal(got.codes, want.codes)
            assert max_rel_err(got.logits, want.logits) < TOL
