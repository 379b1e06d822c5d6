"""Code predictor parity against the transformers reference (fp32, CPU): per-step logits and greedy codes of
several frames, teacher-forced logits, sampling with its own knobs, and a decode loop free of host syncs."""

from __future__ import annotations

import contextlib

import pytest
import torch

from qwen3omni.config import Qwen3OmniConfig
from qwen3omni.errors import InputError
from qwen3omni.generation.sampling import SamplingConfig, warp
from qwen3omni.model.code_predictor import CodePredictor, predictor_sampling
from qwen3omni.model.omni import Qwen3Omni
from qwen3omni.modules import cpu_kernels
from qwen3omni.modules.mlp import SwiGLU

from reference import build_reference, max_rel_err, save_reference, tiny_config

# Our per-step logits equal the reference's to ~1e-7 (same ops); the reference's own eager and sdpa paths differ
# by ~1e-7 too, while a wrong rotary theta or a missing q/k norm moves them by >= 1e-2 (see the calibration test).
TOL = 1e-4

# Another shape: GQA 4:1, three layers, a wider MLP, other head_dim and rope theta.
VARIANT = {
    "talker_config.code_predictor_config.num_key_value_heads": 1,
    "talker_config.code_predictor_config.num_hidden_layers": 3,
    "talker_config.code_predictor_config.layer_types": ["full_attention"] * 3,
    "talker_config.code_predictor_config.intermediate_size": 128,
    "talker_config.code_predictor_config.head_dim": 32,
    "talker_config.code_predictor_config.rope_parameters.rope_theta": 1000,
}


class Pair:
    def __init__(self, talker, ref_talker):
        self.talker, self.ref = talker, ref_talker
        self.ours: CodePredictor = talker.code_predictor
        self.hidden = talker.config.code_predictor.hidden_size


def _load(path):
    return Qwen3Omni.from_pretrained(path, dtype=torch.float32, components={"talker"}).talker


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return Pair(_load(tiny_checkpoint.path), tiny_checkpoint.reference.talker)


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    ref = build_reference(tiny_config(VARIANT), seed=7)
    return Pair(_load(save_reference(ref, tmp_path_factory.mktemp("predictor_variant"))), ref.talker)


def _frames(pair: Pair, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, pair.hidden, generator=g)
    layer0 = torch.randint(0, pair.talker.config.text.vocab_size, (B,), generator=g)
    return hidden, layer0


def _reference_generate(pair: Pair, hidden, layer0, **kw):
    embeds = torch.stack([hidden, pair.ref.model.codec_embedding(layer0)], dim=1)
    with torch.no_grad():
        return pair.ref.code_predictor.generate(
            inputs_embeds=embeds, max_new_tokens=pair.ours.num_residual, output_logits=True,
            output_hidden_states=True, return_dict_in_generate=True, **kw,
        )


def _greedy_frame_matches_reference(pair: Pair, hidden, layer0):
    """Our greedy frame for these rows and the reference's: equal codes, each step's logits within TOL."""
    ref = _reference_generate(pair, hidden, layer0, do_sample=False)
    frame = pair.talker.predict_residual(hidden, layer0, return_logits=True)
    assert torch.equal(frame.codes, ref.sequences)
    ref_logits = torch.stack(ref.logits, dim=1)
    for step in range(pair.ours.num_residual):
        assert max_rel_err(frame.logits[:, step], ref_logits[:, step]) < TOL, step
    # codes differ across rows and steps: the fixture is not degenerate
    assert len(set(frame.codes.flatten().tolist())) > frame.codes.numel() // 2
    return frame, ref


@pytest.mark.parametrize("which", ["tiny", "variant"])
def test_greedy_codes_and_step_logits_match_reference(which, request):
    pair = request.getfixturevalue(which)
    hidden, layer0 = _frames(pair)
    frame, ref = _greedy_frame_matches_reference(pair, hidden, layer0)
    # the embedding the next talker step consumes, as the reference's prepare_inputs_for_generation sums it
    mid = [h[0] for h in ref.hidden_states[1:]]
    last = pair.ref.code_predictor.get_input_embeddings()[-1](ref.sequences[:, -1:])
    with torch.no_grad():
        ref_sum = torch.cat([pair.ref.model.codec_embedding(layer0)[:, None], *mid, last], dim=1).sum(1)
        assert torch.equal(frame.next_talker_embed, ref_sum)
        assert torch.equal(pair.talker.codec_step_embedding(layer0, frame.codes), ref_sum)


