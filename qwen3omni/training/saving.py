"""Saving part of a model into a full checkpoint: e.g. a thinker-only fine-tune back into the Omni release.

`model.save_pretrained(out)` writes what the model holds: a thinker-only model gives a thinker-only checkpoint
(enable_audio_output: false), which loads anywhere a Thinking/Captioner checkpoint does. `save_merged(model,
out, base)` instead rewrites the checkpoint at `base` with the model's tensors in place of base's, so the
result is the full model (talker and Code2Wav from `base`) with the fine-tuned thinker. It streams one shard
at a time (peak memory: one shard), keeps base's shard layout, index, config and every other file of the
folder (tokenizer, chat template, preprocessor config), and casts the new tensors to base's dtypes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import (
    INDEX_FILE,
    checkpoint_files,
    commit_dir,
    export_state_dict,
    is_weight_file,
    prepare_out_dir,
    refuse_adapters,
    staging,
)
from ..errors import CheckpointError


def save_merged(model: nn.Module, out_dir: str | Path, base: str | Path) -> None:
    """Write `base` with `model`'s tensors replacing base's tensors of the same (released) names, to `out_dir`.

    Every tensor of `model` must exist in `base` with the same shape. `out_dir` may equal `base` (it is replaced
    atomically once the new folder is complete). Whatever else an existing `out_dir` holds (files, subfolders)
    is kept; base's own files of the same names win.
    """
    merge_tensors(export_state_dict(model), out_dir, base)


def merge_tensors(ours: dict[str, torch.Tensor], out_dir: str | Path, base: str | Path) -> None:
    """`save_merged` for tensors already in the released layout (e.g. gathered from a sharded model)."""
    from safetensors.torch import load_file, save_file

    refuse_adapters(ours)
    base = Path(base)
    files = checkpoint_files(base)
    missing = sorted(set(ours) - set(files))
    if missing:
        raise CheckpointError(
            f"save_merged: {len(missing)} tensor(s) of the model are not in {base}: {missing[:8]}"
            + (" ..." if len(missing) > 8 else "")
        )
    out_dir = prepare_out_dir(out_dir)
    with staging(out_dir) as tmp:
        try:
            for shard_path in sorted(set(files.values())):
                shard = load_file(str(shard_path))
                for name in shard:
                    if name not in ours:
                        continue
                    new = ours[name]
                    if list(new.shape) != list(shard[name].shape):
                        raise CheckpointError(
                            f"save_merged: {name} has shape {list(new.shape)} in the model but "
                            f"{list(shard[name].shape)} in {base}"
                        )
                    shard[name] = new.detach().to("cpu", shard[name].dtype).contiguous().clone()
                save_file(shard, str(tmp / shard_path.name), metadata={"format": "pt"})
                del shard
            for item in base.iterdir():  # config, index, tokenizer, templates: as in base
                if item.is_file() and (item.name == INDEX_FILE or not is_weight_file(item.name)):
                    if not (tmp / item.name).exists():
                        shutil.copy2(item, tmp / item.name)
            commit_dir(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@torch.no_grad()
def changed_tensors(model: nn.Module, base: str | Path, atol: float = 0.0) -> list[str]:
    """Released names of the model's tensors that differ from `base` by more than `atol` (what a save changes)."""
    from safetensors import safe_open

    files = checkpoint_files(base)
    ours = export_state_dict(model)
    changed = []
    by_file: dict[Path, list[str]] = {}
    for name in ours:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                stored = f.get_tensor(name).float()
                if (ours[name].detach().float().cpu() - stored).abs().max() > atol:
                    changed.append(name)
    return sorted(changed)
