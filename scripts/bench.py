"""Side-by-side benchmark: qwen3omni vs the transformers reference, same process, same weights, same inputs.

    python scripts/bench.py                  # every workload at the sizes of issue 10 (CPU fp32, 2 threads)
    python scripts/bench.py -w A B --repeats 7
    python scripts/bench.py --quick          # small sizes: a smoke test that runs in about a minute
    python scripts/bench.py -w A B C D --dtype bfloat16       # both sides in bf16
    python scripts/bench.py -w A B C D --ours-dtype bfloat16  # ours in bf16, the reference in fp32

Each workload prints one JSON line: `ours` and `reference` timings (median, min, max over the repeats, after
warm-up), `ratio` = reference median / ours median (> 1: we are faster), and the check that both sides computed
the same thing (`max_rel_err`, `same_tokens`, `same_codes`, `max_abs_err`). Weights are random, built once per
workload: the reference at the requested size, ours sharing its tensors (see _bench_util.twin).

  A  thinker prefill of 512 tokens at real widths, 2 layers (we compute logits for the last position only; the
     reference's forward, which has no logits_to_keep, for all of them; `ratio_vs_that` compares with its
     decoder plus its LM head on the last position, i.e. the decoders alone)
  B  thinker greedy decode of 64 tokens after a 128-token prompt, same config, plus the decode roofline: bytes
     one step must read / the matrix-vector bandwidth measured here (best of 7 passes over a 1.5 GB matrix;
     the fraction against the median pass is printed too); then again with our opt-in compiled decode step
     (`compile_decoding`: torch.compile'd layers over a static cache), against the same roofline
  C  thinker decode at 48 layers with small widths (hidden 256, 128 experts x 64, top-8, 4/2 heads); then again
     with our compiled decode step, and with it built ahead of time (`compile_decoding(ahead_of_time=True)`)
  D  one speech frame: the 15-step code predictor (5 layers, hidden 1024) + a talker step (2 layers, real
     widths); then again with our compiled decode steps, torch.compile'd and built ahead of time. On an AVX-512
     CPU our predictor runs each step natively (`ours_predictor_step`); the line also times its torch path
  E  Code2Wav at the real config: 100 frames offline; per-frame cost of the streaming decoder vs re-decoding
     25 frames of left context for each new frame (what a chunked streamer without state must do)
  F  peak resident memory while loading a multi-GB synthetic sharded checkpoint (bf16, 3.7 GB), ours vs the
     reference, each in a fresh process, relative to the checkpoint's size (with --quick the checkpoint is
     ~0.2 GB and the fixed cost of a first load in a process, ~0.2 GB, dominates: not a meaningful ratio)

Dtypes: A-E run both sides in float32 unless `--dtype` says otherwise; `--ours-dtype` runs ours in another
dtype than the reference (ours then holds its own cast copy of the weights), which is how a CPU user choosing
`dtype=torch.bfloat16` in our loader compares with transformers at its float32 default. Lines of such runs
carry `dtype` and `ours_dtype`. E (Code2Wav) follows them too; F loads bf16 whatever they say.

Noise: the ratios come from interleaved runs of the two sides, so background load hits both; but a machine
whose cores are shared with other jobs can stall multi-threaded (OpenMP) runs for whole scheduler slices, so
run it on an otherwise idle machine, or with --threads 1.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_util as U  # noqa: E402

# ---- sizes -------------------------------------------------------------------------------------------------------
SMALL_TEXT = {  # workload C's widths (issue 10), also the --quick widths of A/B
    "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "moe_intermediate_size": 64, "num_experts": 128, "num_experts_per_tok": 8,
    "rope_parameters": {"mrope_section": [12, 10, 10], "rope_theta": 1000000, "interleaved": True,
                        "rope_type": "default"},
}
QUICK_TALKER = {
    "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 128, "intermediate_size": 512,
    "rope_parameters": {"mrope_section": [12, 10, 10], "rope_theta": 1000000, "interleaved": True,
                        "rope_type": "default"},
}
QUICK_PREDICTOR = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 64}
QUICK_CODE2WAV = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 4,
                  "decoder_dim": 192, "num_hidden_layers": 2}


def sizes(quick: bool) -> dict:
    if quick:
        return {"A_tokens": 128, "B_prompt": 32, "B_new": 16, "C_layers": 8, "C_prompt": 16, "C_new": 16,
                "D_prompt": 16, "E_frames": 24, "E_context": 25, "F_layers": 1, "vocab": 8192}
    return {"A_tokens": 512, "B_prompt": 128, "B_new": 64, "C_layers": 48, "C_prompt": 32, "C_new": 64,
            "D_prompt": 32, "E_frames": 100, "E_context": 25, "F_layers": 2, "vocab": None}


def text_overrides(quick: bool, extra: dict | None = None) -> dict:
    out = dict(SMALL_TEXT) if quick else {}
    out.update(extra or {})
    return out


def with_vocab(text: dict, vocab: int | None) -> dict:
    return {**text, "vocab_size": vocab} if vocab else text


# ---- the thinker -------------------------------------------------------------------------------------------------
def component_pair(part: str, cfg: dict, seed: int, experts_impl: str | None, dtype=torch.float32, ours_dtype=None):
    """The reference's `part` ("thinker" or "talker") on random weights in `dtype`, and ours sharing its tensors
    (or, with another `ours_dtype`, holding copies of them cast to it)."""
    from qwen3omni.model.talker import Talker
    from qwen3omni.model.thinker import Thinker

    rc = U.reference_config(cfg)
    ref_cfg = getattr(rc, f"{part}_config")
    if experts_impl:
        ref_cfg.text_config._experts_implementation = experts_impl
    ref = U.build_reference(f"Qwen3OmniMoe{part.title()}ForConditionalGeneration", ref_cfg, seed, f"{part}.", dtype)
    ours_cls = {"thinker": Thinker, "talker": Talker}[part]
    return U.twin(ours_cls, getattr(U.ours_config(cfg), part), ref, ours_dtype), ref


def random_ids(batch: int, length: int, seed: int, vocab: int = 150000) -> torch.Tensor:
    return torch.randint(0, min(vocab, 150000), (batch, length), generator=torch.Generator().manual_seed(seed))


def experts_impl_of(ref) -> str:
    return U.experts_implementation(ref)


def our_prefill_dispatch(model, tokens: int) -> str:
    """The MoE strategy our experts pick for a prefill of `tokens` (so a silent fallback shows in the line)."""
    from qwen3omni.modules.moe import Experts, Routing

    experts = next(m for m in model.modules() if isinstance(m, Experts))
    E, _, H = experts.gate_up_proj.shape
    x = torch.zeros(tokens, H, dtype=experts.gate_up_proj.dtype)
    choice = torch.zeros(tokens, 1, dtype=torch.long)
    return experts.strategy(x, Routing(torch.zeros(tokens, E), torch.ones(tokens, 1, dtype=x.dtype), choice))


@torch.no_grad()
def workload_a(args, sz):
    cfg = U.bench_config(thinker_layers=2, thinker_text=with_vocab(text_overrides(args.quick), sz["vocab"]))
    ours, ref = component_pair("thinker", cfg, args.seed, args.reference_experts, args.dtype, args.ours_dtype)
    ids = random_ids(1, sz["A_tokens"], args.seed, cfg["thinker_config"]["text_config"]["vocab_size"])
    mine = ours(input_ids=ids, logits_to_keep=1).logits[:, -1]
    theirs = ref(input_ids=ids).logits[:, -1]
    err = float((mine - theirs).abs().max() / theirs.abs().max())
    t_ours, t_ref = U.compare(lambda: ours(input_ids=ids, logits_to_keep=1), lambda: ref(input_ids=ids),
                              args.warmup, args.repeats)
    # The reference's thinker forward has no logits_to_keep (it always projects every position; its generate
    # does too). What it would take with one: its decoder, then its LM head on the last position.
    t_ref_last = [U.timed(lambda: reference_last_only(ref, ids)) for _ in range(max(3, args.repeats // 2))]
    import statistics

    U.report(
        "A thinker prefill", "s", t_ours, t_ref, tokens=ids.shape[1], layers=2, max_rel_err=err,
        reference_decoder_plus_last_logits_median=round(statistics.median(t_ref_last), 6),
        ratio_vs_that=round(statistics.median(t_ref_last) / statistics.median(t_ours), 3),
        reference_experts=experts_impl_of(ref), ours_experts=our_prefill_dispatch(ours, ids.shape[1]),
    )


def reference_last_only(ref, ids):
    hidden = ref.model(input_ids=ids).last_hidden_state
    return ref.lm_head(hidden[:, -1:])


class StepClock:
    """Timestamps of each generated token; a transformers streamer (`put`/`end`) and our `on_token` callback."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value):  # transformers calls put(prompt) first, then put(new token) per step
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def __call__(self, token):
        self.times.append(time.perf_counter())

    def per_step(self) -> float:
        """Mean time of one decode step: first token (prefill) excluded."""
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


