"""Talker parity against the transformers reference (fp32, CPU): logits full and through the cache, the rotary
positions of a prompt and of decoding, the codec embedding of a generation step, a mini greedy generation loop
against the reference's `talker.generate`, and the released tensor layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from qwen3omni.checkpoint import export_state_dict
from qwen3omni.config import Qwen3OmniConfig
from qwen3omni.errors import InputError
from qwen3omni.model.omni import Qwen3Omni
from qwen3omni.model.talker import Talker, decode_positions, prefill_positions, rope_deltas

from reference import (
    build_reference,
    max_rel_err,
    released_weights,
    save_reference,
    set_reference_attention,
    tiny_config,
)

ROOT = Path(__file__).resolve().parents[1]
RELEASED_CONFIG = ROOT / "configs" / "qwen3-omni-30b-a3b-instruct.json"

# Calibrated in test_tolerance_calibration: the reference's eager and sdpa paths differ by ~4e-7 on these logits,
# while a wrong mrope section (0.1) or layout (0.8), a missing shared expert (0.5) or top-k + 1 (0.2) move them
# by >= 1e-2. Our logits match the reference to ~1e-7 or exactly.
TOL = 1e-4

# A second shape: other expert count and top-k, no top-k renormalisation, GQA 4:1, another mrope split,
# another shared expert width, three layers.
VARIANT = {
    "talker_config.text_config.num_local_experts": 6,
    "talker_config.text_config.num_experts_per_tok": 3,
    "talker_config.text_config.norm_topk_prob": False,
    "talker_config.text_config.num_key_value_heads": 1,
    "talker_config.text_config.num_hidden_layers": 3,
    "talker_config.text_config.shared_expert_intermediate_size": 24,
    "talker_config.text_config.rope_parameters.mrope_section": [2, 3, 3],
}


@dataclasses.dataclass
class Pair:
    ours: Talker
    ref: object  # transformers Qwen3OmniMoeTalkerForConditionalGeneration
    config: Qwen3OmniConfig


def _load_talker(path: Path) -> Talker:
    return Qwen3Omni.from_pretrained(path, dtype=torch.float32, components={"talker"}).talker


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> Pair:
    config = Qwen3OmniConfig.from_dict(tiny_checkpoint.config)
    return Pair(_load_talker(tiny_checkpoint.path), tiny_checkpoint.reference.talker, config)


@pytest.fixture(scope="module")
def variant(tmp_path_factory) -> Pair:
    cfg = tiny_config(VARIANT)
    ref = build_reference(cfg, seed=3)
    path = save_reference(ref, tmp_path_factory.mktemp("talker_variant"))
    return Pair(_load_talker(path), ref.talker, Qwen3OmniConfig.from_dict(cfg))


def _inputs(B=2, T=9, C=64, pad=(0, 3), seed=0, mixed_axes=True):
    """Embeddings, a left-padding mask and position ids whose three axes differ (as with media)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pad):
        mask[b, :p] = 0
    pos = prefill_positions(mask, (B, T))
    if mixed_axes:  # distinct temporal / height / width ids, so the mrope layout matters
        pos = pos + torch.randint(0, 30, (3, B, T), generator=g) * torch.tensor([0, 1, 2]).view(3, 1, 1)
    return x, mask, pos


def _real(logits, mask):
    return logits[mask.bool()]


def _compare(pair: Pair, x, mask, pos) -> float:
    with torch.no_grad():
        ours = pair.ours(x, pos, mask).logits
        ref = pair.ref(inputs_embeds=x, position_ids=pos, attention_mask=mask).logits
    return max_rel_err(_real(ours, mask), _real(ref, mask))


# ---- logits ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny", "variant"])
def test_talker_logits_full(which, request):
    pair = request.getfixturevalue(which)
    x, mask, pos = _inputs(C=pair.config.talker.text.hidden_size)
    assert _compare(pair, x, mask, pos) < TOL
    # text-only ids (what a prompt without media gets) through the default path
    with torch.no_grad():
        ours = pair.ours(x, attention_mask=mask).logits
        ref_pos = prefill_positions(mask, mask.shape)
        ref = pair.ref(inputs_embeds=x, position_ids=ref_pos, attention_mask=mask).logits
    assert max_rel_err(_real(ours, mask), _real(ref, mask)) < TOL


