"""Long input (issue 9): a 40-minute recording goes through the processor and the tiny audio encoder whole (no
30-second cut, no truncation anywhere) with peak memory that grows linearly with its length.

Each length runs in a fresh interpreter; after the imports, the model and a short warm-up, the peak-RSS mark is
reset (`/proc/self/clear_refs` = 5), so the peak measured is what processing the recording itself costs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, math, sys
    import numpy as np
    import torch
    from qwen3omni.demo import byte_level_tokenizer, tiny_config
    from qwen3omni.model.audio_encoder import AudioEncoder
    from qwen3omni.model.positions import audio_token_count
    from qwen3omni.processing import Processor

    torch.set_num_threads(2)
    RATE = 16000

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def recording(seconds, seed=0):
        # speech-like: a buzz whose pitch wanders, under noise; built a minute at a time
        rng, parts, t0 = np.random.default_rng(seed), [], 0.0
        left = int(seconds * RATE)
        while left:
            n = min(left, 60 * RATE)
            t = t0 + np.arange(n, dtype=np.float64) / RATE
            pitch = 2 * np.pi * (140 * t + 15 * np.sin(2 * np.pi * 0.3 * t))
            parts.append((0.2 * np.sin(pitch) + 0.02 * rng.standard_normal(n)).astype(np.float32))
            t0, left = t0 + n / RATE, left - n
        return np.concatenate(parts)

    def run(wave):
        out = processor([{"role": "user", "content": [{"type": "audio", "audio": wave}]}])
        with torch.no_grad():
            rows = encoder(out["input_features"], out["feature_attention_mask"].sum(-1)).shape[0]
        return out, rows

    torch.manual_seed(0)
    cfg = tiny_config()
    encoder = AudioEncoder(cfg.thinker.audio).eval()
    processor = Processor(byte_level_tokenizer())
    run(recording(5.0))  # warm-up: thread pools, FFT plans, caches
    wave = recording(float(sys.argv[1]) * 60)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak mark restarts from the current RSS
    base = status("VmRSS")
    out, rows = run(wave)
    peak = status("VmHWM")
    frames = int(out["feature_attention_mask"].sum())
    print(json.dumps({
        "samples": int(wave.size), "frames": frames, "feature_frames": int(out["input_features"].shape[-1]),
        "placeholders": int((out["input_ids"] == cfg.thinker.audio_token_id).sum()),
        "expected_tokens": int(audio_token_count(frames, cfg.thinker.audio.n_window)),
        "encoder_rows": int(rows), "increase": peak - base,
    }))
    """
)


def measure(minutes: float) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(minutes)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs():
    return {minutes: measure(minutes) for minutes in (10, 40)}


@pytest.mark.parametrize("minutes", [10, 40])
def test_nothing_is_truncated(runs, minutes):
    r = runs[minutes]
    assert r["samples"] == minutes * 60 * 16000
    assert r["frames"] * 160 >= r["samples"] and r["feature_frames"] * 160 >= r["samples"] - 160, \
        "the features must cover every sample"
    assert r["placeholders"] == r["expected_tokens"] == r["encoder_rows"], "placeholders = encoder outputs"
    assert r["encoder_rows"] == minutes * 60 * 13  # 13 tokens per full 1-second chunk


def test_peak_memory_grows_linearly(runs):
    short, long = runs[10]["increase"], runs[40]["increase"]
    assert short > 50 * 2**20, f"the 10-minute run should cost real memory, measured {short / 2**20:.0f} MiB"
    assert long < 4.5 * short, f"40 minutes cost {long / short:.2f}x the memory of 10 minutes (linear: 4x)"
