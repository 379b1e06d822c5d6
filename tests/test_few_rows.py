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


# ---- one row in bf16: torch.mv ------------------------------------------------------------------------------
def test_matvec_choice():
    from qwen3omni.modules.few_rows import uses_matvec

    w = torch.zeros(16, 8, dtype=torch.bfloat16)
    x = torch.zeros(1, 1, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert uses_matvec(x, w) and uses_matvec(x[0, 0], w)  # one row, any leading dims
        assert not uses_matvec(torch.zeros(1, 2, 8, dtype=torch.bfloat16), w)  # two rows: F.linear
        assert not uses_matvec(x.float(), w.float())  # float32 stays on F.linear, bit for bit as before
    assert not uses_matvec(x, w)  # gradients recorded


@pytest.mark.parametrize("bias", [True, False])
def test_one_bf16_row_matches_linear(bias):
    """Same products as F.linear in bf16, up to bf16 rounding of the outputs (the summation order differs)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 1, 300, generator=g).bfloat16()
    w = torch.randn(500, 300, generator=g).bfloat16()
    b = torch.randn(500, generator=g).bfloat16() if bias else None
    with torch.no_grad():
        got, want = few_row_linear(x, w, b), F.linear(x, w, b)
        exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.bfloat16 and got.shape == want.shape == (1, 1, 500)
    scale = exact.abs().max()  # ~60; one bf16 step at that size is 0.25-0.5
    assert (got.double() - exact).abs().max() <= 0.01 * scale
    assert (got.double() - want.double()).abs().max() <= 0.01 * scale
    # Wrong variants land far outside: the bias dropped, or another row of the weight.
    if bias:
        assert (F.linear(x, w).double() - exact).abs().max() > 0.03 * scale
    assert (F.linear(x, w.roll(1, 0), b).double() - exact).abs().max() > 0.5 * scale


# ---- 2-8 rows in bf16: weight @ x.T ----------------------------------------------------------------------------
def test_weight_major_choice():
    from qwen3omni.modules.few_rows import uses_weight_major

    w = torch.zeros(16, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        got = [uses_weight_major(torch.zeros(r, 8, dtype=torch.bfloat16), w) for r in (1, 2, 8, 9)]
        assert got == [False, True, True, False]
        assert uses_weight_major(torch.zeros(1, 2, 8, dtype=torch.bfloat16), w)  # rows over all leading dims
        assert not uses_weight_major(torch.zeros(4, 8), w.float())  # float32: oneDNN's band, see above
    assert not uses_weight_major(torch.zeros(4, 8, dtype=torch.bfloat16), w)  # gradients recorded


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 300), (1, 5, 300), (8, 300)])
def test_few_bf16_rows_match_linear(shape, bias):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(*shape, generator=g).bfloat16()
    w = torch.randn(500, 300, generator=g).bfloat16()
    b = torch.randn(500, generator=g).bfloat16() if bias else None
    with torch.no_grad():
        got, want = few_row_linear(x, w, b), F.linear(x, w, b)
        exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.bfloat16 and got.shape == want.shape == (*shape[:-1], 500) and got.is_contiguous()
    scale = exact.abs().max()
    assert (got.double() - exact).abs().max() <= 0.01 * scale
    assert (got.double() - want.double()).abs().max() <= 0.01 * scale
    # rows kept apart: each output row is its own input row's product (a transposed mix-up would not be)
    assert (F.linear(x.flip(-2), w, b).double() - exact).abs().max() > 0.5 * scale


def test_bf16_decode_step_uses_matvec_and_stays_close(tiny_model, monkeypatch):
    """A bf16 model's one-token step on CPU routes its dense projections through torch.mv, and its logits stay
    within bf16 rounding of the float32 model's."""
    import copy

    thinker32 = tiny_model.thinker
    thinker16 = copy.deepcopy(thinker32).to(torch.bfloat16)
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    taken = []
    original = few_rows.uses_matvec
    monkeypatch.setattr(few_rows, "uses_matvec", lambda x, w: taken.append(original(x, w)) or taken[-1])
    with torch.no_grad():
        cache = thinker16.model.new_cache(1, 8)
        thinker16(input_ids=ids[:, :-1], cache=cache)
        taken.clear()
        position = torch.full((3, 1, 1), ids.shape[1] - 1)  # text only: the same position on all three axes
        step16 = thinker16(input_ids=ids[:, -1:], position_ids=position, cache=cache).logits.float()
        step32 = thinker32(input_ids=ids).logits[:, -1:]
    # q, k, v, o and the dense MLP's three (or shared-expert) projections per layer, plus the LM head
    assert sum(taken) >= 4 * len(thinker16.model.layers) + 1
    err = (step16 - step32).abs().max() / step32.abs().max()
    assert err < 0.05, err  # bf16 weights and activations through the whole stack
    assert (step32.roll(1, -1) - step32).abs().max() / step32.abs().max() > 0.3  # a wrong answer is far off


def test_compiled_one_bf16_row_keeps_the_matvec_op():
    """Under torch.compile the one-row bf16 product is the opaque `qwen3omni::matvec` (inductor would decompose
    a plain torch.mv into its own, slower reduction loop)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    w = torch.randn(32, 16).bfloat16()
    x = torch.randn(1, 16).bfloat16()
    with torch.no_grad():
        got = torch.compile(few_row_linear, backend=backend, fullgraph=True)(x, w)
    assert any("qwen3omni.matvec" in t for t in seen), seen
    assert torch.equal(got, torch.mv(w, x[0]).view(1, 32))  # the same kernel: the same bits


def test_autocast_chooses_the_dtype_on_every_row_count():
    """Under CPU autocast the output dtype is autocast's, whatever the row count (the oneDNN and mv kernels do
    not know autocast, so such calls stay on F.linear)."""
    from qwen3omni.modules.few_rows import FewRowLinear

    layer32 = FewRowLinear(16, 8).eval()
    layer16 = FewRowLinear(16, 8).bfloat16().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert {layer32(torch.randn(rows, 16)).dtype for rows in (1, 2, 4, 8, 9)} == {torch.bfloat16}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert layer16(torch.randn(1, 16).bfloat16()).dtype == torch.float16


@needs_onednn
def test_strided_bias_on_the_onednn_path():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(4, 32, generator=g), torch.randn(24, 32, generator=g)
    b = torch.randn(48, generator=g)[::2]  # a strided view
    with torch.no_grad():
        assert uses_onednn(x, w)
        torch.testing.assert_close(few_row_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