def test_calibration(tiny, tiny_checkpoint):
    """Wrong variants move the step logits by >= 1e-2; the reference's eager vs sdpa paths stay far below TOL."""
    from reference import set_reference_attention

    hidden, layer0 = _frames(tiny)
    sdpa = torch.stack(_reference_generate(tiny, hidden, layer0, do_sample=False).logits, dim=1)
    try:
        set_reference_attention(tiny_checkpoint.reference, "eager")
        eager = torch.stack(_reference_generate(tiny, hidden, layer0, do_sample=False).logits, dim=1)
    finally:
        set_reference_attention(tiny_checkpoint.reference, "sdpa")
    assert max_rel_err(eager, sdpa) < TOL / 10

    def first_step_err(edit) -> float:
        model = CodePredictor(tiny.talker.config.code_predictor).eval()
        model.load_state_dict(tiny.ours.state_dict())
        edit(model)
        frame = model.predict(hidden, tiny.talker.model.codec_embedding(layer0), return_logits=True)
        # compare the first 2 steps (fed back the same codes as the reference when they agree)
        return max_rel_err(frame.logits[:, :2], sdpa[:, :2])

    assert first_step_err(lambda m: None) < TOL

    def theta(m):
        m.model.rotary.theta = 100.0
        m.model.rotary.reset_buffers()

    def no_qk_norm(m):
        for layer in m.model.layers:
            layer.self_attn.q_norm = layer.self_attn.k_norm = None

    assert first_step_err(theta) >= 1e-2
    assert first_step_err(no_qk_norm) >= 1e-2


@pytest.mark.parametrize("which", ["tiny", "variant"])
def test_teacher_forced_logits_equal_step_by_step(which, request):
    pair = request.getfixturevalue(which)
    hidden, layer0 = _frames(pair, B=6, seed=1)
    frame = pair.talker.predict_residual(hidden, layer0, return_logits=True)
    codes = torch.cat([layer0[:, None], frame.codes], dim=1)  # [6, 16]
    # the 6 frames as a [2, 3] batch of sequences
    with torch.no_grad():
        tf = pair.talker.code_predictor_logits(hidden.view(2, 3, -1), codes.view(2, 3, -1))
    assert tf.shape == (2, 3, pair.ours.num_residual, pair.ours.config.vocab_size)
    assert max_rel_err(tf.view(6, *tf.shape[2:]), frame.logits) < TOL


def test_forward_is_teacher_forcing_and_hooks_see_the_talkers_call(tiny):
    """`talker.code_predictor(...)` is the teacher-forced pass, and the talker's training call goes through it,
    so a forward hook on the code predictor fires (it used to have no forward at all)."""
    hidden, layer0 = _frames(tiny, B=4, seed=2)
    frame = tiny.talker.predict_residual(hidden, layer0)
    codes = torch.cat([layer0[:, None], frame.codes], dim=1).view(2, 2, -1)
    seen = []
    handle = tiny.talker.code_predictor.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            via_talker = tiny.talker.code_predictor_logits(hidden.view(2, 2, -1), codes)
            layer0_embed = tiny.talker.model.codec_embedding(codes[..., 0])
            direct = tiny.talker.code_predictor(hidden.view(2, 2, -1), layer0_embed, codes[..., 1:])
    finally:
        handle.remove()
    assert seen == [via_talker.shape, direct.shape]
    assert torch.equal(via_talker, direct)