@pytest.mark.parametrize("which", ["tiny", "variant"])
def test_talker_incremental_matches_full(which, request):
    """Prefill a left-padded batch, then single-token steps through the cache, against one reference pass."""
    pair = request.getfixturevalue(which)
    prompt, steps = 6, 4
    x, mask, _ = _inputs(T=prompt + steps, C=pair.config.talker.text.hidden_size, pad=(0, 2), mixed_axes=False)
    mask_prompt = mask[:, :prompt]
    pos_prompt = prefill_positions(mask_prompt, mask_prompt.shape)
    deltas = rope_deltas(pos_prompt, mask_prompt)
    cache = pair.ours.model.new_cache(2, prompt + steps)
    with torch.no_grad():
        outs = [pair.ours(x[:, :prompt], pos_prompt, mask_prompt, cache).logits]
        for i in range(steps):
            pos = decode_positions(cache.length, deltas)
            outs.append(pair.ours(x[:, prompt + i : prompt + i + 1], pos, cache=cache).logits)
        ours = torch.cat(outs, dim=1)
        full_pos = torch.cat([pos_prompt, decode_positions(prompt, deltas, steps)], dim=-1)
        assert torch.equal(full_pos, prefill_positions(mask, mask.shape))  # decode ids continue the count
        ref = pair.ref(inputs_embeds=x, position_ids=full_pos, attention_mask=mask).logits
    assert max_rel_err(_real(ours, mask), _real(ref, mask)) < TOL


def test_tolerance_calibration(tiny_checkpoint, tiny):
    """Wrong variants move the logits by >= 1e-2; the reference's eager vs sdpa paths stay far below TOL."""
    x, mask, pos = _inputs()
    ref_model = tiny_checkpoint.reference
    try:
        set_reference_attention(ref_model, "eager")
        with torch.no_grad():
            eager = tiny.ref(inputs_embeds=x, position_ids=pos, attention_mask=mask).logits
    finally:
        set_reference_attention(ref_model, "sdpa")
    with torch.no_grad():
        sdpa = tiny.ref(inputs_embeds=x, position_ids=pos, attention_mask=mask).logits
    paths = max_rel_err(_real(eager, mask), _real(sdpa, mask))
    assert paths < TOL / 10

    def err(model: Talker) -> float:
        with torch.no_grad():
            return max_rel_err(_real(model(x, pos, mask).logits, mask), _real(sdpa, mask))

    def copy(cfg=tiny.config.talker) -> Talker:
        model = Talker(cfg).eval()
        model.load_state_dict(tiny.ours.state_dict())
        return model

    assert err(copy()) < TOL  # the harness itself is right
    cfg = tiny.config.talker
    for rope in ({"mrope_section": [6, 1, 1]}, {"mrope_interleaved": False}):
        assert err(copy(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **rope)))) >= 1e-2, rope
    no_shared, top_k = copy(), copy()
    for a, b in zip(no_shared.model.layers, top_k.model.layers):
        a.mlp.shared_expert = None
        b.mlp.gate.top_k += 1
    assert err(no_shared) >= 1e-2
    assert err(top_k) >= 1e-2


def test_talker_outputs_hidden_states_and_router_logits(tiny):
    x, mask, pos = _inputs(mixed_axes=False)
    with torch.no_grad():
        out = tiny.ours(x, pos, mask, output_hidden_states=True, output_router_logits=True, logits_to_keep=1)
    layers = tiny.config.talker.text.num_hidden_layers
    assert len(out.hidden_states) == layers + 1 and torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert len(out.router_logits) == layers
    assert out.router_logits[0].shape == (2 * 9, tiny.config.talker.text.num_experts)
    assert out.logits.shape == (2, 1, tiny.config.talker.text.vocab_size)
    four = torch.cat([pos[:1], pos])  # the reference's [4, B, T] layout: text ids first
    with torch.no_grad():
        assert torch.equal(tiny.ours(x, four, mask).logits, tiny.ours(x, pos, mask).logits)


def test_talker_rejects_bad_input(tiny):
    with pytest.raises(InputError, match="inputs_embeds"):
        tiny.ours(torch.zeros(1, 3, 7))
    cache = tiny.ours.model.new_cache(1, 8)
    with torch.no_grad():
        tiny.ours(torch.zeros(1, 3, 64), cache=cache)
    with pytest.raises(InputError, match="position_ids"):
        tiny.ours(torch.zeros(1, 1, 64), cache=cache)


# ---- positions ---------------------------------------------------------------------------------------------
class _FakeCache:
    def __init__(self, n):
        self.n = n

    def get_seq_length(self):
        return self.n


