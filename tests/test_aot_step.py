"""`compile_decode_step(ahead_of_time=True)`: one-token decode steps run an AOTInductor build of the layer.

It must give what the eager layers give (dense and MoE layers, router logits included), really run (its
runner is counted), and run a layer eagerly once it is no longer what the build assumed (a hook registered, a
parameter or submodule replaced). Building needs a C++ compiler, as inductor does.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from qwen3omni.errors import InputError
from qwen3omni.model.code_predictor import CodePredictorModel
from qwen3omni.modules.aot_step import AheadOfTimeStep

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="inductor needs a C++ compiler on CPU")


def count_runner_calls(step: AheadOfTimeStep) -> dict:
    """Wrap the step's built runners so that their calls are counted."""
    calls = {"n": 0}
    for key, runner in list(step.runners.items()):
        assert runner is not None, "the ahead-of-time build failed"

        def counted(*args, _runner=runner):
            calls["n"] += 1
            return _runner(*args)

        step.runners[key] = counted
    return calls


def decode(stack, steps: int, seed: int = 0):
    """`steps` one-token steps after a 2-token first step, over a static cache; the outputs of every step."""
    g = torch.Generator().manual_seed(seed)
    hidden = stack.norm.weight.shape[0]
    cache = stack.new_cache(1, 8)
    cache.set_static(True)
    outs = []
    with torch.no_grad():
        x = torch.randn(1, 2, hidden, generator=g)
        outs.append(stack(x, torch.arange(2).view(1, 1, 2), cache=cache).last_hidden_state)
        for t in range(2, 2 + steps):
            x = torch.randn(1, 1, hidden, generator=g)
            outs.append(stack(x, torch.full((1, 1, 1), t), cache=cache).last_hidden_state)
    return torch.cat(outs, dim=1)


@pytest.fixture(scope="module")
def dense_stack(tiny_model):
    cfg = tiny_model.talker.code_predictor.config
    torch.manual_seed(0)
    return CodePredictorModel(dataclasses.replace(cfg)).eval()


def test_dense_layers_equal_eager_and_fall_back_when_changed(dense_stack):
    stack = dense_stack
    eager = decode(stack, 3)
    down = stack.layers[0].mlp.down_proj
    old = down.weight
    down.weight = torch.nn.Parameter(old.detach() * 2)
    changed = decode(stack, 3)  # eager, with layer 0's down projection doubled
    down.weight = old
    assert not torch.allclose(changed, eager, rtol=1e-3, atol=1e-3)
    stack.compile_decode_step(ahead_of_time=True)
    try:
        step = stack.compiled_step
        assert isinstance(step, AheadOfTimeStep)
        assert torch.allclose(decode(stack, 3), eager, rtol=1e-5, atol=1e-5)  # builds
        calls = count_runner_calls(step)
        assert torch.allclose(decode(stack, 3), eager, rtol=1e-5, atol=1e-5)
        assert calls["n"] == 3 * len(stack.layers)  # every one-token step of every layer (not the first step)

        # a forward hook registered after the build runs in every step: that layer runs eagerly (a
        # torch.compile'd step would not run it)
        seen = []
        handle = stack.layers[1].mlp.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[:2])))
        calls["n"] = 0
        assert torch.allclose(decode(stack, 3), eager, rtol=1e-5, atol=1e-5)
        handle.remove()
        assert seen == [(1, 2)] + [(1, 1)] * 3
        assert calls["n"] == 3 * (len(stack.layers) - 1)

        # a parameter replaced after the build: the new weight is used
        down.weight = torch.nn.Parameter(old.detach() * 2)
        assert torch.allclose(decode(stack, 3), changed, rtol=1e-5, atol=1e-5)
    finally:
        down.weight = old
        stack.compile_decode_step(False)