def decode_pair(ours, ref, ids, new_tokens: int):
    """Greedy generation through both; returns (clock, tokens) per side, with no EOS so all steps run."""
    from qwen3omni.generation.text import generate_text

    def run_ours():
        clock = StepClock()
        out = generate_text(ours, ids, max_new_tokens=new_tokens, on_token=clock)
        return clock, out.new_tokens

    def run_ref():
        clock = StepClock()
        out = ref.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=0,
        )
        return clock, out[:, ids.shape[1]:]

    return run_ours, run_ref


def decode_bench(args, ours, ref, ids, new_tokens: int):
    run_ours, run_ref = decode_pair(ours, ref, ids, new_tokens)
    with torch.no_grad():
        for _ in range(args.warmup):
            run_ours()
            run_ref()
        steps_ours, steps_ref, same = [], [], True
        for _ in range(args.repeats):
            clock, mine = run_ours()
            steps_ours.append(clock.per_step())
            clock, theirs = run_ref()
            steps_ref.append(clock.per_step())
            same = same and torch.equal(mine, theirs)
    return steps_ours, steps_ref, same


def decode_bytes(model, cfg_text: dict, context: int) -> int:
    """Bytes a batch-1 decode step must read: every dense weight, the chosen experts, the LM head, the cache."""
    total = 0
    for name, p in model.named_parameters():
        if name.startswith(("audio_tower.", "visual.")) or name.endswith("embed_tokens.weight"):
            continue
        if "experts." in name:
            total += p[0].numel() * p.element_size() * cfg_text["num_experts_per_tok"]
        else:
            total += p.numel() * p.element_size()
    kv = 2 * cfg_text["num_hidden_layers"] * cfg_text["num_key_value_heads"] * cfg_text["head_dim"] * context * 4
    return total + cfg_text["hidden_size"] * 4 + kv


