"""`compile_decoding`: the decode steps of all three decoders through torch.compile give what the eager loops
give, and the compiled layer step really runs (a spy counts its calls). On a CPU inductor emits C++, so the
test needs a C++ compiler; on a GPU the same steps run inside the CUDA graphs (scripts/gpu_check.py)."""

from __future__ import annotations

import shutil

import pytest
import torch

from qwen3omni.modules import decoder

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="inductor needs a C++ compiler on CPU")


@pytest.mark.parametrize("rows", [1, 2])
def test_compiled_decode_steps_equal_eager(tiny_model, monkeypatch, rows):
    from test_graph_paths import prompt

    batch = prompt(tiny_model, rows)  # 2 rows: one left-padded, so the static caches mask padding
    kw = dict(max_new_tokens=6, talker_do_sample=False, talker_max_new_tokens=8)
    eager = tiny_model.generate(**batch, **kw)
    calls = {"n": 0}
    real_compile = torch.compile

    def spy_compile(fn, **options):
        compiled = real_compile(fn, **options)

        def counted(*args):
            calls["n"] += 1
            return compiled(*args)

        return counted

    monkeypatch.setattr(decoder.torch, "compile", spy_compile)
    tiny_model.compile_decoding()
    try:
        compiled = tiny_model.generate(**batch, **kw)
    finally:
        tiny_model.compile_decoding(False)
    layers = {
        "thinker": len(tiny_model.thinker.model.layers),
        "talker": len(tiny_model.talker.model.layers),
        "predictor": len(tiny_model.talker.code_predictor.model.layers),
    }
    frames = max(c.shape[-1] for c in eager.codes)
    # every decode step of every stack went through the compiled layer step
    least = (kw["max_new_tokens"] - 1) * layers["thinker"] + (frames - 1) * layers["talker"]
    least += frames * 15 * layers["predictor"]
    assert calls["n"] >= least
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