def test_moe_thinker_generates_the_eager_tokens(tiny_model):
    """One row, then two (one left-padded: the masks differ per row, and a second build serves batch 2)."""
    from test_graph_paths import prompt

    thinker = tiny_model.thinker
    batches = [prompt(tiny_model, 1), prompt(tiny_model, 2)]
    eager = [thinker.generate(**b, max_new_tokens=5) for b in batches]
    thinker.model.compile_decode_step(ahead_of_time=True)
    try:
        for b in batches:
            thinker.generate(**b, max_new_tokens=2)  # builds
        step = thinker.model.compiled_step
        assert sorted(key[:2] for key in step.runners) == [(1, 1), (2, 2)]
        calls = count_runner_calls(step)
        aot = [thinker.generate(**b, max_new_tokens=5) for b in batches]
    finally:
        thinker.model.compile_decode_step(False)
    for a, e in zip(aot, eager):
        assert torch.equal(a.sequences, e.sequences)
    assert calls["n"] >= 2 * 3 * len(thinker.model.layers)


def test_speech_model_generates_the_eager_text_codes_and_audio(tiny_model, monkeypatch):
    """`compile_decoding(ahead_of_time=True)` on the whole model: the talker (MoE with a shared expert) and the
    code predictor run their builds too, and generation gives what the eager loops give. (The code predictor's
    native CPU step, which generation prefers to its compiled steps, is off here.)"""
    from test_graph_paths import prompt

    monkeypatch.setattr(tiny_model.talker.code_predictor, "cpu_kernel", False)

    batch = prompt(tiny_model, 1)
    kw = dict(max_new_tokens=6, talker_do_sample=False, talker_max_new_tokens=8)
    eager = tiny_model.generate(**batch, **kw)
    stacks = [tiny_model.thinker.model, tiny_model.talker.model, tiny_model.talker.code_predictor.model]
    tiny_model.compile_decoding(ahead_of_time=True)
    try:
        tiny_model.generate(**batch, max_new_tokens=2, talker_do_sample=False, talker_max_new_tokens=3)  # builds
        calls = [count_runner_calls(stack.compiled_step) for stack in stacks]
        aot = tiny_model.generate(**batch, **kw)
    finally:
        tiny_model.compile_decoding(False)
    assert all(c["n"] > 0 for c in calls), calls
    assert torch.equal(aot.sequences, eager.sequences)
    for a, b, wa, wb in zip(aot.codes, eager.codes, aot.audio, eager.audio):
        assert torch.equal(a, b)
        assert (wa - wb).abs().max() < 1e-4


def test_ahead_of_time_is_a_flag(dense_stack):
    with pytest.raises(InputError, match="ahead_of_time: expected True or False, got 'yes'"):
        dense_stack.compile_decode_step(ahead_of_time="yes")


def test_torch_compiled_steps_run_a_hooked_layer_eagerly(dense_stack):
    """Without `ahead_of_time`, a compiled stack's layer that has a forward hook (registered after compiling)
    runs eagerly, so the hook sees every step, as in eager decoding; the other layers stay compiled."""
    eager = decode(dense_stack, 3)
    dense_stack.compile_decode_step()
    try:
        step = dense_stack.compiled_step
        compiled_calls = {"n": 0}
        real = step.compiled

        def counted(*args):
            compiled_calls["n"] += 1
            return real(*args)

        step.compiled = counted
        assert torch.allclose(decode(dense_stack, 3), eager, rtol=1e-5, atol=1e-5)  # compiles
        seen = []
        handle = dense_stack.layers[1].mlp.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[:2])))
        compiled_calls["n"] = 0
        try:
            assert torch.allclose(decode(dense_stack, 3), eager, rtol=1e-5, atol=1e-5)
        finally:
            handle.remove()
        assert seen == [(1, 2)] + [(1, 1)] * 3
        assert compiled_calls["n"] == 4 * (len(dense_stack.layers) - 1)  # the other layers: all 4 steps compiled
    finally:
        dense_stack.compile_decode_step(False)
