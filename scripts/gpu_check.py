"""One prepared run on a lent H100/H200: the real config with random bf16 weights, built on the GPU.

    python scripts/gpu_check.py                 # the real config (configs/qwen3-omni-30b-a3b-instruct.json)
    python scripts/gpu_check.py --dry-run       # CPU, configs/tiny.json: every section, to check the script

Needs no file outside the repository and no checkpoint: the model is built on the meta device, materialised
on the GPU in bf16 and filled in place with small random values. Prints one JSON line per measurement as it
goes (a section that fails prints its error and the run goes on), each section within a time budget:

  1. thinker decode tokens/s at batch 1: eager, and with the decode step captured in a CUDA graph
     (static KV cache, MoE through torch._grouped_mm: no host sync in the step)
  2. prefill time for 2,000 tokens (flash-attn when installed, else SDPA)
  3. time from request to first audio for a short text prompt, through `Qwen3Omni.stream` when present, and
     the same chain timed stage by stage (thinker prefill + first token, talker prefill, code predictor,
     Code2Wav's first streamed frame)
  4. speech real-time factor: talker step + 15-step code predictor (one CUDA graph per frame) + incremental
     Code2Wav, seconds of compute per second of audio
  5. peak GPU memory
  With --compile, sections 1, 4 and 3 (stream) run again after `model.compile_decoding()`: the decode steps'
  layers through torch.compile (one compiled layer step per stack), inside the same CUDA graphs.
  6. the transformers reference on the same GPU and the same weights (its thinker, real widths; all 48 layers
     when memory allows, else fewer, said in the output): greedy decode tokens/s, and ours on it, as a ratio
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_util as U  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NEWLINE = 198  # "\n" in the Qwen tokenizer


# ---- output and budget -------------------------------------------------------------------------------------------
SUMMARY: dict = {}  # the headline figures, printed again at the end next to issue 10's GPU targets
PASS = {"tag": ""}  # "" for the eager-layer pass, "compiled" after `compile_decoding()`


EAGER_TOKENS: dict = {}  # the first pass's eager greedy tokens, compared with the compiled pass's


def record(key: str, value) -> None:
    """A headline figure, suffixed with the current pass ("..._compiled" in the compiled pass)."""
    SUMMARY[key + (f"_{PASS['tag']}" if PASS["tag"] else "")] = value


def say(section: str, **fields) -> None:
    print(json.dumps({"section": section, **fields}, default=str), flush=True)


class Budget:
    """Wall-clock budget for the whole run; sections skip themselves when too little is left."""

    def __init__(self, seconds: float):
        self.start, self.total = time.perf_counter(), seconds

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.start)

    @contextlib.contextmanager
    def section(self, name: str, needs: float):
        if self.left() < needs:
            say(name, skipped=f"only {self.left():.0f} s of the budget left, needs ~{needs:.0f} s")
            yield False
            return
        start = time.perf_counter()
        print(f"--- {name} (budget left {self.left():.0f} s)", flush=True)
        try:
            yield True
        except Exception as e:  # noqa: BLE001 - report and go on to the next section
            say(name, failed=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:])
            if isinstance(e, torch.cuda.OutOfMemoryError):
                gc.collect()
                torch.cuda.empty_cache()
        finally:
            print(f"--- {name} done in {time.perf_counter() - start:.1f} s", flush=True)


class Device:
    def __init__(self, name: str):
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def clock(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def peak_gb(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.device) / 1e9, 2) if self.cuda else None


# ---- building ------------------------------------------------------------------------------------------------------
def load_config(args) -> dict:
    if args.dry_run:
        return json.loads((ROOT / "configs" / "tiny.json").read_text())
    cfg = U.real_config()
    if args.layers:
        cfg["thinker_config"]["text_config"]["num_hidden_layers"] = args.layers
        talker = cfg["talker_config"]
        talker["accept_hidden_layer"] = min(talker["accept_hidden_layer"], args.layers)
    return cfg


def build_ours(cfg: dict, dev: Device, dtype, seed: int, components=None):
    from qwen3omni.checkpoint import materialize
    from qwen3omni.model.omni import Qwen3Omni

    with torch.device("meta"):
        model = Qwen3Omni(U.ours_config(cfg), components)
    materialize(model, dev.device, dtype)
    U.randomize_(model, seed)
    return model.eval()


def use_fast_attention(model) -> str:
    from qwen3omni.modules import attention

    backend = "flash" if attention.flash_attn_func is not None else "sdpa"
    model.set_attention_backend(backend)  # decoders, Code2Wav and the encoders' varlen attention
    return backend


def random_ids(n: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 100000, (1, n), generator=g).to(device)


def chat_prompt(cfg: dict, words: int, seed: int, device) -> torch.Tensor:
    """<|im_start|>user\\n (random text) <|im_end|>\\n<|im_start|>assistant\\n, as the chat template lays it out."""
    im_start, im_end = cfg.get("im_start_token_id", 151644), cfg.get("im_end_token_id", 151645)
    user, assistant = cfg.get("user_token_id", 872), cfg.get("assistant_token_id", 77091)
    text = random_ids(words, seed, "cpu")[0].tolist()
    ids = [im_start, user, NEWLINE, *text, im_end, NEWLINE, im_start, assistant, NEWLINE]
    return torch.tensor([ids], device=device)


# ---- replaying a step: a CUDA graph on CUDA, the same function eagerly elsewhere -------------------------------------
class Replay:
    """Capture `step` (a function of fixed-address buffers) once into a CUDA graph and replay it.

    On CPU, or when capture fails, `__call__` runs `step` eagerly (the fallback is reported)."""

    def __init__(self, step, dev: Device, warmup: int = 2, name: str = "step"):
        self.step, self.graph, self.note = step, None, "eager (no CUDA)"
        if not dev.cuda:
            return
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            self.graph, self.note = graph, "cuda graph"
        except Exception as e:  # noqa: BLE001
            self.note = f"eager (capture of {name} failed: {type(e).__name__}: {str(e)[:300]})"
            torch.cuda.synchronize()

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()


def check_no_sync(fn, dev: Device) -> str:
    """Run `fn` once with CUDA's sync debug mode set to error: names the first host sync, if any."""
    if not dev.cuda:
        return "n/a (CPU)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as e:
        return f"host sync: {str(e)[:200]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- 1. thinker decode -----------------------------------------------------------------------------------------------
