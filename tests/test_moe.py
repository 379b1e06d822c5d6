"""MoE dispatch: every strategy of `Experts` equals the obviously-correct `moe_reference` loop.

Routings are random, include experts that receive no token (and, in the skewed cases, experts that receive
almost all of them), batches of one token (decoding) and many (prefill), renormalised and raw top-k weights,
and a gradient check for the strategies training uses. Relative tolerance 1e-5: the strategies differ from
the reference only in summation order (~1e-7 in fp32); a wrong expert, weight or token order moves the output
by O(1) (checked below so the comparison cannot pass vacuously).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from qwen3omni.modules import cpu_kernels
from qwen3omni.modules.moe import Experts, MoeBlock, Routing, grouped_mm_usable, moe_reference

TOL = 1e-5
KERNEL = cpu_kernels.grouped_gemm() is not None  # AVX-512 and a C++ compiler (this project's CI machine has both)
GROUPED_MM = ["grouped_mm"] if hasattr(torch, "_grouped_mm") else []
STRATEGIES = ["pairs", "sorted", "gathered"] + GROUPED_MM + (["cpu_kernel"] if KERNEL else [])


def experts(E=8, H=32, inner=16, seed=0, dtype=torch.float32) -> Experts:
    g = torch.Generator().manual_seed(seed)
    ex = Experts(E, H, inner)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=g) / H**0.5)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=g) / inner**0.5)
    return ex.to(dtype)


def routing(N, E, k, seed=0, skew=False, normalize=True, dtype=torch.float32) -> Routing:
    """Random top-k choices; `skew` sends every pair to the first k + 1 experts and leaves the others idle."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(N, E, generator=g)
    if skew:
        scores[:, : k + 1] += 10.0
    choices = torch.topk(scores, k, dim=-1).indices
    weights = torch.rand(N, k, generator=g) + 0.1
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return Routing(torch.zeros(N, E), weights.to(dtype), choices)


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


CASES = [  # (tokens, experts, top_k, skew): one token (decode), few, many, skewed with idle experts
    (1, 8, 2, False), (3, 8, 2, False), (5, 16, 4, False), (64, 8, 2, False), (64, 16, 4, True), (7, 128, 8, True),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-E{c[1]}-k{c[2]}{'-skew' if c[3] else ''}")
def test_strategy_matches_reference(strategy, case):
    N, E, k, skew = case
    ex = experts(E=E, seed=N)
    ex.dispatch = strategy
    r = routing(N, E, k, seed=N + 1, skew=skew, normalize=not skew)
    x = torch.randn(N, 32, generator=torch.Generator().manual_seed(N + 2))
    with torch.no_grad():
        want = moe_reference(ex, x, r)
        got = ex(x, r)
    assert got.shape == want.shape
    assert rel_err(got, want) < TOL
    if skew:
        assert (torch.bincount(r.experts.flatten(), minlength=E) == 0).any()  # the case has idle experts


def test_a_wrong_routing_is_detected():
    """The comparison has teeth: a shuffled expert choice or dropped weight moves the output by O(1)."""
    ex = experts()
    r = routing(6, 8, 2)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = moe_reference(ex, x, r)
        wrong_expert = ex(x, Routing(r.logits, r.weights, (r.experts + 1) % 8))
        wrong_weight = ex(x, Routing(r.logits, r.weights.flip(-1), r.experts))
    assert rel_err(wrong_expert, want) > 1e-2
    assert rel_err(wrong_weight, want) > 1e-2


def test_auto_picks_pairs_for_decode_and_grouping_for_prefill_on_cpu():
    ex = experts()
    one, many = torch.randn(1, 32), torch.randn(32, 32)
    assert ex.strategy(one, routing(1, 8, 2)) == "pairs"
    assert ex.strategy(many, routing(32, 8, 2)) == "sorted"  # the parameters record gradients
    with torch.no_grad():
        assert ex.strategy(many, routing(32, 8, 2)) == ("cpu_kernel" if KERNEL else "sorted")
    assert not grouped_mm_usable(one, ex.gate_up_proj)  # CPU: never the (slow) CPU _grouped_mm by default


@pytest.mark.parametrize("strategy", ["pairs", "sorted", "gathered"])
def test_gradients_match_reference(strategy):
    """Training runs through the same strategies: gradients of input, expert weights and routing weights."""
    ex = experts(seed=5)
    ex.dispatch = strategy
    r = routing(6, 8, 2, seed=6)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(7))

    def grads(fn):
        ex.zero_grad()
        xi, w = x.clone().requires_grad_(), r.weights.clone().requires_grad_()
        fn(xi, Routing(r.logits, w, r.experts)).square().sum().backward()
        return xi.grad, w.grad, ex.gate_up_proj.grad.clone(), ex.down_proj.grad.clone()

    want = grads(lambda xi, rr: moe_reference(ex, xi, rr))
    got = grads(lambda xi, rr: ex(xi, rr))
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL


