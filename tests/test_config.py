"""Reading the released configuration (issue 2): both layouts, thinker-only configs, errors with key paths."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from qwen3omni.config import Qwen3OmniConfig
from qwen3omni.errors import ConfigError, MissingFileError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
INSTRUCT = CONFIGS / "qwen3-omni-30b-a3b-instruct.json"


def raw() -> dict:
    return json.loads(INSTRUCT.read_text())


def to_shipped_layout(cfg: dict) -> dict:
    """The layout of the config.json shipped with the checkpoint: rope_scaling + rope_theta, num_local_experts."""
    cfg = copy.deepcopy(cfg)
    sections = [
        cfg["thinker_config"]["text_config"], cfg["talker_config"]["text_config"],
        cfg["talker_config"]["code_predictor_config"], cfg["code2wav_config"],
    ]
    for sec in sections:
        params = sec.pop("rope_parameters")
        sec["rope_theta"] = params.pop("rope_theta")
        if "mrope_section" in params:
            sec["rope_scaling"] = {k: v for k, v in params.items() if k != "mrope_interleaved"}
    text = cfg["thinker_config"]["text_config"]
    text["num_local_experts"] = text.pop("num_experts")
    return cfg


def test_released_config_values():
    cfg = Qwen3OmniConfig.from_pretrained(INSTRUCT)
    t = cfg.thinker.text
    assert (t.num_hidden_layers, t.num_experts, t.num_experts_per_tok, t.head_dim) == (48, 128, 8, 128)
    assert (t.mrope_section, t.mrope_interleaved, t.rope_theta) == ([24, 20, 20], True, 1000000)
    assert cfg.thinker.position_id_per_seconds == 13 and cfg.thinker.seconds_per_chunk == 2
    assert cfg.thinker.audio_token_id == 151675
    assert cfg.talker.accept_hidden_layer == 24 and cfg.talker.num_code_groups == 16
    assert cfg.talker.text.num_experts == 128 and cfg.talker.text.num_experts_per_tok == 6
    assert cfg.talker.text.shared_expert_intermediate_size == 768
    assert cfg.code2wav.sliding_window == 72 and cfg.code2wav.samples_per_frame == 1920
    assert cfg.talker.speaker_id == {"aiden": 2303, "chelsie": 2301, "ethan": 2302}


def test_both_layouts_give_the_same_dataclasses(tmp_path):
    shipped = tmp_path / "config.json"
    shipped.write_text(json.dumps(to_shipped_layout(raw())))
    assert Qwen3OmniConfig.from_pretrained(tmp_path) == Qwen3OmniConfig.from_pretrained(INSTRUCT)


def test_round_trip_and_transformers_reads_what_we_write():
    cfg = Qwen3OmniConfig.from_pretrained(INSTRUCT)
    assert Qwen3OmniConfig.from_dict(cfg.to_dict()) == cfg
    assert Qwen3OmniConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    from transformers import Qwen3OmniMoeConfig

    ref = Qwen3OmniMoeConfig(**cfg.to_dict())
    assert ref.talker_config.text_config.num_experts == 128
    assert ref.thinker_config.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
    assert ref.code2wav_config.sliding_window == 72


def test_file_values_win_over_defaults():
    d = raw()
    d["thinker_config"]["position_id_per_seconds"] = 25
    d["talker_config"]["accept_hidden_layer"] = 18
    cfg = Qwen3OmniConfig.from_dict(d)
    assert cfg.thinker.position_id_per_seconds == 25 and cfg.talker.accept_hidden_layer == 18


def test_thinking_config_is_thinker_only():
    cfg = Qwen3OmniConfig.from_pretrained(CONFIGS / "qwen3-omni-30b-a3b-thinking.json")
    assert not cfg.enable_audio_output and cfg.talker is None and cfg.code2wav is None and not cfg.has_talker
    assert cfg.thinker == Qwen3OmniConfig.from_pretrained(INSTRUCT).thinker


def _drop(d, path):
    *parents, leaf = path.split(".")
    for k in parents:
        d = d[k]
    del d[leaf]


def _set(d, path, value):
    *parents, leaf = path.split(".")
    for k in parents:
        d = d[k]
    d[leaf] = value


@pytest.mark.parametrize(
    "path",
    ["thinker_config.text_config.num_experts", "thinker_config.audio_config.d_model", "thinker_config.vision_config",
     "talker_config.code_predictor_config.hidden_size", "code2wav_config.decoder_dim", "thinker_config"],
)
def test_missing_required_field_names_its_path(path):
    d = raw()
    _drop(d, path)
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        Qwen3OmniConfig.from_dict(d)


@pytest.mark.parametrize(
    "path,value",
    [("thinker_config.text_config.hidden_size", "2048"), ("thinker_config.text_config.num_experts", True),
     ("talker_config.speaker_id", ["ethan"]), ("code2wav_config.upsample_rates", [8, "5"]),
     ("thinker_config.text_config.rope_parameters", 5), ("enable_audio_output", "yes")],
)
def test_ill_typed_field_names_its_path(path, value):
    d = raw()
    _set(d, path, value)
    with pytest.raises(ConfigError, match=path.split(".rope_parameters")[0].replace(".", r"\.")):
        Qwen3OmniConfig.from_dict(d)


def test_inconsistent_values_are_errors():
    d = raw()
    d["thinker_config"]["text_config"]["rope_parameters"]["mrope_section"] = [24, 20, 21]
    with pytest.raises(ConfigError, match="mrope_section"):
        Qwen3OmniConfig.from_dict(d)
    d = raw()
    d["talker_config"]["accept_hidden_layer"] = 99
    with pytest.raises(ConfigError, match="accept_hidden_layer"):
        Qwen3OmniConfig.from_dict(d)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(MissingFileError, match="config.json"):
        Qwen3OmniConfig.from_pretrained(tmp_path)
    with pytest.raises(MissingFileError):
        Qwen3OmniConfig.from_pretrained(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen3OmniConfig.from_pretrained(bad)
