"""Saving fine-tuned models (issue 8): what `save_pretrained` writes after training loads in transformers'
`Qwen3OmniMoeForConditionalGeneration` with nothing missing and gives our logits (thinker and talker); a
thinker-only fine-tune saves as a thinker-only checkpoint or merged into the full one."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from qwen3omni.model.omni import Qwen3Omni
from qwen3omni.model.talker import prefill_positions
from qwen3omni.training import changed_tensors, synthetic_example, talker_loss, with_answer

from reference import max_rel_err

TOL = 1e-4  # as the thinker / talker parity tests (eager vs SDPA in the reference: ~1e-6)


def load_in_transformers(path):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, output_loading_info=True
        )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return ref.eval()


def fine_tune(model, steps=2, lr=1e-2):
    """A few Adam steps on whatever the model has: thinker LM loss (+ talker loss when it has a talker)."""
    model.train()
    batch, answer, codes = synthetic_example(model.config, batch=2, prompt_tokens=6, answer_tokens=5, frames=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    for _ in range(steps):
        loss = model.thinker(**with_answer(batch, answer, model.config)).loss
        if model.talker is not None:
            loss = loss + talker_loss(model, batch, answer, codes).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def probe():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(300, 2000, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    x = torch.randn(2, 10, 64, generator=g)
    talker_mask = torch.ones(2, 10, dtype=torch.long)
    talker_mask[0, :2] = 0
    return ids, mask, x, talker_mask


def thinker_logits(model, probe):
    ids, mask, _, _ = probe
    with torch.no_grad():
        return model.thinker(input_ids=ids, attention_mask=mask).logits[mask.bool()]


def talker_logits(model, probe, reference=False):
    _, _, x, mask = probe
    pos = prefill_positions(mask, mask.shape)
    with torch.no_grad():
        if reference:
            out = model.talker(inputs_embeds=x, position_ids=pos, attention_mask=mask)
        else:
            out = model.talker(x, pos, mask)
    return out.logits[mask.bool()]


def test_fine_tuned_model_loads_in_transformers(tiny_checkpoint, tiny_model, probe, tmp_path):
    model = fine_tune(copy.deepcopy(tiny_model))
    model.save_pretrained(tmp_path / "tuned")
    ref = load_in_transformers(tmp_path / "tuned")
    assert max_rel_err(thinker_logits(model, probe), thinker_logits(ref, probe)) < TOL
    assert max_rel_err(talker_logits(model, probe), talker_logits(ref, probe, reference=True)) < TOL
    # the fixture can fail: the fine-tune moved the logits far beyond the tolerance
    original = tiny_checkpoint.reference
    assert max_rel_err(thinker_logits(model, probe), thinker_logits(original, probe)) > 1e-2
    assert max_rel_err(talker_logits(model, probe), talker_logits(original, probe, reference=True)) > 1e-2


def test_thinker_only_fine_tune_saves_alone_or_merged(tiny_checkpoint, probe, tmp_path):
    base = tiny_checkpoint.path
    thinker = fine_tune(Qwen3Omni.from_pretrained(base, dtype=torch.float32, components={"thinker"}), steps=1)
    tuned_logits = thinker_logits(thinker, probe)

    thinker.save_pretrained(tmp_path / "thinker_only")
    config = json.loads((tmp_path / "thinker_only" / "config.json").read_text())
    assert config["enable_audio_output"] is False and "talker_config" not in config
    alone = load_in_transformers(tmp_path / "thinker_only")
    assert not alone.has_talker
    assert max_rel_err(tuned_logits, thinker_logits(alone, probe)) < TOL

    thinker.save_pretrained(tmp_path / "merged", merge_into=base)
    assert (tmp_path / "merged" / "config.json").read_text() == (base / "config.json").read_text()
    merged = Qwen3Omni.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert merged.has_talker
    changed = changed_tensors(merged, base)
    assert changed and all(n.startswith("thinker.") for n in changed)  # talker and Code2Wav as released
    assert torch.equal(thinker_logits(merged, probe), tuned_logits)
    ref = load_in_transformers(tmp_path / "merged")
    assert max_rel_err(tuned_logits, thinker_logits(ref, probe)) < TOL
    assert max_rel_err(talker_logits(merged, probe), talker_logits(ref, probe, reference=True)) < TOL