def test_positions_match_reference(tiny):
    """Our prompt ids, deltas and decode ids against the reference's two position paths (compute_3d_position_ids
    in forward, and _prepare_position_ids_for_generation + the per-step increment inside generate)."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    x = torch.zeros(2, 6, 64)
    ref = tiny.ref
    ref.rope_deltas = None
    ref_prefill = ref.compute_3d_position_ids(x, attention_mask=mask)
    ours = prefill_positions(mask, mask.shape)
    assert torch.equal(ours, ref_prefill)
    deltas = rope_deltas(ours, mask)
    assert torch.equal(deltas, ref.rope_deltas)
    for past in (6, 7, 11):
        ref_step = ref.compute_3d_position_ids(x[:, :1], attention_mask=mask, cache=_FakeCache(past))
        assert torch.equal(decode_positions(past, deltas), ref_step)
    gen = ref._prepare_position_ids_for_generation(x, {"attention_mask": mask})  # [4, B, T]
    assert torch.equal(gen[1:], ours)
    assert torch.equal(decode_positions(6, deltas, 3), gen[1:, :, -1:] + torch.arange(1, 4))
    assert torch.equal(ref.rope_deltas, deltas)


def test_rope_deltas_with_media_ids():
    """With media the largest id is not at the end of every axis' count: delta = max + 1 - padded length."""
    pos = torch.tensor([[0, 1, 1, 1, 5, 6], [0, 1, 2, 3, 5, 6], [0, 1, 2, 4, 5, 6]]).view(3, 1, 6)
    assert rope_deltas(pos).tolist() == [[1]]
    padded = torch.cat([torch.zeros(3, 1, 2, dtype=torch.long), pos], dim=-1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    deltas = rope_deltas(padded, mask)
    assert deltas.tolist() == [[-1]] and decode_positions(8, deltas)[:, 0, 0].tolist() == [7, 7, 7]


# ---- a generation step, as the reference's talker.generate runs it -----------------------------------------
@pytest.mark.parametrize("which", ["tiny", "variant"])
def test_greedy_talker_loop_matches_reference_generate(which, request):
    """Prefill, then per step: argmax code 0, predict codes 1..15, feed codec_step_embedding + the next text
    embedding. Codes of every frame must equal the reference's `talker.generate` (greedy), for a padded batch."""
    pair = request.getfixturevalue(which)
    C = pair.config.talker.text.hidden_size
    g = torch.Generator().manual_seed(5)
    B, T, steps = 2, 7, 5
    x = torch.randn(B, T, C, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0
    trailing = torch.randn(B, 2, C, generator=g)
    tts_pad = torch.randn(1, 1, C, generator=g)
    pair.ref.rope_deltas = None
    with torch.no_grad():
        res = pair.ref.generate(
            inputs_embeds=x, attention_mask=mask, trailing_text_hidden=trailing,
            tts_pad_embed=tts_pad.expand(B, -1, -1), max_new_tokens=steps, do_sample=False,
            output_hidden_states=True, return_dict_in_generate=True,
        )
    ref_layer0 = res.sequences[:, -steps:]
    ref_frames = torch.stack([h[-1] for h in res.hidden_states if h[-1] is not None], dim=1)  # [B, steps-1, 16]

    talker = pair.ours
    pos = prefill_positions(mask, mask.shape)
    deltas = rope_deltas(pos, mask)
    cache = talker.model.new_cache(B, T + steps)
    predictor_cache = talker.code_predictor.new_cache(B)
    layer0, frames = [], []
    with torch.no_grad():
        out = talker(x, pos, mask, cache)
        for step in range(steps):
            code0 = out.logits[:, -1].argmax(-1)
            layer0.append(code0)
            if step == steps - 1:
                break
            frame = talker.predict_residual(out.last_hidden_state[:, -1], code0, cache=predictor_cache)
            frames.append(torch.cat([code0[:, None], frame.codes], dim=1))
            step_embed = frame.next_talker_embed
            assert torch.allclose(step_embed, talker.codec_step_embedding(code0, frame.codes), atol=1e-6)
            text = trailing[:, step] if step < trailing.shape[1] else tts_pad[:, 0].expand(B, -1)
            out = talker((step_embed + text)[:, None], decode_positions(cache.length, deltas), cache=cache)
    assert torch.equal(torch.stack(layer0, dim=1), ref_layer0)
    assert torch.equal(torch.stack(frames, dim=1), ref_frames)


# ---- layout ------------------------------------------------------------------------------------------------
def test_released_talker_layout():
    """Built on meta from the released config, the talker exports exactly the released `talker.*` tensors."""
    expected = released_weights("talker.")
    config = Qwen3OmniConfig.from_pretrained(RELEASED_CONFIG)
    with torch.device("meta"):
        model = Qwen3Omni(config, components={"talker"})
    ours = {n: list(t.shape) for n, t in export_state_dict(model).items()}
    assert ours == expected
    assert len(ours) == 8037
