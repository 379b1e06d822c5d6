"""CUDA graphs for the decode steps: the thinker's and the talker's single-token steps and the code predictor's
15 steps per frame, each captured once and replayed.

At batch 1 a decode step is hundreds of small kernels, and on a GPU launching them costs more than running
them: replaying a captured graph removes that cost. A captured step reads and writes only tensors whose
addresses never change (input buffers, a static KV cache, the outputs it returned at capture). Token choice
(sampling) stays outside the graphs, so every sampling knob and `generator` work unchanged.

On a CPU, or with `cuda_graphs=False`, the same step functions run eagerly: the code path is the one the CPU
tests exercise.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..modules.kv_cache import KVCache
from .sampling import SamplingConfig, choose


def graphs_wanted(device: torch.device, requested: bool | None) -> bool:
    """Graphs on CUDA unless turned off (argument, or QWEN3OMNI_CUDA_GRAPHS=0). Where this says yes, the decode
    loops use `StaticDecoder` and `PredictorRunner`, which capture on CUDA and run eagerly elsewhere."""
    if requested is False or device.type != "cuda":
        return False
    return requested is True or os.environ.get("QWEN3OMNI_CUDA_GRAPHS", "1") != "0"


def static_steps(stack, graphs: bool) -> bool:
    """Whether a decode loop runs its steps over a static cache: for CUDA graphs, or for a stack whose layer
    step is compiled (`DecoderStack.compile_decode_step`, which applies to static-cache steps only)."""
    return graphs or stack.compiled_step is not None


class Captured:
    """`step()` captured into a CUDA graph (after one warm-up run on a side stream), or run eagerly."""

    def __init__(self, step, capture: bool, pool=None, before=None):
        self.step, self.graph = step, None
        if not capture:
            return
        before = before or (lambda: None)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            before()
            step()  # warm-up: lazy initialisations (cuBLAS workspaces, autotuning) must not happen in capture
        torch.cuda.current_stream().wait_stream(side)
        before()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            step()

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()


class StaticDecoder:
    """A decoder's single-token step over a static KV cache: `__call__(inputs, positions)` -> the step's outputs.

    `forward(inputs, positions)` must run the model on the cache and return a tuple of tensors. The step is
    captured on CUDA and run eagerly (same buffers, same static cache) elsewhere. The host-side bookkeeping of
    the cache (its length) is done here: a replay advances only the device-side offset.
    """

    def __init__(self, forward, cache: KVCache, inputs: torch.Tensor, positions: torch.Tensor, capture: bool = True):
        self.cache = cache
        cache.set_static(True)
        self.inputs, self.positions = inputs.clone(), positions.clone()
        self.outputs: tuple[torch.Tensor, ...] = ()

        def step():
            self.outputs = forward(self.inputs, self.positions)

        start = cache.length
        rewind = lambda: setattr(cache, "length", start)  # noqa: E731 - warm-up and capture must not move it
        self.step = Captured(step, capture and inputs.is_cuda, before=rewind)
        cache.length = start

    def __call__(self, inputs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.inputs.copy_(inputs)
        self.positions.copy_(positions)
        self.step()
        if self.step.graph is not None:
            self.cache.advance(1, on_device=False)  # the replay advanced only the device-side offset
        return self.outputs


class PredictorRunner:
    """The code predictor's 15 steps for one frame over persistent buffers, captured as CUDA graphs.

    Offsets are fixed per step (the prompt at 0-1, code s at s+1), so every step can be captured once. When
    sampling, each step is its own graph and the draw happens between replays (any knob, any `generator`);
    greedy frames are one graph for all 15 steps, argmax and embedding lookups included.
    Built once per (batch, dtype, device) and reused for every frame and every call.
    """

    def __init__(self, predictor, batch: int, dtype, device, capture: bool = True):
        self.capture = capture and torch.device(device).type == "cuda"
        self.predictor = predictor
        cfg = predictor.config
        G, C = predictor.num_residual + 1, cfg.hidden_size
        self.seq = torch.zeros(batch, G + 1, C, dtype=dtype, device=device)
        self.codes = torch.zeros(batch, predictor.num_residual, dtype=torch.long, device=device)
        self.cache = predictor.new_cache(batch, dtype, device)
        # Static: each step sets the offset on the device (a captured fill) and the layers see only tensors,
        # so a compiled layer step (`compile_decode_step`) serves all 15 steps.
        self.cache.set_static(True)
        self.positions = torch.arange(G, device=device).view(1, 1, G).expand(1, batch, G).contiguous()
        self.logits: list[torch.Tensor | None] = [None] * predictor.num_residual
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        # Captured on first use: greedy generation never needs the per-step graphs, nor sampling the frame graph.
        self.steps: list[Captured] | None = None
        self.greedy: Captured | None = None

    def _step(self, s: int):
        def step():
            self.logits[s] = self.predictor.step_logits(s, self.seq, self.positions, self.cache)

        return step

    def _feed(self, s: int, code: torch.Tensor) -> None:
        self.codes[:, s] = code
        self.seq[:, s + 2] = self.predictor.model.codec_embedding[s](code)

    def _greedy_frame(self) -> None:
        for s in range(self.predictor.num_residual):
            self._feed(s, self.predictor.step_logits(s, self.seq, self.positions, self.cache).argmax(-1))

    @torch.no_grad()
    def run(self, hidden_BC, layer0_embed_BC, sampling: SamplingConfig, generator=None):
        """Codes [B, 15] of one frame and the embeddings [B, 16, C] of its codes (see CodePredictor.predict)."""
        self.seq[:, 0].copy_(hidden_BC)
        self.seq[:, 1].copy_(layer0_embed_BC)
        if not sampling.do_sample:
            if self.greedy is None:
                self.greedy = Captured(self._greedy_frame, self.capture, self.pool)
            self.greedy()
        else:
            if self.steps is None:
                self.steps = [Captured(self._step(s), self.capture, self.pool) for s in range(len(self.logits))]
            for s, step in enumerate(self.steps):
                step()
                self._feed(s, choose(self.logits[s], sampling, generator))
        return self.codes.clone(), self.seq[:, 1:].clone()


def predictor_runner(predictor, batch: int, dtype, device, capture: bool = True) -> PredictorRunner:
    """The runner for this batch/dtype/device (captured or not), built on first use and kept on the module.
    Its graphs record the layer step of the moment, so `compile_decode_step` (on or off) gets a new one."""
    key = (batch, dtype, str(device), capture, predictor.model.compiled_step)
    runners = predictor.__dict__.setdefault("_runners", {})
    if key not in runners:
        runners[key] = PredictorRunner(predictor, batch, dtype, device, capture)
    return runners[key]


# ---- Code2Wav's streaming pushes ----------------------------------------------------------------------------------
class _PushReplay:
    """One push size's decode, captured on CUDA (over fixed input and state buffers) or run eagerly."""

    def __init__(self, decoder, codes: torch.Tensor, capture: bool, pool=None):
        self.decoder, self.inputs, self.outputs, self.graph = decoder, codes.clone(), None, None
        state = decoder.state_tensors()
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream() if capture else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            decoder.decode(self.inputs)  # warm-up: lazy initialisations must not happen in capture
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(state, saved):  # the warm-up advanced the stream: undo it
            t.copy_(s)
        if capture:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.outputs = decoder.decode(self.inputs)

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        self.inputs.copy_(codes)
        if self.graph is None:
            return self.decoder.decode(self.inputs)
        self.graph.replay()
        return self.outputs.clone()  # the next replay overwrites `outputs`


