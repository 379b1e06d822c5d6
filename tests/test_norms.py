"""RMSNorm's inference path (fewer buffers, some products in place) against its autograd path: the same bits,
the same dtype, and the caller's tensor untouched."""

from __future__ import annotations

import pytest
import torch

from qwen3omni.modules.norms import RMSNorm


@pytest.mark.parametrize(
    "x_dtype, w_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
     (torch.float32, torch.bfloat16)],
)
def test_inference_path_is_bit_identical_and_leaves_the_input_alone(x_dtype, w_dtype):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(64, eps=1e-6).to(w_dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g) + 1)
    x = (torch.randn(3, 5, 64, generator=g) * 3).to(x_dtype)
    before = x.clone()
    with torch.enable_grad():
        want = norm(x)  # the weight requires grad: the out-of-place path
    assert want.requires_grad
    with torch.no_grad():
        got = norm(x)
    assert got.dtype == want.dtype == torch.result_type(norm.weight, x)
    assert torch.equal(got, want.detach())
    assert torch.equal(x, before)
    # and what the reference computes (float32 statistics, weight times the value cast back)
    x32 = x.float()
    ref = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    assert torch.equal(got, ref.detach())