@pytest.mark.parametrize("B", [3, 2])
def test_sampling_matches_reference_draws(tiny, B):
    """With the reference's knobs (top_k 50, top_p 0.8, temperature 1) and the same global seed, our draws equal
    the reference's sampled codes: same distribution after warping, same multinomial calls. A batch of 3 runs
    the torch steps, a batch of 2 the native steps (one native call per step, where the kernel runs)."""
    hidden, layer0 = _frames(tiny, B=B, seed=2)
    with torch.no_grad():
        assert (tiny.ours.native_step(tiny.ours.new_cache(B)) is not None) == (NATIVE and B <= 2)
    for seed in (0, 1):
        torch.manual_seed(seed)
        ref = _reference_generate(tiny, hidden, layer0, do_sample=True, top_k=50, top_p=0.8)
        torch.manual_seed(seed)
        ours = tiny.talker.predict_residual(hidden, layer0, predictor_sampling(True))
        assert torch.equal(ours.codes, ref.sequences)
    greedy = tiny.talker.predict_residual(hidden, layer0, predictor_sampling(False))
    assert not torch.equal(ours.codes, greedy.codes)  # sampling did something


def test_sampling_knobs(tiny):
    hidden, layer0 = _frames(tiny, B=8, seed=3)
    greedy = tiny.talker.predict_residual(hidden, layer0).codes
    g = torch.Generator().manual_seed(0)
    top1 = tiny.talker.predict_residual(hidden, layer0, SamplingConfig(True, temperature=2.0, top_k=1), g).codes
    assert torch.equal(top1, greedy)
    knobs = SamplingConfig(True, temperature=1.5, top_k=5)
    for _ in range(2):
        frame = tiny.talker.predict_residual(hidden, layer0, knobs, g, return_logits=True)
        allowed = torch.isfinite(warp(frame.logits.flatten(0, 1), knobs)).view_as(frame.logits)
        assert allowed.gather(-1, frame.codes.unsqueeze(-1)).all()  # every draw inside its step's top 5
    # a generator makes draws reproducible
    a = tiny.talker.predict_residual(hidden, layer0, knobs, torch.Generator().manual_seed(9)).codes
    b = tiny.talker.predict_residual(hidden, layer0, knobs, torch.Generator().manual_seed(9)).codes
    assert torch.equal(a, b)


def test_reused_cache_and_no_host_sync(tiny):
    """A cache from new_cache serves frame after frame; the loop never reads a tensor value on the host."""
    hidden, layer0 = _frames(tiny, B=2, seed=4)
    embed = tiny.talker.model.codec_embedding(layer0)
    fresh = tiny.ours.predict(hidden, embed)
    fresh_sampled = tiny.ours.predict(hidden, embed, predictor_sampling(True), torch.Generator().manual_seed(0))
    cache = tiny.ours.new_cache(2)
    with _no_host_reads():
        frames = [
            tiny.ours.predict(hidden, embed, sampling, torch.Generator().manual_seed(0), cache=cache)
            for sampling in (None, predictor_sampling(True), None)
        ]
    assert cache.capacity == tiny.ours.num_residual + 1  # never grew
    assert torch.equal(frames[0].codes, fresh.codes) and torch.equal(frames[2].codes, fresh.codes)
    assert torch.equal(frames[1].codes, fresh_sampled.codes)


@contextlib.contextmanager
def _no_host_reads():
    def fail(*args, **kwargs):
        raise AssertionError("host sync inside the code predictor loop")

    saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__int__", "__index__")}
    try:
        for name in saved:
            setattr(torch.Tensor, name, fail)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def test_rejects_bad_input(tiny):
    hidden, layer0 = _frames(tiny, B=2)
    embed = tiny.talker.model.codec_embedding(layer0)
    with pytest.raises(InputError, match="talker_hidden_BC"):
        tiny.ours.predict(hidden[:, :5], embed)
    with pytest.raises(InputError, match="layer0_embed_BC"):
        tiny.ours.predict(hidden, embed[:1])
    with pytest.raises(InputError, match="cache"):
        tiny.ours.predict(hidden, embed, cache=tiny.ours.new_cache(3))
    with pytest.raises(InputError, match="codes_BTG"):
        tiny.talker.code_predictor_logits(hidden[:, None], torch.zeros(2, 1, 15, dtype=torch.long))
    # code 0 as ids through the talker: checked before the embedding lookup would fail inside torch
    vocab = tiny.talker.config.text.vocab_size
    cases = ((torch.tensor([0, vocab]), f"in \\[0, {vocab}\\), got {vocab}"), (torch.tensor([-1, 0]), "got -1"),
             (layer0.float(), "integer"), (layer0[:, None], "1-D"), (layer0[:1], "one per row"))
    for bad, says in cases:
        with pytest.raises(InputError, match="layer0_ids_B") as err:
            tiny.talker.predict_residual(hidden, bad)
        assert err.match(says), err.value
    assert tiny.talker.predict_residual(hidden, torch.tensor([0, vocab - 1])).codes.shape == (2, 15)
    with pytest.raises(InputError, match="layer0_ids_B: expected a 1-D"):  # shapes even without the value check
        tiny.talker.predict_residual(hidden, layer0[:, None], check_ids=False)