class GraphDecoder:
    """Greedy thinker decoding whose step reads and writes only device buffers (token, positions, static cache)."""

    def __init__(self, thinker, prompt: torch.Tensor, new_tokens: int, dev: Device):
        self.thinker, self.dev = thinker, dev
        self.cache = thinker.model.new_cache(1, prompt.shape[1] + new_tokens + 8)
        with torch.no_grad():
            out = thinker(input_ids=prompt, cache=self.cache, logits_to_keep=1)
        self.cache.set_static(True)
        self.token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        self.pos = out.position_ids[..., -1:].clone()  # [3, 1, 1]
        self.history = [self.token.clone()]  # tokens before `run`: the first one and the graph's warm-up steps
        self.recording = True

    @torch.no_grad()
    def step(self):
        self.pos += 1
        out = self.thinker(input_ids=self.token, position_ids=self.pos, cache=self.cache, logits_to_keep=1)
        self.token.copy_(out.logits[:, -1].argmax(-1, keepdim=True))  # the forward advanced the cache
        if self.recording and not (self.dev.cuda and torch.cuda.is_current_stream_capturing()):
            self.history.append(self.token.clone())

    def capture(self) -> Replay:
        """Capture one step; the warm-up steps it runs first are real decode steps of this generation."""
        length = self.cache.length
        replay = Replay(self.step, self.dev, name="thinker decode step")
        if replay.graph is not None:  # capture ran the Python once: undo its host-side bookkeeping
            self.cache.advance(-1, on_device=False)
            assert self.cache.length == length + 2
        return replay

    def run(self, replay: Replay, n: int) -> tuple[float, torch.Tensor]:
        tokens = torch.empty(n, dtype=torch.long, device=self.dev.device)
        self.recording = False

        def loop():
            for i in range(n):
                replay()
                if replay.graph is not None:
                    self.cache.advance(1, on_device=False)
                tokens[i] = self.token[0, 0]

        return self.dev.clock(loop), tokens


def eager_decode_seconds(thinker, prompt, n: int, dev: Device, cuda_graphs: bool | None = False):
    """Per-step time of our generate: (time for 1 + n tokens - time for 2 tokens) / (n - 1), so the prefill and,
    with graphs, the per-call capture (done before the second token) cancel out. `cuda_graphs=False` is the
    eager loop; None is the library's default (the step replayed from a CUDA graph, captured per call)."""
    from qwen3omni.generation.text import generate_text

    def gen(k):
        return generate_text(thinker, prompt, max_new_tokens=k, cuda_graphs=cuda_graphs)

    with torch.no_grad():
        gen(3)
        two = min(dev.clock(lambda: gen(2)) for _ in range(2))
        result = {}
        many = dev.clock(lambda: result.setdefault("out", gen(n + 1)))
    return (many - two) / (n - 1), result["out"].new_tokens[0]