@pytest.mark.parametrize("strategy", ["pairs", "sorted", "auto"] + GROUPED_MM)
def test_bf16_close_to_fp32(strategy):
    """bf16 weights and activations: within bf16 rounding of the fp32 result, no overflow or NaN."""
    ex32 = experts(E=16, H=64, inner=32, seed=8)
    ex16 = experts(E=16, H=64, inner=32, seed=8, dtype=torch.bfloat16)
    ex16.dispatch = strategy
    r = routing(9, 16, 4, seed=9)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        want = moe_reference(ex32, x, r)
        got = ex16(x.bfloat16(), Routing(r.logits, r.weights.bfloat16(), r.experts))
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert rel_err(got.float(), want) < 3e-2
    assert rel_err(got.float().roll(1, 0), want) > 0.5  # another token's output is far off


@pytest.mark.parametrize("dim,inner", [(16, 8), (12, 8), (16, 6)])
def test_bf16_prefill_any_width(dim, inner):
    """bf16 CPU prefill at widths the grouped kernel cannot take (rows not 16-byte multiples) falls back to the
    sorted loop instead of raising, and agrees with the reference loop."""
    ex = experts(E=4, H=dim, inner=inner, seed=3, dtype=torch.bfloat16)
    r = routing(10, 4, 2, seed=4)
    x = torch.randn(10, dim, generator=torch.Generator().manual_seed(5)).bfloat16()
    r16 = Routing(r.logits, r.weights.bfloat16(), r.experts)
    with torch.no_grad():
        got, want = ex(x, r16), moe_reference(ex, x, r16)
    assert rel_err(got.float(), want.float()) < 3e-2


def test_cpu_strategy_choice():
    """CPU: pairs for a few tokens; then cpu_kernel for float32 inference, grouped_mm for bf16 inference, and
    sorted when training."""
    ex32 = experts(E=16, H=64, inner=32, seed=8)
    ex16 = experts(E=16, H=64, inner=32, seed=8, dtype=torch.bfloat16)
    few, many = routing(2, 16, 4, seed=1), routing(9, 16, 4, seed=2)
    x2, x9 = torch.zeros(2, 64), torch.zeros(9, 64)
    with torch.no_grad():
        assert ex16.strategy(x2.bfloat16(), few) == ex32.strategy(x2, few) == "pairs"
        assert ex32.strategy(x9, many) == ("cpu_kernel" if KERNEL else "sorted")
        from qwen3omni.modules.moe import _CPU_GROUPED_MM  # torch >= 2.9 has the CPU kernel

        assert ex16.strategy(x9.bfloat16(), many) == ("grouped_mm" if _CPU_GROUPED_MM else "sorted")
    assert ex16.strategy(x9.bfloat16(), many) == "sorted"  # gradients recorded
    assert ex32.strategy(x9, many) == "sorted"


def test_block_with_shared_expert_uses_dispatch():
    """MoeBlock output = routed experts + sigmoid-gated shared expert, identical for every strategy."""
    torch.manual_seed(11)
    block = MoeBlock(32, 8, 2, 16, normalize=True, shared_hidden=24)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        want, _ = block(x, reference=True)
        for strategy in STRATEGIES:
            block.experts.dispatch = strategy
            got, logits = block(x)
            assert rel_err(got, want) < TOL, strategy
            assert logits.shape == (10, 8)


@pytest.mark.parametrize("strategy", ["pairs", "sorted", "gathered"])
def test_autocast_keeps_the_input_dtype(strategy):
    """Training under bf16 autocast: fp32 activations in, fp32 out (as the reference returns), close to fp32."""
    ex = experts(E=16, H=64, inner=32, seed=12)
    ex.dispatch = strategy
    r = routing(9, 16, 4, seed=13)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        want = moe_reference(ex, x, r)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ex(x, r)
    assert got.dtype == torch.float32
    assert rel_err(got, want) < 3e-2


def test_unknown_dispatch_is_an_input_error():
    from qwen3omni.errors import InputError

    ex = experts()
    ex.dispatch = "sortd"
    with pytest.raises(InputError, match="dispatch: expected one of .*'sortd'"):
        ex(torch.randn(3, 32), routing(3, 8, 2))


# ---- the native CPU kernel (`cpu_kernels`) ------------------------------------------------------------------------
needs_kernel = pytest.mark.skipif(not KERNEL, reason="the native CPU kernel needs AVX-512 and a C++ compiler")


