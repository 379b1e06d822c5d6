"""The module tree built on `meta` from the released config exports exactly the released tensor list."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen3omni.checkpoint import export_state_dict
from qwen3omni.config import Qwen3OmniConfig
from qwen3omni.model.omni import Qwen3Omni

from reference import released_weights

ROOT = Path(__file__).resolve().parents[1]
@pytest.fixture(scope="module")
def exported():
    cfg = Qwen3OmniConfig.from_pretrained(ROOT / "configs" / "qwen3-omni-30b-a3b-instruct.json")
    with torch.device("meta"):
        model = Qwen3Omni(cfg)
    return {name: list(t.shape) for name, t in export_state_dict(model).items()}


@pytest.mark.parametrize("prefix", ["thinker.model.", "thinker.lm_head.", "thinker.audio_tower.", "thinker.visual.",
                                    "talker.", "code2wav."])
def test_component_matches_released_list(exported, prefix):
    want = {n: s for n, s in released_weights().items() if n.startswith(prefix)}
    got = {n: s for n, s in exported.items() if n.startswith(prefix)}
    assert sorted(set(want) - set(got)) == []
    assert sorted(set(got) - set(want)) == []
    assert {n: s for n, s in got.items() if want[n] != s} == {}


def test_full_model_is_the_released_layout(exported):
    want = released_weights()
    assert len(want) == 28010
    assert exported == want
    assert sum(torch.Size(s).numel() for s in exported.values()) == 35_259_818_545