def section_decode(model, args, dev: Device, budget: Budget) -> None:
    thinker = model.thinker
    prompt = random_ids(32 if not args.dry_run else 8, 1, dev.device)
    n = args.decode_tokens
    per_step, eager_tokens = eager_decode_seconds(thinker, prompt, n, dev)
    if PASS["tag"] and "t" in EAGER_TOKENS:
        say("thinker decode", first_tokens_equal_to_uncompiled_eager=_agreement(eager_tokens, EAGER_TOKENS["t"]))
    else:
        EAGER_TOKENS["t"] = eager_tokens
    record("eager_thinker_step_ms", per_step * 1e3)
    say("thinker decode", mode="eager" + (" (compiled layers, no graph)" if PASS["tag"] else ""),
        tokens_per_s=round(1 / per_step, 2), ms_per_token=round(per_step * 1e3, 2), tokens=n)
    lib_step, lib_tokens = eager_decode_seconds(thinker, prompt, n, dev, cuda_graphs=None)
    record("library_generate_tokens_per_s", round(1 / lib_step, 2))
    say("thinker decode", mode="library generate (cuda graphs, captured per call; capture not in the figure)",
        tokens_per_s=round(1 / lib_step, 2), ms_per_token=round(lib_step * 1e3, 2), tokens=n,
        first_tokens_equal_to_eager=_agreement(lib_tokens, eager_tokens))
    dec = GraphDecoder(thinker, prompt, n + 8, dev)
    say("thinker decode", host_syncs_in_step=check_no_sync(dec.step, dev))
    dec = GraphDecoder(thinker, prompt, n + 8, dev)
    replay = dec.capture()
    seconds, tokens = dec.run(replay, n - 2)
    agree = _agreement(torch.cat([t[0] for t in dec.history] + [tokens]), eager_tokens)
    record("thinker_decode_tokens_per_s", round((n - 2) / seconds, 2))
    record("thinker_decode_mode", replay.note)
    record("thinker_step_ms", seconds / (n - 2) * 1e3)
    say("thinker decode", mode=replay.note, tokens_per_s=round((n - 2) / seconds, 2),
        ms_per_token=round(seconds / (n - 2) * 1e3, 2), tokens=n - 2, first_tokens_equal_to_eager=agree)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading tokens two greedy runs share (the graph path's masked attention rounds differently in
    bf16, so long runs may drift apart at a near-tie; an early mismatch would mean a bug)."""
    a, b = a.cpu(), b.cpu()
    n = min(len(a), len(b))
    same = (a[:n] == b[:n]).int()
    return int(same.cumprod(0).sum())


@torch.no_grad()
def decode_step_logits(thinker, prompt: torch.Tensor) -> torch.Tensor:
    """Float logits of one static-cache decode step after `prompt` (compiled layers if the stack has them)."""
    cache = thinker.model.new_cache(1, prompt.shape[1] + 4)
    out = thinker(input_ids=prompt, cache=cache, logits_to_keep=1)
    cache.set_static(True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    step = thinker(input_ids=token, position_ids=out.position_ids[..., -1:] + 1, cache=cache, logits_to_keep=1)
    return step.logits[0, -1].float()


def section_compiled_pass(model, cfg, args, dev: Device, budget: Budget) -> None:
    """`model.compile_decoding()`, then the decode, speech and stream measurements again: each decode step's
    layers through one torch.compile'd layer step per stack, inside the same CUDA graphs."""
    prompt = random_ids(40, 11, dev.device)
    eager_logits = decode_step_logits(model.thinker, prompt)
    for m in model.thinker.modules():  # the bf16 noise floor: the same step with another (exact) MoE dispatch
        if hasattr(m, "compiled_dispatch"):
            m.dispatch = "gathered"
    other_dispatch = decode_step_logits(model.thinker, prompt)
    for m in model.thinker.modules():
        if hasattr(m, "compiled_dispatch"):
            m.dispatch = "auto"
    t = time.perf_counter()
    model.compile_decoding()
    compiled_logits = decode_step_logits(model.thinker, prompt)
    scale = eager_logits.abs().max()
    say("compiled pass", decode_step_logits_max_rel_diff_compiled_vs_eager=round(float(
        (compiled_logits - eager_logits).abs().max() / scale), 5), noise_floor_other_moe_dispatch=round(float(
        (other_dispatch - eager_logits).abs().max() / scale), 5), same_argmax=bool(
        compiled_logits.argmax() == eager_logits.argmax()))
    PASS["tag"] = "compiled"
    try:
        with torch.no_grad():  # compile here (thinker, talker, predictor), not inside a timing
            model.generate(input_ids=chat_prompt(cfg, 4, 9, dev.device), max_new_tokens=3, do_sample=False,
                           talker_do_sample=False, talker_max_new_tokens=3)
        dev.sync()
        say("compiled pass", compile_and_first_generate_seconds=round(time.perf_counter() - t, 1))
        record("compile_seconds", round(time.perf_counter() - t, 1))
        section_decode(model, args, dev, budget)
        section_rtf(model, args, dev, budget)
        section_first_audio_stream(model, cfg, args, dev)
        if args.profile_stream:
            section_profile_stream(model, cfg, args, dev)
        if args.experiments:
            section_experiments(model, cfg, args, dev, budget)
    finally:
        PASS["tag"] = ""


def section_profile_stream(model, cfg, args, dev: Device) -> None:
    """Where a warm `stream` call spends its wall time: torch.profiler over one call, with the library's stages
    labelled (wrapped here, not in the library), plus GPU busy time. Prints the top entries."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from qwen3omni.generation import graphs, pipeline, speech, text
    from qwen3omni.model import code2wav

    originals = []

    def label(owner, name, tag):
        fn = getattr(owner, name)
        originals.append((owner, name, fn))

        def wrapped(*a, **k):
            with record_function(tag):
                return fn(*a, **k)

        setattr(owner, name, wrapped)

    label(graphs.PredictorRunner, "run", "L:predictor_runner.run")
    label(graphs.StaticDecoder, "__call__", "L:static_decoder_step")
    label(code2wav.StreamingDecoder, "push", "L:code2wav.push")
    label(pipeline, "project_text", "L:project_text")
    label(speech, "next_token", "L:talker_next_token")
    label(text, "next_token", "L:thinker_next_token")
    prompt = chat_prompt(cfg, 12, 3, dev.device)
    kwargs = dict(max_new_tokens=args.stream_tokens, do_sample=False, talker_do_sample=False,
                  talker_max_new_tokens=args.stream_frames)
    try:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.cuda else [])
        with torch.no_grad(), profile(activities=activities) as prof:
            start = time.perf_counter()
            events = list(model.stream(input_ids=prompt, **kwargs))
            dev.sync()
            wall = time.perf_counter() - start
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    frames = sum(e.data.numel() for e in events if e.kind == "audio") / 1920
    table = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in table if e.device_type.name == "CUDA") if dev.cuda else 0
    say("stream profile", wall_ms=round(wall * 1e3, 1), frames=round(frames, 1),
        gpu_kernel_ms=round(gpu_us / 1e3, 1), wall_ms_per_frame=round(wall * 1e3 / max(frames, 1), 2))
    rows = sorted(table, key=lambda e: -e.cpu_time_total)
    keep = [e for e in rows if e.key.startswith("L:") or e.key.startswith("cuda")][:14]
    keep += [e for e in rows if not e.key.startswith(("L:", "cuda"))][:12]
    for e in keep:
        say("stream profile", op=e.key[:60], calls=e.count, cpu_total_ms=round(e.cpu_time_total / 1e3, 2),
            cpu_self_ms=round(e.self_cpu_time_total / 1e3, 2))


# ---- experiments: where a frame's time goes, and compile variants -------------------------------------------------
def kernel_profile(fn, dev: Device, repeats: int, label: str) -> None:
    """GPU kernels of `repeats` calls of `fn` (CUDA graph replays included): count and time per call, and the
    kernels that take the most time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    dev.sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        dev.sync()
        wall = (time.perf_counter() - start) / repeats
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in kernels) / repeats
    count = sum(e.count for e in kernels) / repeats
    say("profile", what=label, wall_ms=round(wall * 1e3, 3), gpu_kernel_ms=round(total / 1e3, 3),
        kernels_per_call=round(count, 1), us_per_kernel=round(total / max(count, 1), 2))
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]:
        say("profile", what=label, kernel=e.key[:90], per_call=round(e.count / repeats, 1),
            us_per_call=round(e.self_device_time_total / repeats, 1))