def test_config_mirrors_released_counts():
    cfg = Qwen3OmniConfig.from_dict(tiny_config())
    model = CodePredictor(cfg.talker.code_predictor)
    assert len(model.lm_head) == len(model.model.codec_embedding) == cfg.talker.num_code_groups - 1


# ---- the native step (`modules.dense_step`, `csrc/dense_step.cpp`) -----------------------------------------------
NATIVE = cpu_kernels.dense_step() is not None  # AVX-512 and a C++ compiler (this project's CI machine has both)
needs_native = pytest.mark.skipif(not NATIVE, reason="the native dense step needs AVX-512 and a C++ compiler")


@needs_native
@pytest.mark.parametrize("which", ["tiny", "variant"])
@pytest.mark.parametrize("B", [1, 2])
def test_native_step_matches_reference(which, B, request):
    """Batches of 1 and 2 run every step natively; codes equal the reference's and logits stay within TOL (the
    variant has 4 query heads per key head, another head_dim and theta). The torch path agrees to ~1e-6."""
    pair = request.getfixturevalue(which)
    hidden, layer0 = _frames(pair, B=B, seed=5)
    with torch.no_grad():  # (predict runs without gradients; the native step only serves such calls)
        assert pair.ours.native_step(pair.ours.new_cache(B)) is not None
    frame, _ = _greedy_frame_matches_reference(pair, hidden, layer0)
    pair.ours.cpu_kernel = False
    try:
        with torch.no_grad():
            assert pair.ours.native_step(pair.ours.new_cache(B)) is None
        torch_path = pair.talker.predict_residual(hidden, layer0, return_logits=True)
    finally:
        pair.ours.cpu_kernel = True
    assert torch.equal(frame.codes, torch_path.codes)
    assert max_rel_err(frame.logits, torch_path.logits) < 1e-5


@needs_native
@pytest.mark.parametrize("which", ["tiny", "variant"])
def test_native_step_avx2_build_matches_reference(which, request, monkeypatch):
    """The AVX2 build (8-float vectors), which CPUs without AVX-512 get, runs here too (this CPU has both): its
    codes equal the reference's and its logits stay within TOL. The MoE kernel has no AVX2 build."""
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setattr(cpu_kernels.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert cpu_kernels.grouped_gemm() is None
    pair = request.getfixturevalue(which)
    hidden, layer0 = _frames(pair, B=2, seed=9)
    with torch.no_grad():
        assert pair.ours.native_step(pair.ours.new_cache(2)) is not None
    _greedy_frame_matches_reference(pair, hidden, layer0)
    assert cpu_kernels._loaded["dense_step"] is not None  # the AVX2 build ran these frames


@needs_native
def test_native_step_is_thread_count_invariant(variant):
    """Each output value is one dot product summed in one order, whichever thread computes it."""
    hidden, layer0 = _frames(variant, B=2, seed=6)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            runs.append(variant.talker.predict_residual(hidden, layer0, return_logits=True).logits)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[1])


@needs_native
def test_native_step_steps_aside(tiny):
    """Hooks on the stack or a head, a batch of 3, bf16 weights, a padded cache, layers of unequal widths, or
    `cpu_kernel = False` keep the torch path; a hook then sees every layer call. (Without gradients, as
    `predict` runs.)"""
    torch.set_grad_enabled(False)
    try:
        _check_native_steps_aside(tiny)
    finally:
        torch.set_grad_enabled(True)


