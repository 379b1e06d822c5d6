"""Shared fixtures: the default tiny reference model, built once per session and saved in the released layout."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from reference import build_reference, save_reference, tiny_config

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@dataclass
class TinyCheckpoint:
    config: dict  # the config dict the reference was built from
    reference: object  # transformers Qwen3OmniMoeForConditionalGeneration, fp32, eval
    path: Path  # where save_pretrained wrote it


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> TinyCheckpoint:
    cfg = tiny_config()
    ref = build_reference(cfg, seed=0)
    path = save_reference(ref, tmp_path_factory.mktemp("tiny_reference"))
    return TinyCheckpoint(cfg, ref, path)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """Our Qwen3Omni loaded from the tiny reference checkpoint (fp32, CPU)."""
    from qwen3omni.model.omni import Qwen3Omni

    return Qwen3Omni.from_pretrained(tiny_checkpoint.path, dtype=torch.float32)