def frame_and_decode(model, cfg, dev: Device, label: str) -> Replay:
    """Talker step + code predictor per frame (one CUDA graph) and a thinker decode step (CUDA graph), timed;
    returns the frame's replay."""
    loop = SpeechLoop(model, dev, prompt_len=40, frames=80)
    loop.prefill()
    for _ in range(2):
        loop.frame()
    replay = Replay(loop.frame, dev, name="speech frame")
    times = []
    for _ in range(40):
        times.append(dev.clock(replay))
        if replay.graph is not None:
            loop.cache.advance(1, on_device=False)
    frame_ms = statistics.median(times[1:]) * 1e3
    dec = GraphDecoder(model.thinker, random_ids(40, 12, dev.device), 72, dev)
    step_replay = dec.capture()
    seconds, tokens = dec.run(step_replay, 60)
    say("experiment", variant=label, frame_ms=round(frame_ms, 3), thinker_ms_per_token=round(seconds * 1e3 / 60, 3),
        thinker_tokens_head=tokens[:6].tolist())
    return replay


def section_experiments(model, cfg, args, dev: Device, budget: Budget) -> None:
    """A kernel profile of a speech frame (and of Code2Wav pushes with --profile-code2wav), then one-row products
    through cuBLAS against `triton_gemv` (whichever is not the default) in the speech frame and thinker step,
    compiled and eager (inside CUDA graphs). Restores the default compilation at the end."""
    replay = frame_and_decode(model, cfg, dev, "default compile_decoding()")
    kernel_profile(replay, dev, 10, "speech frame (graph replay)")
    if args.profile_code2wav:
        profile_code2wav(model, dev)
    # (measured on an H200 in session 8, run 1 and 2: the one-query form on CUDA made the compiled frame slower,
    # 9.28 against 7.84 ms, as did the one-row pass (8.49 against 8.07) and cuBLASLt (9.06 against 8.07))
    from qwen3omni.modules import few_rows

    default = few_rows.CUDA_GEMV
    eager_logits = decode_step_logits(model.thinker, random_ids(40, 11, dev.device))
    try:
        few_rows.CUDA_GEMV = not default
        label = "triton gemv" if few_rows.CUDA_GEMV else "cuBLAS one-row products"
        torch._dynamo.reset()
        t = time.perf_counter()
        model.compile_decoding()
        other_logits = decode_step_logits(model.thinker, random_ids(40, 11, dev.device))
        with torch.no_grad():
            model.generate(input_ids=chat_prompt(cfg, 4, 9, dev.device), max_new_tokens=3, do_sample=False,
                           talker_do_sample=False, talker_max_new_tokens=3)
        scale = eager_logits.abs().max()
        say("experiment", variant=label, compile_seconds=round(time.perf_counter() - t, 1),
            logits_max_rel_diff_to_default=round(float((other_logits - eager_logits).abs().max() / scale), 5),
            same_argmax=bool(other_logits.argmax() == eager_logits.argmax()))
        frame_replay = frame_and_decode(model, cfg, dev, f"compile_decoding(), {label}")
        kernel_profile(frame_replay, dev, 10, f"speech frame (graph replay), compiled, {label}")
        model.compile_decoding(False)
        frame_and_decode(model, cfg, dev, f"eager layers, {label}")
        few_rows.CUDA_GEMV = default
        frame_and_decode(model, cfg, dev, "eager layers (default)")
    except Exception as e:  # noqa: BLE001
        say("experiment", variant="one-row products", error=f"{type(e).__name__}: {str(e)[:600]}")
    finally:
        few_rows.CUDA_GEMV = default
        torch._dynamo.reset()
        model.compile_decoding()


def profile_code2wav(model, dev: Device) -> None:
    """Kernel profiles of Code2Wav's 8-frame pushes, eager and replayed from CUDA graphs."""
    from qwen3omni.generation.graphs import GraphedStreamingDecoder

    codes = torch.randint(0, model.config.code2wav.codebook_size, (1, model.config.code2wav.num_quantizers, 96),
                          generator=torch.Generator().manual_seed(2)).to(dev.device)
    with torch.no_grad():
        for graphed in (False, True):
            dec = GraphedStreamingDecoder(model.code2wav) if graphed else model.code2wav.streaming_decoder()
            dec.push(codes[..., :8])
            position = [8]

            def push(d=dec, p=position):
                d.push(codes[..., p[0] : p[0] + 8])
                p[0] = 8 + (p[0] % 80)

            kernel_profile(push, dev, 4, f"code2wav 8-frame push ({'cuda graphs' if graphed else 'eager'})")


