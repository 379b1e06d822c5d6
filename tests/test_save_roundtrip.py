"""What we save is the released layout: transformers loads it with identical tensors (issue 6)."""

from __future__ import annotations

import warnings

import torch
from safetensors.torch import load_file

from qwen3omni.checkpoint import INDEX_FILE, SINGLE_FILE


def _tensors(folder):
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def test_our_save_equals_the_reference_save_tensor_for_tensor(tiny_checkpoint, tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ours", max_shard_size="20MB")
    assert (tmp_path / "ours" / INDEX_FILE).is_file() and not (tmp_path / "ours" / SINGLE_FILE).exists()
    ours, theirs = _tensors(tmp_path / "ours"), _tensors(tiny_checkpoint.path)
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name


def test_transformers_loads_our_save_with_identical_tensors(tiny_checkpoint, tiny_model, tmp_path):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    tiny_model.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = Qwen3OmniMoeForConditionalGeneration.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    want = tiny_checkpoint.reference.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert torch.equal(got[name], t), name
