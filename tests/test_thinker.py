"""Thinker text decoder vs transformers (issue 3): logits, TM-RoPE, cache, greedy generation, routing, layout."""

from __future__ import annotations

import pytest
import torch

from qwen3omni.model.omni import Qwen3Omni
from qwen3omni.modules.rotary import RotaryEmbedding

from reference import build_reference, max_rel_err, save_reference, set_reference_attention, tiny_config

# Our logits vs the reference's, relative to the reference's largest logit. Calibrated below: the two
# implementations differ by ~1e-7 here, the reference's eager and SDPA paths by ~1e-7, and a wrong
# mrope_section or rope_theta by > 1e-2; 1e-4 sits well between the two.
TOL = 1e-4

SHAPES = {
    # GQA 2:1, head_dim 16, mrope [4,2,2], 8 experts top-2, renormalised top-k
    "gqa2-hd16": {},
    # GQA 4:1, head_dim 8, mrope [2,1,1], 4 experts top-1, raw top-k weights, layer 1 dense
    "gqa4-hd8-dense1": {
        "thinker_config.text_config.num_attention_heads": 8,
        "thinker_config.text_config.head_dim": 8,
        "thinker_config.text_config.rope_parameters.mrope_section": [2, 1, 1],
        "thinker_config.text_config.num_experts": 4,
        "thinker_config.text_config.num_experts_per_tok": 1,
        "thinker_config.text_config.norm_topk_prob": False,
        "thinker_config.text_config.mlp_only_layers": [1],
    },
    # MHA, head_dim 32, mrope [8,4,4], 16 experts top-4, MoE only in every second layer
    "mha-hd32-sparse2": {
        "thinker_config.text_config.num_key_value_heads": 4,
        "thinker_config.text_config.head_dim": 32,
        "thinker_config.text_config.rope_parameters.mrope_section": [8, 4, 4],
        "thinker_config.text_config.num_experts": 16,
        "thinker_config.text_config.num_experts_per_tok": 4,
        "thinker_config.text_config.norm_topk_prob": False,
        "thinker_config.text_config.decoder_sparse_step": 2,
    },
}


class Pair:
    def __init__(self, cfg: dict, folder):
        self.cfg = cfg
        self.ref = build_reference(cfg, seed=1)
        save_reference(self.ref, folder)
        self.ours = Qwen3Omni.from_pretrained(folder, components={"thinker"}, dtype=torch.float32).thinker


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory):
    return Pair(tiny_config(SHAPES[request.param]), tmp_path_factory.mktemp(request.param))