def _check_native_steps_aside(tiny):
    ours = tiny.ours
    assert ours.native_step(ours.new_cache(3)) is None
    seen = []
    for module in (ours.model.layers[1].mlp.down_proj, ours.lm_head[4]):
        handle = module.register_forward_hook(lambda m, args, out: seen.append(1))
        try:
            assert ours.native_step(ours.new_cache(1)) is None
            hidden, layer0 = _frames(tiny, B=1, seed=7)
            tiny.talker.predict_residual(hidden, layer0)
        finally:
            handle.remove()
    assert len(seen) == ours.num_residual + 1  # 15 layer calls, then one call of head 4
    assert ours.native_step(ours.new_cache(1)) is not None
    half = CodePredictor(ours.config).to(torch.bfloat16).eval()
    assert half.native_step(half.new_cache(1)) is None
    padded = ours.new_cache(1)
    padded.has_padding = True
    assert ours.native_step(padded) is None
    other = CodePredictor(ours.config).eval()  # one layer with a wider MLP: the kernel takes one set of widths
    other.model.layers[1].mlp = SwiGLU(ours.config.hidden_size, 2 * ours.config.intermediate_size)
    assert other.native_step(other.new_cache(1)) is None


@needs_native
def test_native_step_rejects_bad_calls(tiny):
    from qwen3omni.modules.dense_step import NativeDenseStep

    with torch.no_grad():
        native = NativeDenseStep.create(tiny.ours.model, tiny.ours.new_cache(1), 1)
    C = tiny.hidden
    with pytest.raises(ValueError, match=r"x_BTC: expected batch 1.*got 2x1 tokens at 0"):
        native.step(torch.randn(2, 1, C), 0)
    with pytest.raises(ValueError, match=r"x_BTC: .*got 1x1 tokens at 16"):
        native.step(torch.randn(1, 1, C), 16)
    with pytest.raises(ValueError, match=r"head: expected a contiguous float32 CPU weight"):
        native.step(torch.randn(1, 1, C), 0, head=torch.randn(C, 8).t())
    # a greedy frame's outputs are written by the kernel: their dtypes are checked, not assumed
    n, V = tiny.ours.num_residual, tiny.ours.config.vocab_size
    heads, tables = [h.weight for h in tiny.ours.lm_head], [t.weight for t in tiny.ours.model.codec_embedding]
    seq, logits = torch.zeros(1, n + 2, C), torch.zeros(1, n, V)
    with pytest.raises(ValueError, match=r"greedy_frame: .*codes torch.int32"):
        native.greedy_frame(seq, heads, tables, torch.zeros(1, n, dtype=torch.int32), logits)


@needs_native
def test_native_greedy_frame_takes_a_nan_as_the_maximum(tiny):
    """As torch.argmax does: a head row of NaN weights makes that code the choice on both paths."""
    hidden, layer0 = _frames(tiny, B=2, seed=10)
    head = tiny.ours.lm_head[3].weight
    saved = head.detach().clone()
    try:
        with torch.no_grad():
            head[7] = float("nan")
        native = tiny.talker.predict_residual(hidden, layer0).codes
        tiny.ours.cpu_kernel = False
        torch_path = tiny.talker.predict_residual(hidden, layer0).codes
    finally:
        tiny.ours.cpu_kernel = True
        with torch.no_grad():
            head.copy_(saved)
    assert (native[:, 3] == 7).all()
    assert torch.equal(native[:, :4], torch_path[:, :4])


def test_native_step_build_failure_falls_back(monkeypatch, tmp_path, tiny):
    """A compiler that fails gives one warning and no kernel; frames then come from the torch path."""
    hidden, layer0 = _frames(tiny, B=1, seed=8)
    expected = tiny.talker.predict_residual(hidden, layer0).codes
    monkeypatch.setenv("QWEN3OMNI_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: "/bin/false")
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setattr(cpu_kernels, "ENABLED", True)
    monkeypatch.setattr(cpu_kernels.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    with pytest.warns(UserWarning, match="dense_step could not be built"), torch.no_grad():
        assert tiny.ours.native_step(tiny.ours.new_cache(1)) is None
    assert list(tmp_path.iterdir()) == []
    assert torch.equal(tiny.talker.predict_residual(hidden, layer0).codes, expected)
