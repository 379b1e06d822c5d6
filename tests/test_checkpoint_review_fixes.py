"""Regression tests for the checkpoint/training review (/tmp/review/checkpoint/REPORT.md): partial component
saves, saving into an existing or symlinked folder, PEFT adapters at save time, stale indexes, and argument and
config checks. Each test fails against the code before the fixes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from qwen3omni import checkpoint as ckpt
from qwen3omni.config import Qwen3OmniConfig
from qwen3omni.errors import CheckpointError, ConfigError, InputError, MissingFileError
from qwen3omni.model.omni import Qwen3Omni
from qwen3omni.training import linear_names, save_merged, save_sharded, set_gradient_checkpointing


def small_tensors(n: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}.weight": torch.randn(4, 4, generator=g) for i in range(n)}


# ---- 1. component sets with no released layout ---------------------------------------------------------------
@pytest.mark.parametrize("components", [{"thinker", "talker"}, {"talker", "code2wav"}, {"code2wav"}])
def test_partial_component_set_is_refused_without_merge_into(tiny_checkpoint, tmp_path, components):
    model = Qwen3Omni.from_pretrained(tiny_checkpoint.path, components=components)
    with pytest.raises(InputError, match="merge_into"):
        model.save_pretrained(tmp_path / "out")
    with pytest.raises(InputError, match="merge_into"):  # the same rule for the FSDP save (checked before gathering)
        save_sharded(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_thinker_and_talker_save_through_merge_into_keeps_the_talker(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint.path
    model = Qwen3Omni.from_pretrained(base, components={"thinker", "talker"})
    with torch.no_grad():
        model.talker.codec_head.weight.add_(1.0)
        model.thinker.lm_head.weight.mul_(2.0)
    with pytest.raises(InputError, match="merge_into"):  # alone it would drop the talker on reload
        model.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "out", merge_into=base)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["enable_audio_output"] is True
    reloaded = Qwen3Omni.from_pretrained(tmp_path / "out")
    assert reloaded.components == ("thinker", "talker", "code2wav")
    assert torch.equal(reloaded.talker.codec_head.weight, model.talker.codec_head.weight)
    assert torch.equal(reloaded.thinker.lm_head.weight, model.thinker.lm_head.weight)


def test_save_sharded_merge_into_on_one_rank(tiny_checkpoint, tmp_path):
    import torch.distributed as dist

    model = Qwen3Omni.from_pretrained(tiny_checkpoint.path, components={"thinker", "talker"})
    with torch.no_grad():
        model.talker.codec_head.weight.add_(1.0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        save_sharded(model, tmp_path / "out", merge_into=tiny_checkpoint.path)
    finally:
        dist.destroy_process_group()
    reloaded = Qwen3Omni.from_pretrained(tmp_path / "out")
    assert torch.equal(reloaded.talker.codec_head.weight, model.talker.codec_head.weight)


# ---- 2-4. saving into an existing, symlinked or current folder ------------------------------------------------
def fill_with_other_content(folder: Path) -> None:
    (folder / "logs" / "run1").mkdir(parents=True)
    (folder / "logs" / "run1" / "events").write_text("training log")
    (folder / "notes.txt").write_text("my notes")
    (folder / "adapter_model.safetensors").write_bytes(b"not ours")  # a .safetensors the save does not write


def test_save_keeps_other_content_and_drops_stale_weights(tmp_path, monkeypatch):
    out = tmp_path / "run"
    ckpt.save_checkpoint(small_tensors(), out, {"v": 1}, max_shard_size=100)  # sharded: 3 shards + index
    fill_with_other_content(out)
    before = sorted(p.name for p in out.iterdir())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("simulated interruption at the swap")

    with monkeypatch.context() as m:  # interrupted just before the swap: the old folder is untouched
        m.setattr(ckpt, "_replace_dir", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ckpt.save_checkpoint(small_tensors(seed=1), out, {"v": 2})
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "config.json").read_text()) == {"v": 1}

    ckpt.save_checkpoint(small_tensors(seed=1), out, {"v": 2})  # now one file
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_model.safetensors", "config.json", "logs", "model.safetensors", "notes.txt"
    ]
    assert (out / "logs" / "run1" / "events").read_text() == "training log"
    assert (out / "adapter_model.safetensors").read_bytes() == b"not ours"
    assert ckpt.checkpoint_files(out) == dict.fromkeys(small_tensors(), out / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folders left


def test_save_merged_keeps_other_content_of_out_dir(tiny_checkpoint, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    fill_with_other_content(out)
    thinker = Qwen3Omni.from_pretrained(tiny_checkpoint.path, components={"thinker"})
    save_merged(thinker, out, tiny_checkpoint.path)
    assert (out / "logs" / "run1" / "events").read_text() == "training log"
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "config.json").read_text() == (tiny_checkpoint.path / "config.json").read_text()


def test_save_through_a_symlink_updates_its_target(tmp_path):
    real = tmp_path / "scratch" / "ckpt"
    real.mkdir(parents=True)
    (real / "old.txt").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(real)
    ckpt.save_checkpoint(small_tensors(), link, {"v": 1})
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert sorted(p.name for p in real.iterdir()) == ["config.json", "model.safetensors", "old.txt"]


def test_save_into_the_current_folder(tmp_path, monkeypatch):
    here = tmp_path / "cwd"
    here.mkdir()
    (here / "notes.txt").write_text("my notes")
    monkeypatch.chdir(here)
    ckpt.save_checkpoint(small_tensors(), ".", {"v": 1})
    assert sorted(os.listdir(".")) == ["config.json", "model.safetensors", "notes.txt"]  # cwd is the new folder


# ---- 5. PEFT adapters still attached -------------------------------------------------------------------------
def test_save_with_lora_attached_asks_to_merge_first(tiny_checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = Qwen3Omni.from_pretrained(tiny_checkpoint.path)
    get_peft_model(model.talker, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(InputError, match="merge_and_unload"):
        model.save_pretrained(tmp_path / "out")
    with pytest.raises(InputError, match="merge_and_unload"):
        model.save_pretrained(tmp_path / "merged", merge_into=tiny_checkpoint.path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- 6. stale or malformed index -----------------------------------------------------------------------------
@pytest.fixture
def sharded(tmp_path) -> Path:
    ckpt.save_checkpoint(small_tensors(), tmp_path / "c", {"v": 1}, max_shard_size=100)
    return tmp_path / "c"


def edit_index(folder: Path, change) -> None:
    index = json.loads((folder / ckpt.INDEX_FILE).read_text())
    change(index)
    (folder / ckpt.INDEX_FILE).write_text(json.dumps(index))


def test_stale_index_entry_is_a_checkpoint_error(sharded):
    # t0 lives in shard 1; the index now says shard 2 (what hand-edited shards leave behind)
    edit_index(sharded, lambda ix: ix["weight_map"].update({"t0.weight": "model-00002-of-00003.safetensors"}))
    with pytest.raises(CheckpointError, match=r"index\.json is stale.*t0\.weight"):
        ckpt.checkpoint_files(sharded)


@pytest.mark.parametrize("weight_map", [["t0.weight"], {"t0.weight": None}, {"t0.weight": "../x.safetensors"}])
def test_malformed_weight_map_is_a_checkpoint_error(sharded, weight_map):
    edit_index(sharded, lambda ix: ix.update(weight_map=weight_map))
    with pytest.raises(CheckpointError, match=r"index\.json: weight_map must"):
        ckpt.checkpoint_files(sharded)


# ---- 7. argument and config checks ---------------------------------------------------------------------------
@pytest.mark.parametrize("size", [-1, 0, 0.5, "0.1B", True])
def test_bad_max_shard_size(size, tmp_path):
    with pytest.raises(InputError, match="max_shard_size"):
        ckpt.save_checkpoint(small_tensors(), tmp_path / "c", {}, max_shard_size=size)
    assert not (tmp_path / "c").exists()


def test_saving_a_meta_model_is_an_input_error(tmp_path):
    with torch.device("meta"):
        tensors = small_tensors()
    with pytest.raises(InputError, match="meta"):
        ckpt.save_checkpoint(tensors, tmp_path / "c", {})


def tiny_raw(tiny_checkpoint) -> dict:
    return json.loads((tiny_checkpoint.path / "config.json").read_text())


@pytest.mark.parametrize("section, edits, key", [
    (("thinker_config", "audio_config"), {"n_window": 0}, "n_window"),
    (("thinker_config", "vision_config"), {"hidden_size": 33, "num_heads": 2}, "num_heads"),
    (("code2wav_config",), {"hidden_size": 33, "num_attention_heads": 2, "num_key_value_heads": 2},
     "num_attention_heads"),
])
def test_config_checks_name_the_key(tiny_checkpoint, section, edits, key):
    raw = json.loads((tiny_checkpoint.path / "config.json").read_text())
    sub = raw
    for part in section:
        sub = sub[part]
    sub.update(edits)
    with pytest.raises(ConfigError, match=rf"{'.'.join(section)}\.{key}"):
        Qwen3OmniConfig.from_dict(raw)


def test_config_file_not_utf8(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"a": "\xe9t\xe9"}')
    with pytest.raises(ConfigError, match="config.json.*UTF-8"):
        Qwen3OmniConfig.from_pretrained(tmp_path)


def test_from_pretrained_with_the_config_file_says_a_folder_is_expected(tiny_checkpoint):
    with pytest.raises(MissingFileError, match="expected a folder"):
        Qwen3Omni.from_pretrained(tiny_checkpoint.path / "config.json", components={"thinker"})


def test_gradient_checkpointing_refuses_a_misspelled_stack(tiny_model):
    before = tiny_model.thinker.model.gradient_checkpointing
    with pytest.raises(InputError, match="talker.modle"):
        set_gradient_checkpointing(tiny_model, stacks=["thinker.model", "talker.modle"], enabled=not before)
    assert tiny_model.thinker.model.gradient_checkpointing == before  # refused before setting anything


def test_linear_names_takes_one_name_as_a_string(tiny_model):
    names = linear_names(tiny_model.talker, "q_proj")
    assert names and names == linear_names(tiny_model.talker, ["q_proj"])

