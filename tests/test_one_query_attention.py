"""Inside a compiled CPU decode step, the attention of one query runs as plain products and sums
(`attention._one_query`, which inductor fuses with the kernels around it) instead of SDPA's kernel call. It must
give SDPA's numbers for every mask and head grouping a decode step sees, in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen3omni.modules import attention
from qwen3omni.modules.attention import attend

from reference import max_rel_err

B, H, HK, S, D = 2, 8, 2, 7, 16
SCALE = D**-0.5


def qkv(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, t, D, generator=g).to(dtype) for h, t in ((H, 1), (HK, S), (HK, S)))
    return q, k, v


def masks():
    shared = torch.ones(1, 1, 1, S, dtype=torch.bool)
    shared[..., -2:] = False  # a static cache's unwritten tail
    per_row = torch.ones(B, 1, 1, S, dtype=torch.bool)
    per_row[0, ..., :3] = False  # left padding of the first row
    per_row[1, ..., :] = False  # a row that sees no key at all: zeros, as SDPA gives
    return {"none": None, "shared": shared, "per_row": per_row}


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE, enable_gqa=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("mask_name", ["none", "shared", "per_row"])
def test_one_query_matches_sdpa(dtype, tol, mask_name):
    q, k, v = qkv(dtype)
    mask = masks()[mask_name]
    expected = sdpa(q, k, v, mask)
    got = attention._one_query(q, k, v, mask, SCALE)
    assert got.dtype == dtype and got.shape == expected.shape
    assert max_rel_err(got.float(), expected.float()) < tol
    # the fixture tells key heads and masked keys apart: the wrong grouping, or a mask ignored, moves it
    wrong_groups = attention._one_query(q, k.flip(1), v.flip(1), mask, SCALE)
    assert max_rel_err(wrong_groups.float(), expected.float()) > 0.05
    if mask is not None:
        ignored = attention._one_query(q, k, v, None, SCALE)
        assert max_rel_err(ignored.float(), expected.float()) > 0.05


def test_compiled_attend_takes_the_one_query_form(monkeypatch):
    """`attend` under torch.compile on CPU, one query: the products-and-sums form, with SDPA's numbers;
    two queries (a decode step's first, 2-token block) stay on SDPA."""
    calls = []
    real = attention._one_query

    def counted(*args):
        calls.append(args[0].shape[2])
        return real(*args)

    monkeypatch.setattr(attention, "_one_query", counted)
    torch._dynamo.reset()
    step = torch.compile(lambda q, k, v, m: attend(q, k, v, mask=m), backend="eager", fullgraph=True)
    q, k, v = qkv(torch.float32, seed=1)
    mask = masks()["shared"]
    assert max_rel_err(step(q, k, v, mask), sdpa(q, k, v, mask)) < 1e-5
    assert calls == [1]
    q2 = torch.cat([q, q.flip(0)], dim=2)
    mask2 = mask.expand(1, 1, 2, S)
    assert max_rel_err(step(q2, k, v, mask2), sdpa(q2, k, v, mask2)) < 1e-5
    assert calls == [1]  # no second call: the 2-query block went to SDPA
    additive = torch.zeros(1, 1, 1, S).masked_fill(~mask, float("-inf"))  # a float mask: SDPA's to handle
    assert max_rel_err(step(q, k, v, additive), sdpa(q, k, v, mask)) < 1e-5
    assert calls == [1]
    calls.clear()
    attend(q, k, v, mask=mask)  # eager calls keep SDPA's kernel
    assert calls == []
