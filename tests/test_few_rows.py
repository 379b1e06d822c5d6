"""`few_row_linear`: same values as F.linear on every row count, the oneDNN kernel only where it is chosen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen3omni.modules import few_rows
from qwen3omni.modules.few_rows import few_row_linear, uses_onednn

needs_onednn = pytest.mark.skipif(few_rows._ONEDNN_LINEAR is None, reason="no oneDNN linear in this torch build")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 9, 40])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 300, generator=g)
    w = torch.randn(500, 300, generator=g)
    b = torch.randn(500, generator=g) if bias else None
    with torch.no_grad():
        got, want = few_row_linear(x, w, b), F.linear(x, w, b)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)  # outputs are ~17 in size
    # A wrong variant (the bias dropped, or the weight transposed the other way) is far outside that tolerance.
    if bias:
        assert (F.linear(x, w) - want).abs().max() > 1.0


@needs_onednn
def test_kernel_choice():
    w = torch.zeros(16, 8)
    with torch.no_grad():
        assert [uses_onednn(torch.zeros(r, 8), w) for r in (1, 2, 3, 8, 9)] == [False, False, True, True, False]
        assert uses_onednn(torch.zeros(2, 2, 8), w)  # rows are counted over all leading dims
        assert not uses_onednn(torch.zeros(4, 8, dtype=torch.bfloat16), w.bfloat16())
    assert not uses_onednn(torch.zeros(4, 8), w)  # gradients recorded: the differentiable F.linear


@needs_onednn
def test_gradients_flow_when_recorded():
    w = torch.randn(6, 5, requires_grad=True)
    few_row_linear(torch.randn(4, 5), w).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_few_row_linear_module_keeps_hooks_and_linear_identity():
    """ConvNeXt's pointwise layers use FewRowLinear: still nn.Linear (PEFT targets it) and still called as a
    module (forward hooks fire), with F.linear's values."""
    from qwen3omni.modules.causal_conv import ConvNeXtBlock1d
    from qwen3omni.modules.few_rows import FewRowLinear

    block = ConvNeXtBlock1d(16).eval()
    assert isinstance(block.pwconv1, FewRowLinear) and isinstance(block.pwconv1, torch.nn.Linear)
    seen = []
    block.pwconv1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(1, 4, 16)
    with torch.no_grad():
        got = block.pwconv1(x)
    assert seen == [torch.Size([1, 4, 64])]
    torch.testing.assert_close(got, F.linear(x, block.pwconv1.weight, block.pwconv1.bias), rtol=1e-5, atol=1e-5)
