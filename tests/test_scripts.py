"""The benchmark and GPU-check scripts run end to end on CPU (no timing is asserted, only that every section
runs and that both sides of the benchmark computed the same thing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def scripts_path():
    sys.path.insert(0, str(SCRIPTS))
    yield
    sys.path.remove(str(SCRIPTS))


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_gpu_check_dry_run_runs_every_section(scripts_path, capsys):
    import gpu_check

    gpu_check.main(["--dry-run", "--speech-frames", "12"])
    lines = json_lines(capsys.readouterr().out)
    sections = {line["section"] for line in lines}
    assert {"build", "thinker decode", "prefill", "first audio", "speech", "reference", "summary"} <= sections
    failed = [line for line in lines if "failed" in line or "skipped" in line]
    assert not failed, failed
    decode = [line for line in lines if line["section"] == "thinker decode" and "first_tokens_equal_to_eager" in line]
    assert decode and decode[0]["first_tokens_equal_to_eager"] == decode[0]["tokens"] + 1  # same greedy tokens
    ref = [line for line in lines if "first_tokens_equal_to_reference" in line]
    assert ref and ref[0]["first_tokens_equal_to_reference"] >= 1


def test_bench_quick_speech_frame_matches_reference(scripts_path, capsys):
    import bench

    bench.main(["--quick", "-w", "D", "--repeats", "1", "--warmup", "0"])
    eager, compiled, aot = json_lines(capsys.readouterr().out)
    assert compiled["workload"] == "D speech frame, ours compiled"
    assert aot["workload"] == "D speech frame, ours compiled ahead of time" and aot["aot_built"] is True
    for line in (eager, compiled, aot):
        assert line["same_codes"] is True
        assert line["ours"]["n"] == 1 and line["reference"]["n"] == 1 and line["ratio"] > 0


def test_bench_quick_decode_eager_and_compiled_match_reference(scripts_path, capsys):
    import bench

    bench.main(["--quick", "-w", "B", "--repeats", "1", "--warmup", "0"])
    eager, compiled = json_lines(capsys.readouterr().out)
    assert compiled["workload"] == "B thinker decode, ours compiled" and "compile_seconds" in compiled
    for line in (eager, compiled):
        assert line["same_tokens"] is True
        assert line["fraction_of_roofline"] > 0 and line["bytes_per_step_MB"] == eager["bytes_per_step_MB"]


def test_bench_goes_on_when_compiling_fails(scripts_path, capsys, monkeypatch):
    import bench

    from qwen3omni.modules.decoder import DecoderStack

    real = DecoderStack.compile_decode_step

    def broken(self, enable=True, **options):
        if enable:
            raise RuntimeError("no C++ compiler here")
        return real(self, False)

    monkeypatch.setattr(DecoderStack, "compile_decode_step", broken)
    bench.main(["--quick", "-w", "D", "E", "--repeats", "1", "--warmup", "0"])
    out = capsys.readouterr()
    workloads = [line["workload"] for line in json_lines(out.out)]
    assert workloads[0].startswith("D speech frame") and not any("compiled" in w for w in workloads)
    assert any(w.startswith("E code2wav") for w in workloads)  # the run went on after D
    assert "the compiled line is skipped" in out.err and "no C++ compiler here" in out.err


def test_gpu_check_dry_run_compiled_pass(scripts_path, capsys):
    import gpu_check

    gpu_check.main(["--dry-run", "--compile", "--compiled-only", "--profile-stream", "--skip-reference",
                    "--speech-frames", "8"])
    lines = json_lines(capsys.readouterr().out)
    compiled = [line for line in lines if line["section"] == "compiled pass"]
    assert compiled and compiled[0]["same_argmax"] is True
    summary = next(line for line in lines if line["section"] == "summary")
    assert "thinker_decode_tokens_per_s_compiled" in summary and "stream_real_time_factor_compiled" in summary
    assert any(line["section"] == "stream profile" for line in lines)


def test_bench_ours_in_bf16_against_the_reference_in_fp32(scripts_path, capsys):
    import bench

    bench.main(["--quick", "-w", "A", "--repeats", "1", "--warmup", "0", "--ours-dtype", "bfloat16"])
    (line,) = json_lines(capsys.readouterr().out)
    assert line["dtype"] == "torch.float32" and line["ours_dtype"] == "torch.bfloat16"
    # ours really ran in bf16 (fp32 against fp32 agree to ~1e-6), and still computed the same thing
    assert 1e-4 < line["max_rel_err"] < 0.05


def test_bench_dtype_tags_do_not_leak_into_a_later_run(scripts_path, capsys):
    import bench

    bench.main(["--quick", "-w", "A", "--repeats", "1", "--warmup", "0", "--dtype", "bfloat16"])
    bench.main(["--quick", "-w", "A", "--repeats", "1", "--warmup", "0"])
    first, second = json_lines(capsys.readouterr().out)
    assert first["dtype"] == "torch.bfloat16" and "dtype" not in second and "ours_dtype" not in second