@needs_kernel
@pytest.mark.parametrize(
    "E,H,inner,N,k,skew",
    [
        (16, 64, 32, 300, 4, True),  # groups of ~240 tokens: five 48-column panels, in two chunks of four and one
        (8, 30, 13, 37, 3, False),  # rows not a multiple of the 8-row tile, odd widths, 16/32/48-wide panels
        (128, 48, 24, 9, 8, False),  # most experts idle, groups of one or two tokens
    ],
)
def test_cpu_kernel_matches_reference_at_awkward_sizes(E, H, inner, N, k, skew):
    ex = experts(E=E, H=H, inner=inner, seed=N)
    r = routing(N, E, k, seed=N + 1, skew=skew)
    x = torch.randn(N, H, generator=torch.Generator().manual_seed(N + 2))
    with torch.no_grad():
        want = moe_reference(ex, x, r)
        ex.dispatch = "cpu_kernel"
        got = ex(x, r)
        ex.dispatch = "sorted"
        sorted_ = ex(x, r)
    assert rel_err(got, want) < TOL
    assert rel_err(got, sorted_) < TOL
    assert rel_err(got.roll(1, 0), want) > 0.1  # another token's output is far off


def kernel_case(seed: int):
    """16 experts, 70 tokens top-4 (groups of ~17 tokens): experts, routing and input for the kernel."""
    ex = experts(E=16, H=64, inner=40, seed=seed)
    ex.dispatch = "cpu_kernel"
    return ex, routing(70, 16, 4, seed=seed + 1), torch.randn(70, 64, generator=torch.Generator().manual_seed(seed))


@needs_kernel
def test_cpu_kernel_in_token_slices_equals_one_call():
    """Long prefills go through the kernel a slice of tokens at a time (bounded temporaries): same result."""
    ex, r, x = kernel_case(4)
    with torch.no_grad():
        whole = ex(x, r)
        ex.kernel_tokens = 16  # 5 slices, the last one short
        sliced = ex(x, r)
        want = moe_reference(ex, x, r)
    assert torch.equal(whole, sliced)
    assert rel_err(sliced, want) < TOL


@needs_kernel
def test_cpu_kernel_does_not_depend_on_the_thread_count():
    """Threads split the weight rows; every output element is summed in the same order whatever their number."""
    ex, r, x = kernel_case(1)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outs.append(ex(x, r))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def test_cpu_kernel_refuses_what_it_cannot_run():
    from qwen3omni.errors import InputError

    ex = experts(dtype=torch.bfloat16)
    ex.dispatch = "cpu_kernel"
    r = routing(6, 8, 2)
    with torch.no_grad(), pytest.raises(InputError, match="'cpu_kernel' needs float32 CPU tensors.*bfloat16"):
        ex(torch.randn(6, 32).bfloat16(), Routing(r.logits, r.weights.bfloat16(), r.experts))


@needs_kernel
def test_cpu_kernel_rejects_an_expert_id_out_of_range():
    from qwen3omni.errors import InputError

    ex = experts()  # 8 experts
    ex.dispatch = "cpu_kernel"
    r = routing(6, 8, 2)
    bad = r.experts.clone()
    bad[3, 1] = 8
    with torch.no_grad(), pytest.raises(InputError, match=r"routing.experts: expected ids in \[0, 8\), got 8"):
        ex(torch.randn(6, 32), Routing(r.logits, r.weights, bad))


def test_cpu_kernel_build_failure_falls_back(monkeypatch, tmp_path):
    """A compiler that fails gives a warning and no kernel (the MoE keeps its torch path); nothing half-written
    is left in the cache."""
    monkeypatch.setenv("QWEN3OMNI_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: "/bin/false")
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setattr(cpu_kernels, "ENABLED", True)
    monkeypatch.setattr(cpu_kernels.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    with pytest.warns(UserWarning, match="could not be built"):
        assert cpu_kernels.grouped_gemm() is None
    assert list(tmp_path.iterdir()) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernels.grouped_gemm() is None  # remembered: no second build, no second warning
    ex = experts()
    with torch.no_grad():
        assert ex.strategy(torch.randn(9, 32), routing(9, 8, 2)) == "sorted"


def test_cpu_kernel_cache_falls_back_to_a_temp_folder(monkeypatch, tmp_path):
    """A cache home that cannot be created (a file in its way, as with a read-only home) gives a per-user
    folder in the temp directory instead of failing the build."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.delenv("QWEN3OMNI_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setattr(cpu_kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert cpu_kernels.cache_dir().parent == tmp_path / "tmp"
