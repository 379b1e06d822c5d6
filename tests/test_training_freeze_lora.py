"""Freezing, activation checkpointing, bf16 autocast and LoRA (PEFT) on the tiny model (issue 8)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from qwen3omni.checkpoint import export_state_dict
from qwen3omni.errors import InputError
from qwen3omni.model.omni import Qwen3Omni
from qwen3omni.modules.decoder import DecoderLayer
from qwen3omni.training import (
    TALKER_TARGETS,
    freeze,
    linear_names,
    set_gradient_checkpointing,
    synthetic_example,
    talker_loss,
    train_only,
    trainable_parameters,
    unfreeze,
    with_answer,
)


@pytest.fixture(scope="module")
def example(tiny_model):
    return synthetic_example(tiny_model.config, batch=2, prompt_tokens=6, answer_tokens=5, frames=5, seed=3)


def full_loss(model, example):
    batch, answer, codes = example
    return model.thinker(**with_answer(batch, answer, model.config), output_router_logits=True).loss + talker_loss(
        model, batch, answer, codes
    ).loss


# ---- freezing -----------------------------------------------------------------------------------------------
def test_only_the_code_predictor_trains(tiny_model, example):
    """Acceptance: after freezing all but talker.code_predictor, only its parameters get gradients and change."""
    model = copy.deepcopy(tiny_model).train()
    names = train_only(model, "talker.code_predictor")
    assert names and all(n.startswith("talker.code_predictor.") for n in names)
    assert set(trainable_parameters(model)) == set(names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(trainable_parameters(model).values(), lr=1e-2)
    batch, answer, codes = example
    for _ in range(2):
        optimizer.zero_grad()
        talker_loss(model, batch, answer, codes).loss.backward()
        optimizer.step()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(names)  # every code predictor tensor is used, nothing else gets a gradient
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(names)


def test_freeze_patterns(tiny_model):
    model = copy.deepcopy(tiny_model)
    freeze(model)
    assert not trainable_parameters(model)
    unfreeze(model, "thinker.model.layers.*.self_attn.*", "talker.codec_head")
    chosen = set(trainable_parameters(model))
    assert "talker.codec_head.weight" in chosen
    assert "thinker.model.layers.2.self_attn.q_proj.weight" in chosen
    assert all(n == "talker.codec_head.weight" or ".self_attn." in n for n in chosen)
    freeze(model, "thinker.model.layers.0")
    assert not any(n.startswith("thinker.model.layers.0.") for n in trainable_parameters(model))
    with pytest.raises(InputError, match="match no parameter"):
        freeze(model, "talker.code_predicter")  # a typo must not silently freeze nothing
    with pytest.raises(InputError, match="at least one"):
        train_only(model)


# ---- activation checkpointing -------------------------------------------------------------------------------
def _loss_and_grads(model, example):
    model.zero_grad()
    loss = full_loss(model, example)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_identical_loss_and_grads(tiny_model, example):
    model = copy.deepcopy(tiny_model).train()
    calls = []
    for name, module in model.named_modules():
        if isinstance(module, DecoderLayer):
            module.register_forward_pre_hook(lambda *a, name=name: calls.append(name))
    loss, grads = _loss_and_grads(model, example)
    plain_calls = len(calls)
    stacks = set_gradient_checkpointing(model, True)
    assert stacks == [
        "talker.code_predictor.model", "talker.model", "thinker.audio_tower", "thinker.model", "thinker.visual"
    ]
    calls.clear()
    loss_ckpt, grads_ckpt = _loss_and_grads(model, example)
    assert len(calls) == 2 * plain_calls  # every layer ran again in the backward pass: checkpointing is on
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)
    set_gradient_checkpointing(model, False)
    assert set_gradient_checkpointing(model, True, stacks="talker") == ["talker.code_predictor.model", "talker.model"]
    with pytest.raises(InputError, match="layer stacks"):
        set_gradient_checkpointing(model, True, stacks="code2wav")


def test_encoder_checkpointing_gives_identical_grads(tiny_model):
    """The audio and vision encoders recompute their layers in the backward pass, with the same gradients."""
    from qwen3omni.model.audio_encoder import AudioEncoderLayer
    from qwen3omni.model.vision_encoder import VisionBlock

    model = copy.deepcopy(tiny_model).train()
    thinker = model.thinker
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(2, thinker.config.audio.num_mel_bins, 230, generator=g)
    lens = torch.tensor([230, 170])
    grid = torch.tensor([[1, 4, 6], [2, 2, 4]])
    cfg = thinker.config.vision
    width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    pixels = torch.randn(int(grid.prod(-1).sum()), width, generator=g)
    calls = []
    for module in model.modules():
        if isinstance(module, (AudioEncoderLayer, VisionBlock)):
            module.register_forward_pre_hook(lambda *a: calls.append(1))

    def loss_and_grads():
        model.zero_grad()
        merged, deepstack = thinker.visual(pixels, grid)
        loss = thinker.audio_tower(mel, lens).square().mean() + merged.square().mean() + deepstack[0].square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    loss, grads = loss_and_grads()
    plain = len(calls)
    assert set_gradient_checkpointing(model, True, stacks=["thinker.audio_tower", "thinker.visual"]) == [
        "thinker.audio_tower", "thinker.visual"
    ]
    calls.clear()
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert len(calls) == 2 * plain  # each encoder layer ran again in the backward pass
    assert torch.equal(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys()
    assert any(n.startswith("thinker.audio_tower.layers") for n in grads)
    assert any(n.startswith("thinker.visual.blocks") for n in grads)
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_bf16_autocast(tiny_model, example):
    model = copy.deepcopy(tiny_model).train()
    with torch.no_grad():
        reference = full_loss(model, example)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = full_loss(model, example)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - reference.item()) < 0.05 * reference.item()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---- LoRA -----------------------------------------------------------------------------------------------------
def test_lora_on_the_talker_trains_merges_and_saves(tiny_model, example, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(tiny_model).train()
    batch, answer, codes = example
    layout = {n: t.shape for n, t in export_state_dict(model).items()}
    base = talker_loss(model, batch, answer, codes).loss.detach()
    freeze(model)
    targets = set(linear_names(model.talker, TALKER_TARGETS))  # what PEFT should wrap, by name
    talker = get_peft_model(model.talker, LoraConfig(r=4, lora_alpha=8, target_modules=TALKER_TARGETS))
    adapted = {n.split(".lora_A")[0].removeprefix("base_model.model.")
               for n, _ in model.talker.named_parameters() if ".lora_A." in n}
    assert adapted == targets
    assert any(".shared_expert." in n for n in adapted) and any("code_predictor.model" in n for n in adapted)
    lora = trainable_parameters(model)
    assert lora and all(".lora_" in n for n in lora)
    assert torch.equal(talker_loss(model, batch, answer, codes).loss.detach(), base)  # B = 0 at init
    optimizer = torch.optim.Adam(lora.values(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        loss = talker_loss(model, batch, answer, codes).loss
        loss.backward()
        optimizer.step()
    # every adapter receives gradients, except hidden_projection's: a text-only prompt has no media positions
    silent = {n for n, p in lora.items() if p.grad is None or p.grad.abs().sum() == 0}
    assert silent and all(".hidden_projection." in n for n in silent), silent
    tuned = talker_loss(model, batch, answer, codes).loss.detach()
    assert tuned < base - 1e-2
    talker.merge_and_unload()
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    merged = talker_loss(model, batch, answer, codes).loss.detach()
    torch.testing.assert_close(merged, tuned, rtol=1e-5, atol=1e-5)
    assert {n: t.shape for n, t in export_state_dict(model).items()} == layout  # the released layout
    model.save_pretrained(tmp_path / "merged")
    loaded = Qwen3Omni.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(talker_loss(loaded, batch, answer, codes).loss.detach(), merged, rtol=1e-6, atol=1e-6)


# ---- the example script -------------------------------------------------------------------------------------
def test_finetune_example_script(capsys):
    path = Path(__file__).resolve().parents[1] / "scripts" / "finetune_example.py"
    spec = importlib.util.spec_from_file_location("finetune_example", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    history = script.main(["--steps", "4"])["history"]
    assert "residual" in capsys.readouterr().out
    assert history[-1]["residual"] < history[0]["residual"]
