"""`compile_decoding`: the decode steps of all three decoders through torch.compile give what the eager loops
give, and the compiled layer step really runs (a spy counts its calls). On a CPU inductor emits C++, so the
test needs a C++ compiler; on a GPU the same steps run inside the CUDA graphs (scripts/gpu_check.py)."""

from __future__ import annotations

import shutil

import pytest
import torch

from qwen3omni.modules import cpu_kernels, decoder, dense_step

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="inductor needs a C++ compiler on CPU")


@pytest.mark.parametrize("rows,native", [(1, False), (2, False), (1, True)])
def test_compiled_decode_steps_equal_eager(tiny_model, monkeypatch, rows, native):
    """With `native`, the code predictor's frames run through its native CPU step (which generation prefers
    to the compiled one) and only the thinker and talker steps are compiled."""
    from test_graph_paths import prompt

    if native and cpu_kernels.dense_step() is None:
        pytest.skip("the native code predictor step needs AVX-512 or AVX2 and a C++ compiler")
    monkeypatch.setattr(tiny_model.talker.code_predictor, "cpu_kernel", native)
    native_steps = {"n": 0}  # predictor steps run natively: one per step call, 15 per greedy-frame call
    for method, steps in (("step", 1), ("greedy_frame", 15)):
        real = getattr(dense_step.NativeDenseStep, method)

        def counted(self, *args, _real=real, _steps=steps, **kwargs):
            native_steps["n"] += _steps
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(dense_step.NativeDenseStep, method, counted)

    batch = prompt(tiny_model, rows)  # 2 rows: one left-padded, so the static caches mask padding
    kw = dict(max_new_tokens=6, talker_do_sample=False, talker_max_new_tokens=8)
    eager = tiny_model.generate(**batch, **kw)
    calls = {"n": 0}
    real_compile = torch.compile
    seen_options = []

    def spy_compile(fn, **options):
        seen_options.append(options)
        compiled = real_compile(fn, **options)

        def counted(*args):
            calls["n"] += 1
            return compiled(*args)

        return counted

    monkeypatch.setattr(decoder.torch, "compile", spy_compile)
    from torch._dynamo.utils import counters

    counters.clear()
    native_steps["n"] = 0
    tiny_model.compile_decoding()
    try:
        compiled = tiny_model.generate(**batch, **kw)
    finally:
        tiny_model.compile_decoding(False)
    # each stack compiles a whole layer: no graph break (there was one in attention once the three stacks'
    # shapes had turned symbolic by sharing one code object)
    assert not counters["graph_break"], dict(counters["graph_break"])
    layers = {
        "thinker": len(tiny_model.thinker.model.layers),
        "talker": len(tiny_model.talker.model.layers),
        "predictor": len(tiny_model.talker.code_predictor.model.layers),
    }
    frames = max(c.shape[-1] for c in eager.codes)
    # every decode step of every stack went through the compiled layer step
    least = (kw["max_new_tokens"] - 1) * layers["thinker"] + (frames - 1) * layers["talker"]
    if not native:
        least += frames * 15 * layers["predictor"]
    assert calls["n"] >= least
    assert native_steps["n"] == (frames * 15 if native else 0)  # batch 1: every frame's 15 steps, natively
    # CPU stacks compile with inductor's pass that fuses one-row products into the kernels around them
    assert len(seen_options) == 3
    assert all(o["options"]["post_grad_fusion_options"] == {"decompose_mm_pass": {}} for o in seen_options)
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b, wa, wb in zip(compiled.codes, eager.codes, compiled.audio, eager.audio):
        assert torch.equal(a, b)
        assert (wa - wb).abs().max() < 1e-4


def test_predictor_runner_follows_the_layer_step(tiny_model):
    from qwen3omni.generation.graphs import predictor_runner

    predictor = tiny_model.talker.code_predictor
    eager = predictor_runner(predictor, 1, torch.float32, "cpu")
    assert predictor_runner(predictor, 1, torch.float32, "cpu") is eager
    predictor.model.compile_decode_step()
    try:
        # graphs captured with the eager layers must not be replayed once the layers are compiled
        assert predictor_runner(predictor, 1, torch.float32, "cpu") is not eager
    finally:
        predictor.model.compile_decode_step(False)
    assert predictor_runner(predictor, 1, torch.float32, "cpu") is eager


def test_stacks_of_other_widths_compile_whole_layers(tiny_model):
    """Two stacks with other head counts, compiled in one process: each keeps its own graphs, with no graph
    break. (Sharing one code object, the second stack's shapes turned symbolic, and attention's GQA flag, then
    symbolic too, broke every graph in two.)"""
    import dataclasses

    from torch._dynamo.utils import counters

    from qwen3omni.model.code_predictor import CodePredictorModel

    cfg = tiny_model.talker.code_predictor.config
    torch.manual_seed(0)
    stacks = [CodePredictorModel(dataclasses.replace(cfg, num_attention_heads=h, num_key_value_heads=kv)).eval()
              for h, kv in ((4, 2), (2, 2), (4, 4))]
    counters.clear()
    for stack in stacks:
        stack.compile_decode_step()
    try:
        with torch.no_grad():
            for stack in stacks:
                cache = stack.new_cache(1, 4)
                cache.set_static(True)
                for t in range(3):
                    x = torch.randn(1, 1, cfg.hidden_size)
                    stack(x, torch.full((1, 1, 1), t), cache=cache)
    finally:
        for stack in stacks:
            stack.compile_decode_step(False)
    assert counters["stats"]["unique_graphs"] >= len(stacks)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # one code object per stack, kept across turning compilation off and on (so its graphs are reused)
    steps = [stack._layer_step for stack in stacks]
    assert len({id(s.__code__) for s in steps}) == len(stacks)
    stacks[0].compile_decode_step()
    assert stacks[0]._layer_step is steps[0]
    stacks[0].compile_decode_step(False)


def test_one_row_product_pass_leaves_the_callers_choices():
    from qwen3omni.modules.decoder import with_one_row_products_fused as fused

    added = {"post_grad_fusion_options": {"decompose_mm_pass": {}}}
    assert fused({}) == {"options": added}
    # the caller's other inductor options are kept, the caller's own pass settings win
    assert fused({"dynamic": True, "options": {"cpp_wrapper": True}}) == {
        "dynamic": True, "options": {"cpp_wrapper": True, **added}}
    mine = {"options": {"post_grad_fusion_options": {}}}
    assert fused(mine) == mine
    # torch.compile takes a mode or options, not both; other backends take no inductor options
    for options in ({"mode": "max-autotune"}, {"backend": "eager"}, {"backend": "aot_eager", "dynamic": False}):
        assert fused(options) == options