# ---- 2. prefill ----------------------------------------------------------------------------------------------------
def section_prefill(model, args, dev: Device) -> None:
    thinker = model.thinker
    n = args.prefill_tokens

    def run():
        cache = thinker.model.new_cache(1, n + 1)
        with torch.no_grad():
            thinker(input_ids=ids, cache=cache, logits_to_keep=1)

    ids = random_ids(n, 2, dev.device)
    run()
    times = [dev.clock(run) for _ in range(3)]
    SUMMARY[f"prefill_{n}_tokens_s"] = round(statistics.median(times), 4)
    say("prefill", tokens=n, seconds_median=round(statistics.median(times), 4), seconds_min=round(min(times), 4),
        tokens_per_s=round(n / statistics.median(times), 1))


# ---- 3 and 4. speech -------------------------------------------------------------------------------------------------
def section_first_audio_stream(model, cfg, args, dev: Device) -> None:
    """`Qwen3Omni.stream` end to end, twice per mode (cold, then warm): greedy speech, then the library's
    default speech sampling (talker temperature 0.9, top-k 50, repetition penalty 1.05; the code predictor
    samples too), seeded."""
    from qwen3omni.model.omni import Qwen3Omni

    if not hasattr(Qwen3Omni, "stream"):
        say("first audio", stream="Qwen3Omni.stream not present; see the stage-by-stage timing")
        return
    prompt = chat_prompt(cfg, 12, 3, dev.device)
    for mode in ("greedy", "sampled"):
        kwargs = dict(max_new_tokens=args.stream_tokens, do_sample=False, talker_max_new_tokens=args.stream_frames)
        if mode == "greedy":
            kwargs["talker_do_sample"] = False
        for attempt in ("cold", "warm"):
            if mode == "sampled":
                kwargs["generator"] = torch.Generator(dev.device).manual_seed(0)
            dev.sync()
            start = time.perf_counter()
            first_audio, samples, text = None, 0, 0
            with torch.no_grad():
                for event in model.stream(input_ids=prompt, **kwargs):
                    if event.kind == "audio" and first_audio is None:
                        first_audio = time.perf_counter() - start
                    if event.kind == "audio":
                        samples += event.data.numel()
                    else:
                        text += event.data.numel()
            total = time.perf_counter() - start
            audio_s = samples / 24000
            rtf = round((total - (first_audio or 0)) / audio_s, 3) if audio_s else None
            suffix = "" if mode == "greedy" else "_sampled"
            if attempt == "warm" and first_audio is not None:
                record("first_audio_ms_stream" + suffix, round(first_audio * 1e3, 1))
                record("stream_real_time_factor" + suffix, rtf)
            first_ms = None if first_audio is None else round(first_audio * 1e3, 1)
            say("first audio", via=f"Qwen3Omni.stream (cuda graphs), {mode} speech", run=attempt,
                prompt_tokens=prompt.shape[1], first_audio_ms=first_ms, text_tokens=text,
                audio_seconds=round(audio_s, 2), total_seconds=round(total, 3), real_time_factor=rtf)


class SpeechLoop:
    """Talker + code predictor frames whose per-frame step touches only device buffers, plus Code2Wav streaming.

    The talker prompt is random (its construction from the thinker's states is generation's job and costs a
    few small matrix products); everything after it is what every frame of real speech runs."""

    def __init__(self, model, dev: Device, prompt_len: int, frames: int, seed: int = 4):
        from qwen3omni.model.talker import rope_deltas

        self.model, self.dev = model, dev
        talker = model.talker
        C = talker.config.text.hidden_size
        dtype = talker.codec_head.weight.dtype
        g = torch.Generator().manual_seed(seed)
        self.prompt = (torch.randn(1, prompt_len, C, generator=g) * 0.5).to(dev.device, dtype)
        self.cache = talker.model.new_cache(1, prompt_len + frames + 8)
        self.cp_cache = talker.code_predictor.new_cache(1)
        self.cp_cache.set_static(True)  # as generation's predictor runner (and what a compiled step needs)
        self.pad = torch.zeros(1, C, dtype=dtype, device=dev.device)
        self.deltas = rope_deltas(torch.arange(prompt_len, device=dev.device).expand(3, 1, prompt_len))
        self.hidden = torch.zeros(1, C, dtype=dtype, device=dev.device)
        self.code0 = torch.zeros(1, dtype=torch.long, device=dev.device)
        self.codes = torch.zeros(1, talker.config.num_code_groups, dtype=torch.long, device=dev.device)
        self.pos = torch.zeros(3, 1, 1, dtype=torch.long, device=dev.device)
        self.decoder = model.code2wav.streaming_decoder()
        self.suppress = talker.config.text.vocab_size - 1024  # control ids: never emitted as audio codes

    @torch.no_grad()
    def prefill(self):
        out = self.model.talker(self.prompt, cache=self.cache, logits_to_keep=1)
        self.cache.set_static(True)
        self.hidden.copy_(out.last_hidden_state[:, -1])
        self.code0.copy_(out.logits[:, -1, : self.suppress].argmax(-1))
        self.pos.copy_((self.cache.length + self.deltas).view(1, 1, 1).expand(3, 1, 1))

    @torch.no_grad()
    def predict(self):
        """Codes 1..15 of the current frame (code predictor, 15 steps)."""
        frame = self.model.talker.predict_residual(self.hidden, self.code0, cache=self.cp_cache,
                                                     check_ids=False)  # captured in a CUDA graph: no sync
        self.codes[:, 0] = self.code0
        self.codes[:, 1:] = frame.codes
        return frame

    @torch.no_grad()
    def frame(self):
        """One whole frame: code predictor, then the talker step that yields the next frame's code 0."""
        frame = self.predict()
        embed = (frame.next_talker_embed + self.pad)[:, None]
        out = self.model.talker(embed, self.pos, cache=self.cache, logits_to_keep=1)
        self.hidden.copy_(out.last_hidden_state[:, -1])
        self.code0.copy_(out.logits[:, -1, : self.suppress].argmax(-1))
        self.pos += 1  # (the talker's forward advanced its cache)

    def vocode(self) -> torch.Tensor:
        return self.decoder.push(self.codes[:, :, None].clamp(0, self.model.config.code2wav.codebook_size - 1))