@torch.no_grad()
def workload_b(args, sz):
    cfg = U.bench_config(thinker_layers=2, thinker_text=with_vocab(text_overrides(args.quick), sz["vocab"]))
    text = cfg["thinker_config"]["text_config"]
    ours, ref = component_pair("thinker", cfg, args.seed, args.reference_experts, args.dtype, args.ours_dtype)
    ids = random_ids(1, sz["B_prompt"], args.seed + 1, text["vocab_size"])
    steps_ours, steps_ref, same = decode_bench(args, ours, ref, ids, sz["B_new"])
    roofline = {"bandwidth": U.matvec_bandwidth(), "typical": U.matvec_bandwidth(median=True),
                "step_bytes": decode_bytes(ours, text, sz["B_prompt"] + sz["B_new"] // 2)}
    if args.ours_dtype != torch.float32:
        # A second roofline: the speed ATen's best bf16 matrix-vector kernel reads one large matrix at (on small
        # ones it is slower than float32's kernel per byte, see README).
        roofline["kernel"] = U.matvec_bandwidth(args.ours_dtype)
    report_b("B thinker decode", args, sz, ref, ids, steps_ours, steps_ref, same, roofline)
    if not args.no_compile:
        compiled_line("B", lambda: workload_b_compiled(args, sz, ours, ref, ids, roofline), [ours.model])


def compiled_decode_bench(args, ours, ref, ids, new_tokens: int, ahead_of_time: bool = False):
    """`decode_bench` with our opt-in compiled decode step: a first 2-token generation compiles (its time is
    returned), then both sides are timed, interleaved as in `decode_bench`."""
    ours.model.compile_decode_step(ahead_of_time=ahead_of_time)
    start = time.perf_counter()
    decode_pair(ours, ref, ids, 2)[0]()
    compile_s = time.perf_counter() - start
    return (*decode_bench(args, ours, ref, ids, new_tokens), compile_s)


def workload_b_compiled(args, sz, ours, ref, ids, roofline):
    """B again, with our opt-in compiled decode step, against the same roofline."""
    steps_ours, steps_ref, same, compile_s = compiled_decode_bench(args, ours, ref, ids, sz["B_new"])
    report_b("B thinker decode, ours compiled", args, sz, ref, ids, steps_ours, steps_ref, same, roofline,
             compile_seconds=round(compile_s, 1))


def report_b(workload, args, sz, ref, ids, steps_ours, steps_ref, same, roofline, **extra):
    import statistics

    ours_s = statistics.median(steps_ours)
    step_bytes, bandwidth, typical = roofline["step_bytes"], roofline["bandwidth"], roofline["typical"]
    if "kernel" in roofline:
        extra.update(kernel_bandwidth_GBps=round(roofline["kernel"] / 1e9, 2),
                     fraction_of_kernel_roofline=round(step_bytes / roofline["kernel"] / ours_s, 3))
    U.report(
        workload, "s/token", steps_ours, steps_ref, prompt=ids.shape[1], new_tokens=sz["B_new"],
        same_tokens=same, tokens_per_s=round(1 / ours_s, 2),
        reference_tokens_per_s=round(1 / statistics.median(steps_ref), 2),
        bandwidth_GBps=round(bandwidth / 1e9, 2), bytes_per_step_MB=round(step_bytes / 1e6, 1),
        roofline_tokens_per_s=round(bandwidth / step_bytes, 2),
        fraction_of_roofline=round(step_bytes / bandwidth / ours_s, 3),
        median_bandwidth_GBps=round(typical / 1e9, 2),
        fraction_of_median_bandwidth_roofline=round(step_bytes / typical / ours_s, 3),
        reference_experts=experts_impl_of(ref), **extra,
    )


@torch.no_grad()
def workload_c(args, sz):
    text = with_vocab(dict(SMALL_TEXT), sz["vocab"] if args.quick else args.c_vocab)
    cfg = U.bench_config(thinker_layers=sz["C_layers"], thinker_text=text)
    ours, ref = component_pair("thinker", cfg, args.seed, args.reference_experts, args.dtype, args.ours_dtype)
    vocab = cfg["thinker_config"]["text_config"]["vocab_size"]
    ids = random_ids(1, sz["C_prompt"], args.seed + 2, vocab)
    steps_ours, steps_ref, same = decode_bench(args, ours, ref, ids, sz["C_new"])
    import statistics

    U.report(
        "C thinker decode, 48 small layers", "s/token", steps_ours, steps_ref, layers=sz["C_layers"],
        vocab=vocab, new_tokens=sz["C_new"], same_tokens=same,
        tokens_per_s=round(1 / statistics.median(steps_ours), 2),
        reference_tokens_per_s=round(1 / statistics.median(steps_ref), 2), reference_experts=experts_impl_of(ref),
    )
    if not args.no_compile:
        for aot in (False, True):
            compiled_line("C", lambda aot=aot: workload_c_compiled(args, ours, ref, ids, sz, vocab, aot), [ours.model])


def workload_c_compiled(args, ours, ref, ids, sz, vocab, ahead_of_time=False):
    """C again, with our opt-in compiled decode step (`compile_decoding`, or `compile_decoding(ahead_of_time=
    True)`). The reference is timed again alongside."""
    import statistics

    steps_ours, steps_ref, same, compile_s = compiled_decode_bench(args, ours, ref, ids, sz["C_new"], ahead_of_time)
    U.report(
        "C thinker decode, 48 small layers, ours compiled" + AOT_TAG[ahead_of_time], "s/token", steps_ours, steps_ref,
        layers=sz["C_layers"], vocab=vocab, new_tokens=sz["C_new"], same_tokens=same,
        compile_seconds=round(compile_s, 1), tokens_per_s=round(1 / statistics.median(steps_ours), 2),
        reference_tokens_per_s=round(1 / statistics.median(steps_ref), 2), reference_experts=experts_impl_of(ref),
        **aot_fields([ours.model], ahead_of_time),
    )


AOT_TAG = {False: "", True: " ahead of time"}  # the compiled lines' names


def aot_fields(stacks, ahead_of_time: bool) -> dict:
    """For an ahead-of-time line: whether every step it ran was built (a failed build falls back to the
    torch.compile'd step with a warning, which would make the line measure that instead)."""
    if not ahead_of_time:
        return {}
    runners = [r for stack in stacks for r in getattr(stack.compiled_step, "runners", {}).values()]
    return {"aot_built": bool(runners) and all(r is not None for r in runners)}


def compiled_line(workload: str, run, stacks) -> None:
    """Run a workload's compiled line; if torch.compile cannot build here (no C++ compiler, an inductor error),
    say so and go on with the other workloads. The stacks go back to eager steps either way."""
    try:
        run()
    except Exception as err:  # noqa: BLE001 - any compiler failure; the eager lines above stand
        U.note(f"workload {workload}: the compiled line is skipped, torch.compile failed here: "
               f"{type(err).__name__}: {str(err)[:300]}")
    finally:
        for stack in stacks:
            stack.compile_decode_step(False)


# ---- one speech frame ----------------------------------------------------------------------------------------------
class OurFrames:
    """Our speech loop, one frame per call: code predictor for the last frame, then a talker step."""

    def __init__(self, talker, prompt_embeds):
        from qwen3omni.model.talker import rope_deltas

        self.talker = talker
        T = prompt_embeds.shape[1]
        self.cache = talker.model.new_cache(1, T + 256)
        out = talker(prompt_embeds, cache=self.cache, logits_to_keep=1)
        self.deltas = rope_deltas(torch.arange(T).expand(3, 1, T))
        self.hidden, self.code0 = out.last_hidden_state[:, -1], out.logits[:, -1].argmax(-1)
        self.cp_cache = talker.code_predictor.new_cache(1)
        if talker.model.compiled_step is not None:  # compiled layer steps run over static caches (as generation does)
            self.cache.set_static(True)
            self.cp_cache.set_static(True)
        self.pad = torch.zeros(1, prompt_embeds.shape[-1], dtype=prompt_embeds.dtype)
        self.codes = []

    def step(self):
        from qwen3omni.model.talker import decode_positions

        frame = self.talker.predict_residual(self.hidden, self.code0, cache=self.cp_cache, check_ids=False)
        self.codes.append(torch.cat([self.code0[:, None], frame.codes], 1))
        embed = (frame.next_talker_embed + self.pad)[:, None]
        out = self.talker(embed, decode_positions(self.cache.length, self.deltas), cache=self.cache, logits_to_keep=1)
        self.hidden, self.code0 = out.last_hidden_state[:, -1], out.logits[:, -1].argmax(-1)


class ReferenceFrames:
    """The reference's speech loop, one frame per call, as its talker.generate runs it (nested generate)."""

    def __init__(self, talker, prompt_embeds):
        self.talker = talker
        talker.rope_deltas = None
        out = talker(inputs_embeds=prompt_embeds, use_cache=True, output_hidden_states=True)
        self.cache = out.cache
        self.hidden = out.hidden_states[0][-1][:, -1:]
        self.code0 = out.logits[:, -1:].argmax(-1)
        self.pad = torch.zeros(1, 1, prompt_embeds.shape[-1], dtype=prompt_embeds.dtype)
        self.codes = []

    def step(self):
        t = self.talker
        last_id_hidden = t.get_input_embeddings()(self.code0)
        res = t.code_predictor.generate(
            inputs_embeds=torch.cat((self.hidden, last_id_hidden), dim=1), max_new_tokens=15, do_sample=False,
            output_hidden_states=True, return_dict_in_generate=True,
        )
        self.codes.append(torch.cat([self.code0, res.sequences], 1))
        mid = [h[0] for h in res.hidden_states[1:]]
        last = t.code_predictor.get_input_embeddings()[-1](res.sequences[..., -1:])
        embed = torch.cat([last_id_hidden, *mid, last], dim=1).sum(1, keepdim=True) + self.pad
        out = t(inputs_embeds=embed, cache=self.cache, use_cache=True, output_hidden_states=True, generation_step=0)
        self.cache = out.cache
        self.hidden = out.hidden_states[0][-1][:, -1:]
        self.code0 = out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def workload_d(args, sz):
    talker_text = dict(QUICK_TALKER) if args.quick else {}
    cfg = U.bench_config(thinker_layers=1, thinker_text=text_overrides(args.quick, {"vocab_size": 1024}),
                         talker_layers=2)
    cfg["talker_config"]["text_config"].update(talker_text)
    if args.quick:
        cfg["talker_config"]["code_predictor_config"].update(QUICK_PREDICTOR)
    ours, ref = component_pair("talker", cfg, args.seed, args.reference_experts, args.dtype, args.ours_dtype)
    C = cfg["talker_config"]["text_config"]["hidden_size"]
    prompt = torch.randn(1, sz["D_prompt"], C, generator=torch.Generator().manual_seed(args.seed))
    mine, theirs = OurFrames(ours, prompt.to(args.ours_dtype)), ReferenceFrames(ref, prompt.to(args.dtype))
    t_ours, t_ref = U.compare(mine.step, theirs.step, args.warmup, args.repeats)
    same = all(torch.equal(a, b) for a, b in zip(mine.codes, theirs.codes))
    # The parts of our frame: the 15-step code predictor alone, and the floor under it: its one-row products
    # alone, run back to back on the same weights (what any implementation must stream per frame).
    predict = lambda: ours.predict_residual(mine.hidden, mine.code0, cache=mine.cp_cache, check_ids=False)  # noqa: E731
    cp = [U.timed(predict) for _ in range(args.repeats)]
    ours.code_predictor.cpu_kernel = False  # the same frames on the torch path, for the native step's share
    cp_torch = [U.timed(predict) for _ in range(args.repeats)]
    ours.code_predictor.cpu_kernel = True
    floor, floor_bytes = predictor_products(ours.code_predictor)
    floor_times = [U.timed(floor) for _ in range(args.repeats)]
    import statistics

    floor_s = statistics.median(floor_times)
    U.report("D speech frame (talker step + code predictor)", "s/frame", t_ours, t_ref, same_codes=same,
             ours_code_predictor_median=round(statistics.median(cp), 6),
             ours_predictor_step=predictor_step(ours, mine),
             ours_code_predictor_torch_path_median=round(statistics.median(cp_torch), 6),
             predictor_products_alone_median=round(floor_s, 6),
             predictor_bytes_per_frame_MB=round(floor_bytes / 1e6, 1),
             reference_over_products_alone=round(statistics.median(t_ref) / floor_s, 3), talker_layers=2,
             predictor_layers=cfg["talker_config"]["code_predictor_config"]["num_hidden_layers"],
             reference_experts=U.experts_implementation(ref))
    if not args.no_compile:
        stacks = (ours.model, ours.code_predictor.model)
        for aot in (False, True):
            compiled_line("D", lambda aot=aot: workload_d_compiled(args, ours, ref, prompt, stacks, aot), stacks)


def predictor_step(talker, frames) -> str:
    """How our code predictor ran its steps: "native" (one call per step, `modules.dense_step`) or "torch" (the
    kernel cannot run here, or stepped aside), so a silent fallback shows in the line."""
    return "native" if talker.code_predictor.native_step(frames.cp_cache) is not None else "torch"


def predictor_products(code_predictor):
    """A function running the one-row products of one frame's 15 code-predictor steps (every linear layer of the
    stack per step, then that step's head) on the model's own weights, with nothing between them; and the bytes
    they read."""
    import torch.nn.functional as F

    linears = [m.weight for layer in code_predictor.model.layers for m in layer.modules() if isinstance(m, nn.Linear)]
    heads = [h.weight for h in code_predictor.lm_head]
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in linears + heads}

    def run():
        for head in heads:
            for w in linears:
                F.linear(inputs[w.shape[1]], w)
            F.linear(inputs[head.shape[1]], head)

    size = sum(w.numel() * w.element_size() for w in linears) * len(heads)
    return run, size + sum(h.numel() * h.element_size() for h in heads)


def workload_d_compiled(args, ours, ref, prompt, stacks, ahead_of_time=False):
    """D again, with our opt-in compiled decode steps (talker and code predictor, as `compile_decoding` sets)."""
    for stack in stacks:
        stack.compile_decode_step(ahead_of_time=ahead_of_time)
    mine, theirs = OurFrames(ours, prompt.to(args.ours_dtype)), ReferenceFrames(ref, prompt.to(args.dtype))
    start = time.perf_counter()
    mine.step()
    compile_s = time.perf_counter() - start
    theirs.step()
    t_ours, t_ref = U.compare(mine.step, theirs.step, args.warmup, args.repeats)
    same = all(torch.equal(a, b) for a, b in zip(mine.codes, theirs.codes))
    U.report("D speech frame, ours compiled" + AOT_TAG[ahead_of_time], "s/frame", t_ours, t_ref, same_codes=same,
             compile_seconds=round(compile_s, 1), ours_predictor_step=predictor_step(ours, mine),
             reference_experts=U.experts_implementation(ref), **aot_fields(stacks, ahead_of_time))


# ---- Code2Wav ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def workload_e(args, sz):
    from qwen3omni.generation.pipeline import stream
    from qwen3omni.model.code2wav import Code2Wav

    cfg = U.bench_config(thinker_layers=1)
    if args.quick:
        cfg["code2wav_config"].update(QUICK_CODE2WAV)
    rc = U.reference_config(cfg)
    ref = U.build_reference("Qwen3OmniMoeCode2Wav", rc.code2wav_config, args.seed, "code2wav.", args.dtype)
    ours = U.twin(Code2Wav, U.ours_config(cfg).code2wav, ref, args.ours_dtype)
    q, size = cfg["code2wav_config"]["num_quantizers"], cfg["code2wav_config"]["codebook_size"]
    frames, context = sz["E_frames"], sz["E_context"]
    codes = torch.randint(0, size, (1, q, frames), generator=torch.Generator().manual_seed(args.seed))
    mine, theirs = ours(codes), ref.chunked_decode(codes)
    err = float((mine.float() - theirs[..., : mine.shape[-1]].float()).abs().max())
    t_ours, t_ref = U.compare(lambda: ours(codes), lambda: ref.chunked_decode(codes), args.warmup, args.repeats)
    U.report("E code2wav offline", "s", t_ours, t_ref, frames=frames, max_abs_err=err,
             audio_seconds=frames * 0.08)
    # Streaming: per new frame, our incremental decoder vs re-decoding `context` frames + the new one.
    decoder = ours.streaming_decoder()
    warm = min(frames - args.repeats - args.warmup, 80)
    decoder.push(codes[..., :warm])
    pushes = []
    for t in range(warm, frames):
        pushes.append(U.timed(lambda t=t: decoder.push(codes[..., t : t + 1])))
    pushes = pushes[args.warmup:]
    # What `stream` does once past its first frames: pushes of `audio_chunk_frames` (default 8) frames.
    chunk = inspect.signature(stream).parameters["audio_chunk_frames"].default
    n_chunks = max(1, min(args.repeats, frames // chunk - 1))
    decoder.reset()
    decoder.push(codes[..., : frames - n_chunks * chunk])
    chunked = [U.timed(lambda t=t: decoder.push(codes[..., t : t + chunk])) / chunk
               for t in range(frames - n_chunks * chunk, frames, chunk)]
    window = codes[..., frames - context - 1:]
    redo_ref = [U.timed(lambda: ref(window)) for _ in range(args.repeats)]
    redo_ours = [U.timed(lambda: ours(window)) for _ in range(args.repeats)]
    import statistics

    per_frame = statistics.median(pushes)
    U.report("E code2wav streaming, per 80 ms frame", "s/frame", pushes, redo_ref, context_frames=context,
             ours_redecode_median=round(statistics.median(redo_ours), 6),
             fraction_of_ours_redecode=round(per_frame / statistics.median(redo_ours), 4),
             fraction_of_reference_redecode=round(per_frame / statistics.median(redo_ref), 4),
             real_time_factor=round(per_frame / 0.08, 3))
    per_frame = statistics.median(chunked)
    U.report(f"E code2wav streaming, per frame in {chunk}-frame pushes (stream's default)", "s/frame", chunked,
             redo_ref, context_frames=context, pushes=len(chunked),
             fraction_of_ours_redecode=round(per_frame / statistics.median(redo_ours), 4),
             fraction_of_reference_redecode=round(per_frame / statistics.median(redo_ref), 4),
             real_time_factor=round(per_frame / 0.08, 3))


# ---- loading memory ------------------------------------------------------------------------------------------------
LOAD_OURS = """
import json, sys, time, torch
sys.path.insert(0, {scripts!r})
import _bench_util as U
from qwen3omni.model.omni import Qwen3Omni
base = U.rss_bytes()
t = time.perf_counter()
model = Qwen3Omni.from_pretrained({path!r}, dtype=torch.bfloat16, progress=False)
U.touch(model)
print(json.dumps({{"seconds": time.perf_counter() - t, "peak": U.peak_rss_bytes(), "base": base}}))
"""

LOAD_REFERENCE = """
import json, sys, time, torch, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {scripts!r})
import _bench_util as U
from transformers import Qwen3OmniMoeForConditionalGeneration, logging
logging.set_verbosity_error()
base = U.rss_bytes()
t = time.perf_counter()
model = Qwen3OmniMoeForConditionalGeneration.from_pretrained({path!r}, dtype=torch.bfloat16)
U.touch(model)
print(json.dumps({{"seconds": time.perf_counter() - t, "peak": U.peak_rss_bytes(), "base": base}}))
"""


def write_synthetic_checkpoint(folder: Path, layers: int, quick: bool, seed: int) -> int:
    """A thinker-only checkpoint (real widths, `layers` layers, bf16) written in the released sharded layout."""
    from qwen3omni.checkpoint import materialize
    from qwen3omni.model.omni import Qwen3Omni

    cfg = U.bench_config(thinker_layers=layers, thinker_text=text_overrides(quick))
    cfg["enable_audio_output"] = False
    config = U.ours_config(cfg)
    with torch.device("meta"):
        model = Qwen3Omni(config, {"thinker"})
    materialize(model, "cpu", torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.01, 0.01, generator=g)
    model.save_pretrained(folder, max_shard_size="1GB")
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def load_in_subprocess(template: str, path: Path) -> dict:
    code = template.format(scripts=str(Path(__file__).resolve().parent), path=str(path))
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"loader subprocess failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def workload_f(args, sz):
    tmp = Path(tempfile.mkdtemp(prefix="qwen3omni-bench-", dir=args.tmp))
    try:
        folder = tmp / "ckpt"
        size = write_synthetic_checkpoint(folder, sz["F_layers"], args.quick, args.seed)
        gc.collect()
        runs_ours, runs_ref = [], []
        for _ in range(args.f_repeats):
            runs_ours.append(load_in_subprocess(LOAD_OURS, folder))
            runs_ref.append(load_in_subprocess(LOAD_REFERENCE, folder))
        peak = lambda r: r["peak"] - r["base"]  # noqa: E731 - what loading added on top of the interpreter
        ours_peak = min(peak(r) for r in runs_ours)
        ref_peak = min(peak(r) for r in runs_ref)
        U.report(
            "F checkpoint load", "s", [r["seconds"] for r in runs_ours], [r["seconds"] for r in runs_ref],
            checkpoint_GB=round(size / 1e9, 3), ours_peak_GB=round(ours_peak / 1e9, 3),
            reference_peak_GB=round(ref_peak / 1e9, 3), ours_peak_over_size=round(ours_peak / size, 3),
            reference_peak_over_size=round(ref_peak / size, 3), note="peak = VmHWM - RSS before loading",
        )
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


WORKLOADS = {"A": workload_a, "B": workload_b, "C": workload_c, "D": workload_d, "E": workload_e, "F": workload_f}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-w", "--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--f-repeats", type=int, default=1, help="loads per side for F (each in a fresh process)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--c-vocab", type=int, default=None,
                    help="C's vocabulary (default: the real 152064; the LM head is then ~1/3 of a step)")
    ap.add_argument("--reference-experts", default=None,
                    help="the reference's experts_implementation (default: its own default, grouped_mm)")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the compiled lines of B, C and D (ours with compile_decoding)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and activations of both sides in A-E (F always loads bf16)")
    ap.add_argument("--ours-dtype", default=None, choices=["float32", "bfloat16"],
                    help="ours in another dtype than the reference in A-E (ours then holds a cast copy of the "
                         "weights), e.g. --ours-dtype bfloat16 against the reference in float32")
    ap.add_argument("--tmp", default=None, help="where F writes its synthetic checkpoint (default: $TMPDIR)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    U.set_threads(args.threads)
    args.dtype = getattr(torch, args.dtype)
    args.ours_dtype = getattr(torch, args.ours_dtype) if args.ours_dtype else args.dtype
    U.TAGS.clear()  # (main may run several times in one process: the tests do)
    U.REPORTS.clear()
    if args.dtype != torch.float32 or args.ours_dtype != args.dtype:
        U.TAGS.update(dtype=str(args.dtype), ours_dtype=str(args.ours_dtype))
    import transformers

    sz = sizes(args.quick)
    U.note(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
           f"{'quick' if args.quick else 'full'} sizes")
    for name in args.workloads:
        start = time.perf_counter()
        WORKLOADS[name](args, sz)
        gc.collect()
        U.note(f"workload {name} took {time.perf_counter() - start:.0f} s")
    U.print_table()


if __name__ == "__main__":
    main()
