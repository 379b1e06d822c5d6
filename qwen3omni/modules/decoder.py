"""A pre-norm transformer decoder stack: attention + (dense or MoE) MLP per layer, a final RMSNorm.

The thinker's text model, the talker and the code predictor are all this stack with different widths,
MLPs, rotary layouts and input embeddings; they own the embeddings, the stack owns the layers.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import InputError
from .aot_step import AheadOfTimeStep, EagerWhenHooked
from .attention import Attention, decoder_mask, set_attention_backend
from .kv_cache import KVCache, LayerKV
from .moe import Experts, MoeBlock
from .norms import RMSNorm
from .rotary import RotaryEmbedding


@dataclass
class DecoderOutput:
    last_hidden_state: torch.Tensor  # [B, T, C], after the final norm
    hidden_states: tuple[torch.Tensor, ...] | None = None  # input, then each layer's output; last one normed
    router_logits: tuple[torch.Tensor, ...] | None = None  # one [B*T, E] per MoE layer


class DecoderLayer(nn.Module):
    def __init__(self, attention: Attention, mlp: nn.Module, dim: int, eps: float):
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)

    def forward(self, x, rope, mask, kv: LayerKV | None = None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, kv)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoeBlock):
            h, router_logits = self.mlp(h)
        else:
            h, router_logits = self.mlp(h), None
        return x + h, router_logits


LayerHook = Callable[[int, torch.Tensor], torch.Tensor]


def run_layer(layer: DecoderLayer, x, rope, mask, kv: LayerKV | None):
    """One layer's forward: the function `DecoderStack.compile_decode_step` compiles (module as an argument,
    so every layer of a stack shares the compiled code)."""
    return layer(x, rope, mask, kv)


def own_copy(fn: Callable, tag: str) -> Callable:
    """`fn` with a code object of its own. torch.compile keeps its graphs per code object: stacks sharing one
    (thinker, talker, code predictor: other widths) would keep recompiling it, its shapes would then turn
    symbolic (dynamo's automatic dynamic shapes), and every call would walk the others' guards."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def with_one_row_products_fused(options: dict) -> dict:
    """torch.compile options for a CPU decode step: inductor's pass that writes a one-row product whose
    weight has both sides <= 2048 as a fused reduction instead of a BLAS call, so a decode step's smaller
    projections (k, v, router, shared expert, all of them at small widths) join the kernels of the norms and
    rotary around them. Each BLAS call there costs ~30 us of fixed work per layer call (measured: compiled
    workload C ~10% faster per token with the pass, workload D unchanged). Left alone when the caller chose a
    `mode` (torch.compile takes a mode or options, not both), another backend, or the pass settings."""
    if options.get("mode") is not None or options.get("backend", "inductor") != "inductor":
        return options
    inductor = dict(options.get("options") or {})
    inductor.setdefault("post_grad_fusion_options", {"decompose_mm_pass": {}})
    return {**options, "options": inductor}


class DecoderStack(nn.Module):
    """`layers` + `norm` + the rotary table shared by all layers."""

    def __init__(self, layers: list[DecoderLayer], dim: int, eps: float, rotary: RotaryEmbedding):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(dim, eps)
        self.rotary = rotary
        self.gradient_checkpointing = False
        self.compiled_step = None  # see compile_decode_step
        self._layer_step = None  # this stack's own copy of run_layer, made on the first compile_decode_step

    def __getstate__(self):
        # Pickling (torch.save of a whole model, multiprocessing) and deepcopy leave the compiled step out: the
        # compiled wrapper and this stack's copy of run_layer cannot be pickled; call compile_decode_step again.
        state = self.__dict__.copy()
        state["compiled_step"] = state["_layer_step"] = None
        return state

    def new_cache(self, batch: int, capacity: int, dtype=None, device=None) -> KVCache:
        attn = self.layers[0].self_attn
        param = self.norm.weight
        return KVCache(
            len(self.layers), batch, attn.num_kv_heads, attn.head_dim, capacity,
            dtype or param.dtype, device or param.device,
        )

    def compile_decode_step(self, enable: bool = True, ahead_of_time: bool = False, **options) -> None:
        """Run each layer of a static-cache step (the decode steps that generation replays from CUDA graphs)
        through `torch.compile(run_layer)`, a copy of it per stack (see `own_copy`): one compiled graph serves
        every layer of the stack (a layer sees its cache as tensors, see `LayerKV`), with its elementwise chains
        (norms, rotary, SwiGLU, routing) fused into a few kernels. Prefill and training stay eager. The first
        step compiles (tens of seconds); the cache capacity is symbolic, so later calls with other lengths reuse
        it. `options` go to `torch.compile` (for a CPU stack with one inductor pass added, see
        `with_one_row_products_fused`). Two dynamo settings are raised process-wide (see the body): the
        recompile limit, and (for a stack on CPU) shape guards checked in C++.

        A layer with forward hooks (on any of its modules, registered before compiling or after, or global
        ones) runs its steps eagerly, so the hooks run; the other layers stay compiled (`EagerWhenHooked`:
        torch.compile'd code itself runs no hooks). CUDA graph replays run no Python at all, hooks included:
        generate with `cuda_graphs=False` on a GPU to see them at every step.

        `ahead_of_time=True` (CPU stacks): one-token steps run an AOTInductor build of the layer instead, with
        no dynamo bookkeeping per call (~20% faster per token at small widths; ~10 s to build per batch size
        and dtype, on first use). A layer with hooks runs eagerly. See `aot_step.AheadOfTimeStep` for what it
        checks on every call and when it hands a call to the torch.compile'd step; to notice assignments it
        installs torch's process-wide parameter and module registration hooks (they count assignments)."""
        if not isinstance(ahead_of_time, bool):
            raise InputError(f"ahead_of_time: expected True or False, got {ahead_of_time!r}")
        if not enable:
            self.compiled_step = None
            return
        if ahead_of_time and self.norm.weight.device.type != "cpu":
            raise InputError(f"ahead_of_time: for a stack on the CPU only, this one is on "
                             f"{self.norm.weight.device} (on a GPU, generation replays CUDA graphs of the steps)")
        # Step widths (a 2-token first step, then 1) and batch sizes each add entries for a stack's code
        # object; the default limit of 8 would silently send later ones back to eager.
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # older torch
        setattr(config, name, max(getattr(config, name), 64))
        if hasattr(config, "enable_cpp_symbolic_shape_guards") and self.norm.weight.device.type == "cpu":
            # The symbolic capacity gives every call shape guards (strides are multiples of it); dynamo checks
            # them in Python by default, ~30 us per layer call here, or in compiled C++ with this (it falls
            # back to Python where no compiler is found). Measured: compiled workload C 8-10% faster per token.
            # CPU stacks only: on a GPU, generation replays CUDA graphs, which skip guards anyway.
            config.enable_cpp_symbolic_shape_guards = True
        for module in self.modules():
            if isinstance(module, Experts):
                module.prepare_compile()
        if self._layer_step is None:  # kept, so that turning compilation off and on again reuses the graphs
            self._layer_step = own_copy(run_layer, f"{type(self).__name__}_{id(self):x}")
        if self.norm.weight.device.type == "cpu":
            options = with_one_row_products_fused(options)
        compiled = torch.compile(self._layer_step, **options)
        if ahead_of_time:
            self.compiled_step = AheadOfTimeStep(self.layers, compiled, options.get("options"))
        else:
            self.compiled_step = EagerWhenHooked(self.layers, compiled)

    @staticmethod
    def _layer_kv(cache: KVCache | None, i: int, compiled: bool) -> LayerKV | None:
        if cache is None:
            return None
        kv = cache.layer(i)
        if compiled:
            torch._dynamo.maybe_mark_dynamic(kv.keys, 2)
            torch._dynamo.maybe_mark_dynamic(kv.values, 2)
        return kv

    def set_attention_backend(self, backend: str) -> None:
        set_attention_backend(self, backend, "backend")

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer_hook: LayerHook | None = None,
        output_hidden_states: bool = False,
        output_router_logits: bool = False,
        window: int | None = None,
    ) -> DecoderOutput:
        """`position_ids` [axes, B, T]; `attention_mask` [B, T] for these tokens (0 = left padding)."""
        x = inputs_embeds
        if x.dtype != self.norm.weight.dtype and x.is_floating_point():
            x = x.to(self.norm.weight.dtype)  # e.g. float32 embeddings built by hand for a bf16 model
        B, T, _ = x.shape
        start = 0 if cache is None else cache.length
        if cache is not None:
            attn = self.layers[0].self_attn
            cache.check_fits(B, len(self.layers), attn.num_kv_heads, attn.head_dim, x.dtype)
            cache.reserve(T)
            if attention_mask is not None:
                cache.mark_padding(attention_mask)
            key_valid = cache.valid_keys(T)
        elif attention_mask is not None and not bool(attention_mask.all()):  # one host read, as mark_padding's
            key_valid = attention_mask.bool()
        else:  # no padding: no mask, so attention takes its causal fast path (and flash-attn when chosen)
            key_valid = None
        if cache is not None and cache.static:
            mask = cache.static_mask(T, window)  # keys past the device-side offset are masked, not sliced off
        else:
            mask = decoder_mask(key_valid, T, start, window, x.device)
        rope = self.rotary(position_ids, dtype=x.dtype)
        step = run_layer
        if cache is not None and cache.static and self.compiled_step is not None:
            step = self.compiled_step
            # The cache's capacity differs between calls (prompt + max_new_tokens): make it symbolic from the
            # start, so one compiled graph serves every capacity instead of one compile per size.
            torch._dynamo.maybe_mark_dynamic(mask, 3)
        hidden, routers = [x] if output_hidden_states else None, [] if output_router_logits else None
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x, logits = checkpoint(layer, x, rope, mask, None, use_reentrant=False)
            else:
                x, logits = step(layer, x, rope, mask, self._layer_kv(cache, i, step is not run_layer))
            if hidden is not None:
                hidden.append(x)
            if routers is not None and logits is not None:
                routers.append(logits)
            if layer_hook is not None:
                x = layer_hook(i, x)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x
        return DecoderOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden) if hidden is not None else None,
            router_logits=tuple(routers) if routers is not None else None,
        )