def section_first_audio_stages(model, args, dev: Device) -> None:
    """Request -> first audio, stage by stage, with the decode steps as a plain eager loop would run them."""
    thinker = model.thinker
    prompt = random_ids(24, 5, dev.device)
    stages = {}
    with torch.no_grad():
        for attempt in range(2):
            cache = thinker.model.new_cache(1, prompt.shape[1] + 4)
            loop = SpeechLoop(model, dev, prompt_len=prompt.shape[1] + 9, frames=4)
            dev.sync()
            t0 = time.perf_counter()
            out = thinker(input_ids=prompt, cache=cache, logits_to_keep=1, output_hidden_states=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            thinker(input_ids=token, position_ids=out.position_ids[..., -1:] + 1, cache=cache, logits_to_keep=1)
            dev.sync()
            t1 = time.perf_counter()
            loop.prefill()
            dev.sync()
            t2 = time.perf_counter()
            loop.predict()
            dev.sync()
            t3 = time.perf_counter()
            wav = loop.vocode()
            dev.sync()
            t4 = time.perf_counter()
            stages = {"thinker_prefill_and_first_token_ms": (t1 - t0) * 1e3, "talker_prefill_ms": (t2 - t1) * 1e3,
                      "code_predictor_ms": (t3 - t2) * 1e3, "code2wav_first_frame_ms": (t4 - t3) * 1e3}
            if attempt == 1:
                SUMMARY["first_audio_stages_ms"] = stages
                SUMMARY["first_audio_ms_stages_eager"] = round((t4 - t0) * 1e3, 1)
                say("first audio", via="stages (eager)", prompt_tokens=prompt.shape[1], first_samples=wav.shape[-1],
                    first_audio_ms=round((t4 - t0) * 1e3, 1), **{k: round(v, 1) for k, v in stages.items()})


def section_rtf(model, args, dev: Device, budget: Budget) -> None:
    frames = args.speech_frames
    loop = SpeechLoop(model, dev, prompt_len=40, frames=frames + 16)
    loop.prefill()
    # eager frames first (also warms up Code2Wav's streaming state)
    n_eager = max(2, min(8, frames // 4))
    eager = [dev.clock(lambda: (loop.frame(), loop.vocode())) for _ in range(n_eager)]
    say("speech", mode="eager", ms_per_frame=round(statistics.median(eager) * 1e3, 1),
        real_time_factor=round(statistics.median(eager) / 0.08, 3), frames=n_eager)
    say("speech", host_syncs_in_frame_step=check_no_sync(loop.frame, dev))
    length = loop.cache.length
    replay = Replay(loop.frame, dev, name="speech frame")
    if replay.graph is not None:
        loop.cache.advance(-1, on_device=False)
        assert loop.cache.length == length + 2
    frame_times, codes = [], []
    start = time.perf_counter()
    for _ in range(frames):
        if time.perf_counter() - start > args.section_seconds:
            break
        frame_times.append(dev.clock(replay))
        if replay.graph is not None:
            loop.cache.advance(1, on_device=False)
        codes.append(loop.codes.clone())
    frame_ms = statistics.median(frame_times[1:] or frame_times) * 1e3
    say("speech", mode=f"talker step + code predictor, {replay.note}", frames=len(frame_times),
        ms_per_frame=round(frame_ms, 2))
    # Code2Wav's incremental decoder, eager, pushed 1, 2, 4 or 8 frames at a time (after a warm stream, so its
    # attention window and conv histories are full): per-push overhead is fixed, so bigger pushes amortise it,
    # at the price of that many frames of extra latency after the first push.
    stream = torch.stack(codes, dim=-1).clamp(0, model.config.code2wav.codebook_size - 1)  # [1, 16, F]
    rtf = {}
    for graphed in (False, True):
        for chunk in (1, 2, 4, 8):
            timed = code2wav_pushes(model, stream, chunk, dev, graphed)
            if timed is None:
                break
            per_frame, diff = timed
            key = f"{chunk}_graphs" if graphed else chunk
            rtf[key] = round((frame_ms + per_frame) / 80.0, 4)
            say("speech", code2wav_push_frames=chunk, code2wav_pushes="cuda graphs" if graphed else "eager",
                code2wav_ms_per_frame=round(per_frame, 2), real_time_factor=rtf[key],
                max_abs_diff_to_eager=diff, note="(talker+predictor per frame + code2wav per frame) / 80 ms")
    record("speech_real_time_factor", rtf)
    record("speech_frame_ms", {"talker_and_predictor": frame_ms, "mode": replay.note})


def code2wav_pushes(model, stream: torch.Tensor, chunk: int, dev: Device, graphed: bool):
    """Code2Wav's incremental decoder pushed `chunk` frames at a time after a warm-up push (the state is of fixed
    size, so a push costs the same however full the window is): (median ms per frame, max |samples - eager
    samples|) or None if the stream is too short.
    `graphed`: through `GraphedStreamingDecoder` (what `stream` uses on CUDA), whose second push of a size
    captures it; the timed pushes are the replays after that."""
    from qwen3omni.generation.graphs import GraphedStreamingDecoder

    warm = min(72, stream.shape[-1] - 8 * chunk)
    if warm < 1:
        return None
    plain = model.code2wav.streaming_decoder()
    decoder = GraphedStreamingDecoder(model.code2wav) if graphed else plain
    starts = list(range(warm, stream.shape[-1] - chunk + 1, chunk))[:14]
    with torch.no_grad():
        decoder.push(stream[..., :warm])
        times, out = [], []
        for t in starts:
            times.append(dev.clock(lambda t=t: out.append(decoder.push(stream[..., t : t + chunk]))))
        diff = None
        if graphed:
            plain.push(stream[..., :warm])
            want = torch.cat([plain.push(stream[..., t : t + chunk]) for t in starts], -1)
            diff = float((torch.cat(out, -1).float() - want.float()).abs().max())
    times = times[2:] if graphed else times  # graphed: the first push of the size runs eagerly, the second captures
    return statistics.median(times) * 1e3 / chunk, diff


# ---- 6. the reference ------------------------------------------------------------------------------------------------
def section_reference(args, dev: Device, dtype, budget: Budget) -> None:
    """The transformers thinker and ours on the same weights (shared tensors), same GPU, greedy decode.

    If this transformers version names its tensors differently (so they cannot be shared), ours gets its own
    random weights of the same shapes, and both must then fit: fewer layers, said in the output."""
    from qwen3omni.model.thinker import Thinker

    ref_cls = "Qwen3OmniMoeThinkerForConditionalGeneration"
    layers = args.ref_layers or (2 if args.dry_run else 48)
    make_cfg = (lambda n: load_config(args)) if args.dry_run else (lambda n: U.bench_config(thinker_layers=n))
    cfg = make_cfg(layers)
    differ = U.names_match(Thinker, U.ours_config(cfg).thinker, ref_cls, U.reference_config(cfg).thinker_config)
    copies = 2 if differ else 1
    if differ:
        say("reference", shared_weights=False, names_that_differ=differ[:6])
    if dev.cuda:
        free, _ = torch.cuda.mem_get_info(dev.device)
        per_layer = (128 * 3 * 768 * 2048 * 2 + 40e6) * copies  # experts + attention, bf16
        fits = int((free * 0.9 - 1.5e9 * copies) // per_layer)
        if fits < layers:
            layers = max(1, fits)
            cfg = make_cfg(layers)
    rc = U.reference_config(cfg)
    say("reference", building=f"transformers thinker, real widths, {layers} layers, {dtype}",
        shared_weights=not differ)
    ref = U.build_reference(ref_cls, rc.thinker_config, 0, "thinker.", dtype=dtype, device=dev.device)
    if differ:
        with torch.device("meta"):
            ours = Thinker(U.ours_config(cfg).thinker)
        from qwen3omni.checkpoint import materialize

        materialize(ours, dev.device, dtype)
        U.randomize_(ours, 0, "thinker.")
        ours.eval()
    else:
        ours = U.twin(Thinker, U.ours_config(cfg).thinker, ref)
    from qwen3omni.modules import attention

    attention.set_attention_backend(ours, "flash" if attention.flash_attn_func is not None else "sdpa")
    say("reference", built=True, peak_gb=dev.peak_gb())
    prompt = random_ids(32 if not args.dry_run else 8, 6, dev.device)
    n = args.ref_tokens

    def ref_generate(tokens):
        return ref.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                            min_new_tokens=tokens, do_sample=False, pad_token_id=0)

    with torch.no_grad():
        ref_generate(2)
        one = min(dev.clock(lambda: ref_generate(1)) for _ in range(2))
        out = {}
        many = dev.clock(lambda: out.setdefault("seq", ref_generate(n + 1)))
    ref_step = (many - one) / n
    ref_tokens = out["seq"][0, prompt.shape[1]:]
    say("reference", mode="transformers generate (eager)", layers=layers, experts=experts_impl(ref),
        attention=str(ref.config._attn_implementation), tokens_per_s=round(1 / ref_step, 2),
        ms_per_token=round(ref_step * 1e3, 2))
    eager_step, eager_tokens = eager_decode_seconds(ours, prompt, n, dev)
    same = "same weights" if not differ else "own random weights"
    say("reference", mode=f"ours eager, {same}", layers=layers, tokens_per_s=round(1 / eager_step, 2),
        ratio=round(ref_step / eager_step, 2), first_tokens_equal_to_reference=_agreement(eager_tokens, ref_tokens))
    if budget.left() < 30:
        return
    dec = GraphDecoder(ours, prompt, n + 8, dev)
    replay = dec.capture()
    seconds, _ = dec.run(replay, n - 2)
    step = seconds / (n - 2)
    SUMMARY["reference_ratio_graph"] = round(ref_step / step, 2)
    SUMMARY["reference_layers"] = layers
    say("reference", mode=f"ours {replay.note}, {same}", layers=layers, tokens_per_s=round(1 / step, 2),
        ratio=round(ref_step / step, 2))


def experts_impl(ref) -> str:
    return U.experts_implementation(ref)


# ---- main --------------------------------------------------------------------------------------------------------
def environment(dev: Device, dtype) -> None:
    from qwen3omni.modules import attention, few_rows, moe, triton_gemv

    info = {"torch": torch.__version__, "device": str(dev.device), "dtype": str(dtype),
            "flash_attn": attention.flash_attn_func is not None, "grouped_mm": hasattr(torch, "_grouped_mm"),
            "one_row_products": "triton gemv" if few_rows.CUDA_GEMV and triton_gemv.available else "cuBLAS"}
    if dev.cuda:
        props = torch.cuda.get_device_properties(dev.device)
        info.update(gpu=props.name, memory_gb=round(props.total_memory / 1e9, 1),
                    capability=".".join(map(str, torch.cuda.get_device_capability(dev.device))),
                    moe_dispatch_bf16="grouped_mm" if moe.grouped_mm_usable(
                        torch.zeros(1, device=dev.device), torch.zeros(1, dtype=torch.bfloat16)) else "gathered")
    for package in ("transformers", "triton"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    say("environment", **info)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny config: check that every section runs")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run")
    ap.add_argument("--layers", type=int, default=None, help="thinker layers (default: the config's, 48)")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=2000)
    ap.add_argument("--speech-frames", type=int, default=100)
    ap.add_argument("--stream-tokens", type=int, default=24)
    ap.add_argument("--stream-frames", type=int, default=40)
    ap.add_argument("--section-seconds", type=float, default=60.0, help="cap on a timing loop")
    ap.add_argument("--ref-layers", type=int, default=None, help="reference thinker layers (default 48, or fewer "
                    "when they do not fit next to nothing else)")
    ap.add_argument("--ref-tokens", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="then the decode and speech sections again after "
                    "model.compile_decoding() (torch.compile'd layer steps inside the CUDA graphs)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--compiled-only", action="store_true", help="with --compile: skip the first pass's sections")
    ap.add_argument("--profile-stream", action="store_true", help="in the compiled pass, profile one stream call")
    ap.add_argument("--profile-code2wav", action="store_true", help="with --experiments: Code2Wav push profiles")
    ap.add_argument("--experiments", action="store_true", help="in the compiled pass: kernel profiles of a speech "
                    "frame and of Code2Wav pushes, and compile variants side by side")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.decode_tokens, args.prefill_tokens, args.speech_frames = 12, 64, 6
        args.stream_tokens, args.stream_frames, args.ref_tokens = 4, 4, 6
        torch.set_num_threads(2)
    elif not torch.cuda.is_available():
        ap.error("no CUDA device: run with --dry-run on CPU")
    dev = Device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    budget = Budget(args.budget)
    environment(dev, dtype)
    cfg = load_config(args)

    model = None
    with budget.section("build", 30) as ok:
        if ok:
            t = time.perf_counter()
            model = build_ours(cfg, dev, dtype, seed=0)
            dev.sync()
            backend = use_fast_attention(model)
            params = sum(p.numel() for p in model.parameters())
            say("build", seconds=round(time.perf_counter() - t, 1), parameters_billion=round(params / 1e9, 3),
                attention=backend, thinker_layers=cfg["thinker_config"]["text_config"]["num_hidden_layers"],
                peak_gb=dev.peak_gb())
    first_pass = not (args.compile and args.compiled_only)
    if model is not None and first_pass:
        with budget.section("thinker decode", 60) as ok:
            if ok:
                section_decode(model, args, dev, budget)
        with budget.section("prefill", 20) as ok:
            if ok:
                section_prefill(model, args, dev)
        with budget.section("first audio (stages)", 20) as ok:
            if ok:
                section_first_audio_stages(model, args, dev)
        with budget.section("speech real-time factor", 40) as ok:
            if ok:
                section_rtf(model, args, dev, budget)
        with budget.section("first audio (stream)", 40) as ok:
            if ok:
                section_first_audio_stream(model, cfg, args, dev)
    if model is not None:
        if args.compile:
            with budget.section("compiled pass", 150 if not args.skip_reference else 60) as ok:
                if ok:
                    section_compiled_pass(model, cfg, args, dev, budget)
        SUMMARY["peak_gpu_memory_gb"] = dev.peak_gb()
        say("memory", peak_gb=dev.peak_gb(), note="torch.cuda.max_memory_allocated over all of the above")
        del model
        gc.collect()
        if dev.cuda:
            torch.cuda.empty_cache()
    if not args.skip_reference:
        with budget.section("reference", 90) as ok:
            if ok:
                section_reference(args, dev, dtype, budget)
    summarize()
    say("done", seconds=round(time.perf_counter() - budget.start, 1))


def summarize() -> None:
    """The headline figures next to issue 10's targets, plus the time to first audio with the decode steps
    replayed from their CUDA graphs (prefills eager, as a server that captured its graphs at start-up runs)."""
    s = SUMMARY
    stages, frame = s.get("first_audio_stages_ms"), s.get("speech_frame_ms")
    if stages and frame and "thinker_step_ms" in s and "graph" in frame["mode"]:
        eager_step = stages["thinker_prefill_and_first_token_ms"]
        s["first_audio_ms_with_graphs_estimate"] = round(
            eager_step + s["thinker_step_ms"] - s.get("eager_thinker_step_ms", 0.0) + stages["talker_prefill_ms"]
            + frame["talker_and_predictor"] + stages["code2wav_first_frame_ms"], 1)
    targets = {"thinker_decode_tokens_per_s": ">= 150", "first_audio_ms": "<= 234", "speech_real_time_factor":
               "<= 0.1"}
    say("summary", targets=targets, **{k: v for k, v in s.items() if k not in ("first_audio_stages_ms",)})


if __name__ == "__main__":
    main()