def padded_batch(seed: int = 0, length: int = 14, pad: int = 4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 150000, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    ids[1, :pad], mask[1, :pad] = 151643, 0
    return ids, mask


def grid_positions(batch: int, length: int) -> torch.Tensor:
    """3-axis ids where the axes differ: 2 text tokens, then a long video (4 frames 100 s apart, 2x2 grid per
    frame, 13 ids per second), then text. Sections decide which axis drives which frequency pair; with the
    interleaved layout a wrong section only moves the slowest pairs, so the temporal ids must span thousands
    for it to show (they do in real long videos)."""
    frames = torch.arange(4).repeat_interleave(4).float()
    t = torch.cat([torch.arange(2.0), 2 + 1300 * frames])
    h = torch.cat([torch.arange(2.0), 2 + torch.tensor([0.0, 0, 1, 1]).repeat(4)])
    w = torch.cat([torch.arange(2.0), 2 + torch.tensor([0.0, 1, 0, 1]).repeat(4)])
    rest = length - t.shape[0]
    tail = torch.arange(rest, dtype=torch.float32) + t.max() + 1
    pos = torch.stack([torch.cat([t, tail]), torch.cat([h, tail]), torch.cat([w, tail])])
    return pos[:, None].expand(3, batch, length).clone()


@torch.no_grad()
def test_logits_left_padded_batch(pair):
    ids, mask = padded_batch()
    ref = pair.ref.thinker(input_ids=ids, attention_mask=mask).logits
    ours = pair.ours(input_ids=ids, attention_mask=mask).logits
    assert max_rel_err(ours, ref) < TOL


@torch.no_grad()
def test_logits_with_multimodal_positions(pair):
    ids, _ = padded_batch(seed=1, length=22, pad=0)
    pos = grid_positions(2, 22)
    ref = pair.ref.thinker.model.language_model(input_ids=ids, position_ids=pos).last_hidden_state
    ours = pair.ours.model(pair.ours.model.embed_tokens(ids), pos).last_hidden_state
    assert max_rel_err(ours, ref) < TOL


@torch.no_grad()
def test_calibration_wrong_rope_is_far_outside_tolerance(pair):
    """The fixture is sensitive: a wrong mrope_section or rope_theta moves the outputs by >= 1e-2, while the
    reference's own eager and SDPA paths agree to well inside the tolerance."""
    ids, _ = padded_batch(seed=1, length=22, pad=0)
    pos = grid_positions(2, 22)
    lm = pair.ref.thinker.model.language_model
    set_reference_attention(pair.ref, "eager")
    eager = lm(input_ids=ids, position_ids=pos).last_hidden_state
    set_reference_attention(pair.ref, "sdpa")
    sdpa = lm(input_ids=ids, position_ids=pos).last_hidden_state
    assert max_rel_err(eager, sdpa) < TOL / 10

    model = pair.ours.model
    text = pair.cfg["thinker_config"]["text_config"]
    head_dim, theta = text["head_dim"], text["rope_parameters"]["rope_theta"]
    sections = text["rope_parameters"]["mrope_section"]
    right = model.rotary
    wrong_variants = {
        "mrope_section": RotaryEmbedding.sectioned(
            head_dim, theta, [sections[0], sections[1] - 1, sections[2] + 1], True
        ),
        "contiguous": RotaryEmbedding.sectioned(head_dim, theta, sections, False),
        "rope_theta": RotaryEmbedding.sectioned(head_dim, theta * 10, sections, True),
    }
    assert not torch.equal(wrong_variants["mrope_section"].axis_of_pair, right.axis_of_pair)
    try:
        for name, rotary in wrong_variants.items():
            model.rotary = rotary
            out = model(model.embed_tokens(ids), pos).last_hidden_state
            assert max_rel_err(out, sdpa) > 1e-2, name
    finally:
        model.rotary = right


@torch.no_grad()
def test_prefill_then_decode_through_cache_matches_full_forward(pair):
    ids, mask = padded_batch(seed=2, length=22, pad=3)
    full = pair.ours(input_ids=ids, attention_mask=mask).logits
    prompt = 6
    cache = pair.ours.model.new_cache(2, 22)
    out = pair.ours(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], cache=cache)
    steps = [out.logits]
    pos = out.position_ids[..., -1:]
    for t in range(prompt, 22):  # 16 single-token steps
        pos = pos + 1
        steps.append(pair.ours(input_ids=ids[:, t : t + 1], position_ids=pos, cache=cache).logits)
    incremental = torch.cat(steps, dim=1)
    real = mask.bool()
    assert max_rel_err(incremental[real], full[real]) < TOL
    ref = pair.ref.thinker(input_ids=ids, attention_mask=mask).logits
    assert max_rel_err(incremental[real], ref[real]) < TOL


@torch.no_grad()
def test_greedy_generation_is_identical(pair):
    ids, mask = padded_batch(seed=3)
    ref = pair.ref.thinker.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    ours = pair.ours.generate(ids, mask, max_new_tokens=32)
    assert torch.equal(ours.sequences, ref)


@torch.no_grad()
def test_router_chooses_the_same_experts(pair):
    ids, mask = padded_batch(seed=4)
    ref = pair.ref.thinker(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
    ours = pair.ours(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
    k = pair.cfg["thinker_config"]["text_config"]["num_experts_per_tok"]
    assert len(ours) == len(ref) > 0
    for r, o in zip(ref, ours):
        assert torch.equal(o.topk(k, dim=-1).indices.sort(-1).values, r.topk(k, dim=-1).indices.sort(-1).values)
        assert max_rel_err(o, r) < TOL