class GraphedStreamingDecoder:
    """Code2Wav's `StreamingDecoder` whose pushes are replayed from CUDA graphs, one per push size and batch.

    A push is hundreds of small kernels (the 8-layer window transformer, ~40 convolutions and their
    activations); launched one by one they cost more than the work. After a stream's first push every push of
    n frames reads and writes the same addresses (`StreamingDecoder.steady`), so it can be captured. A size is
    captured the second time it is pushed (a one-off size, such as a stream's last push, runs eagerly), after a
    warm-up run whose effect on the stream is undone. The graphs are kept for later streams: `flush()` resets
    the state in place. They are dropped when any Code2Wav parameter or buffer was replaced or changed in
    place, which is checked at each stream's first push (not within a stream). Same `push` / `flush` contract
    and outputs as `StreamingDecoder`; `capture=False` runs the same bookkeeping eagerly (what the CPU tests
    check).
    """

    def __init__(self, code2wav, capture: bool = True):
        self.code2wav = code2wav
        self.capture = capture and code2wav.code_embedding.weight.is_cuda
        self.inner = code2wav.streaming_decoder()
        self.replays: dict[tuple[int, int], _PushReplay] = {}
        self.seen: dict[tuple[int, int], int] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.weights: tuple = ()
        self.addresses: list[int] = []

    @property
    def frames(self) -> int:
        return self.inner.frames

    @property
    def emitted(self) -> int:
        return self.inner.emitted

    def _fingerprint(self) -> tuple:
        tensors = (*self.code2wav.parameters(), *self.code2wav.buffers())
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)

    def _forget_if_changed(self) -> None:
        weights, addresses = self._fingerprint(), [t.data_ptr() for t in self.inner.state_tensors()]
        if weights != self.weights or addresses != self.addresses:
            self.replays.clear()
            self.seen.clear()
            self.weights, self.addresses = weights, addresses

    @torch.no_grad()
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        inner = self.inner
        if codes.shape[-1] == 0 or not inner.steady:
            first = not inner.steady
            samples = inner.push(codes)
            if first and inner.steady:  # the stream's first push: its state now exists at its final addresses
                self._forget_if_changed()
            return samples
        inner.check(codes)
        key = (codes.shape[0], codes.shape[-1])
        replay = self.replays.get(key)
        if replay is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] < 2:
                return inner.record(codes.shape[-1], inner.decode(codes))
            replay = self.replays[key] = _PushReplay(inner, codes, self.capture, self.pool)
        return inner.record(codes.shape[-1], replay(codes))

    def flush(self) -> torch.Tensor:
        return self.inner.flush()


@contextlib.contextmanager
def streaming_decoder(code2wav, graphs: bool):
    """The Code2Wav decoder for one stream: with `graphs`, the model's `GraphedStreamingDecoder` (kept on the
    module, so later streams replay its graphs; flushed first, in case a stream abandoned mid-way left state
    behind) unless another stream holds it; otherwise a plain `StreamingDecoder`."""
    state = code2wav.__dict__
    if not graphs or state.get("_graphed_decoder_busy"):
        yield code2wav.streaming_decoder()
        return
    if "_graphed_decoder" not in state:
        state["_graphed_decoder"] = GraphedStreamingDecoder(code2wav)
    state["_graphed_decoder_busy"] = True
    try:
        decoder = state["_graphed_decoder"]
        decoder.flush()
        yield decoder
    finally:
        state["_graphed_decoder_busy"] = False
