"""The `qwen3omni` command and its weight-free demo."""

from __future__ import annotations

import json
from pathlib import Path

import soundfile

from qwen3omni.cli import main
from qwen3omni.demo import run_demo

ROOT = Path(__file__).resolve().parents[1]


def test_packaged_tiny_config_is_configs_tiny_json():
    shipped = json.loads((ROOT / "qwen3omni" / "assets" / "tiny.json").read_text())
    assert shipped == json.loads((ROOT / "configs" / "tiny.json").read_text())


def test_demo_streams_text_and_speech(tmp_path):
    report = run_demo(tmp_path / "reply.wav", max_new_tokens=5, frames=6)
    wave, rate = soundfile.read(tmp_path / "reply.wav")
    assert rate == 24000 and abs(wave.size - report["audio_seconds"] * 24000) < 24 and wave.size > 0
    assert 0 < abs(wave).max() < 1.0, "the demo's speech is neither silent nor clipped"
    assert len(report["token_ids"]) == 5
    assert report["time_to_first_audio_s"] is not None and report["real_time_factor"] > 0


def test_chat_needs_some_input(tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path)]) == 2
    assert "--text" in capsys.readouterr().err
