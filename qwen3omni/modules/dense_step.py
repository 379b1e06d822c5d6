"""`NativeDenseStep`: few-token decode steps of a dense decoder stack through the native kernel (CPU, float32).

The code predictor runs 15 steps of its 5-layer stack per speech frame. In torch each layer step is ~25 small
operations whose fixed costs add ~85 ms per frame to the 161 ms its one-row products take alone (real widths,
2 threads: 240 ms a frame); natively the 15 steps take 165 ms (`scripts/bench.py -w D`). `csrc/dense_step.cpp`
runs a whole step, every layer, in one call, or a whole greedy frame (see its header). It is used only where it
computes what the torch path computes, up to float32 summation order: see `NativeDenseStep.usable`.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from . import cpu_kernels
from .aot_step import hook_tables
from .attention import Attention
from .few_rows import cpu_autocast
from .kv_cache import KVCache
from .mlp import SwiGLU

MAX_ROWS = 4  # batch x new tokens per step (the kernel keeps 4 x rows accumulators per weight tile)
MAX_HEAD_DIM, MAX_POSITIONS = 512, 4096  # the kernel's per-head buffers


def _plain_layer(layer: nn.Module) -> bool:
    """A pre-norm layer with Qwen3 attention (q/k norm, no biases) and a SiLU SwiGLU, all float32 on the CPU."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if not isinstance(attn, Attention) or not isinstance(mlp, SwiGLU):
        return False
    if attn.q_norm is None or attn.backend == "eager" or mlp.act is not torch.nn.functional.silu:
        return False
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if any(lin.bias is not None for lin in linears):
        return False
    return all(p.dtype == torch.float32 and p.device.type == "cpu" and p.is_contiguous() for p in layer.parameters())


def _widths(layer: nn.Module) -> tuple:
    attn, mlp = layer.self_attn, layer.mlp
    return (attn.num_heads, attn.num_kv_heads, attn.head_dim, tuple(mlp.gate_proj.weight.shape))


def hooked(module: nn.Module) -> bool:
    """Forward hooks anywhere in `module` (or global ones): they must see the torch path's module calls."""
    return any(hook_tables(module))


class NativeDenseStep:
    """Decode steps of `stack` (a `DecoderStack` of dense layers) over `cache`, each step in one native call.

    `step(x_BTC, start)` runs the tokens `x_BTC` at positions [start, start + T) (every batch row at the same
    positions, no padding), writes their keys and values into `cache`, and returns the stack's output (after
    the final norm) for them. Build it with `NativeDenseStep.create`, which returns None where the kernel
    cannot stand in for the torch path.
    """

    def __init__(self, stack: nn.Module, cache: KVCache, batch: int):
        attn, mlp = stack.layers[0].self_attn, stack.layers[0].mlp
        self.fn = cpu_kernels.dense_step()
        self.cache, self.stack = cache, stack
        layers = []
        for layer in stack.layers:
            a, m = layer.self_attn, layer.mlp
            weights = (layer.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
                       a.q_norm.weight, a.k_norm.weight, a.o_proj.weight, layer.post_attention_layernorm.weight,
                       m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)
            layers.append(cpu_kernels.DenseLayer(*(w.data_ptr() for w in weights)))
        self._layers = (cpu_kernels.DenseLayer * len(layers))(*layers)
        C = stack.norm.weight.shape[0]
        self.x = torch.empty(batch, MAX_ROWS // batch, C)
        self.out = torch.empty_like(self.x)
        self.args = cpu_kernels.DenseStep(
            layers=len(layers), C=C, H=attn.num_heads, Hk=attn.num_kv_heads, D=attn.head_dim,
            I=mlp.gate_proj.weight.shape[0], eps=stack.layers[0].input_layernorm.eps,
            layer=ctypes.cast(self._layers, ctypes.POINTER(cpu_kernels.DenseLayer)),
            keys=cache.keys.data_ptr(), values=cache.values.data_ptr(), B=batch, capacity=cache.capacity,
            x=self.x.data_ptr(), final_norm=stack.norm.weight.data_ptr(), out=self.out.data_ptr(),
        )
        self._rope: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.batch = batch

    @staticmethod
    def usable(stack: nn.Module, batch: int, dtype: torch.dtype, device) -> bool:
        """Whether steps of `batch` rows can run natively: the kernel is built, float32 inference on the CPU
        (no gradients, no autocast), a plain rotary table, every layer plain (see `_plain_layer`) with the
        same widths and the norms' epsilon the same, and no forward hooks in the stack."""
        if cpu_kernels.dense_step() is None or torch.is_grad_enabled() or cpu_autocast():
            return False
        if dtype != torch.float32 or torch.device(device).type != "cpu" or not 1 <= batch <= MAX_ROWS // 2:
            return False
        if getattr(stack.rotary, "layout", None) != "plain" or stack.norm.weight.dtype != torch.float32:
            return False
        if not all(_plain_layer(layer) for layer in stack.layers):
            return False
        attn, mlp = stack.layers[0].self_attn, stack.layers[0].mlp
        widths = (stack.norm.weight.shape[0], attn.num_heads * attn.head_dim, attn.head_dim, mlp.gate_proj.out_features)
        if any(w % 16 for w in widths) or attn.head_dim > MAX_HEAD_DIM:  # the kernel's vectors are 16 floats
            return False
        eps = {m.eps for m in stack.modules() if hasattr(m, "eps")}
        if len(eps) != 1 or len({_widths(layer) for layer in stack.layers}) != 1:  # one set of widths for all layers
            return False
        return not hooked(stack)

    @classmethod
    def create(cls, stack: nn.Module, cache: KVCache, batch: int) -> NativeDenseStep | None:
        """A native step for `stack` and `cache`, or None where `usable` says no or `cache` does not fit (the
        kernel writes every row at the same positions, so a cache with padding does not)."""
        keys = cache.keys
        if not cls.usable(stack, batch, keys.dtype, keys.device):
            return None
        if not (keys.is_contiguous() and cache.values.is_contiguous() and keys.shape[1] == batch) or \
                cache.capacity > MAX_POSITIONS or cache.has_padding:
            return None
        return cls(stack, cache, batch)

    def _rotary(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (start, T) not in self._rope:
            positions = torch.arange(start, start + T).view(1, 1, T)
            cos, sin = self.stack.rotary(positions)
            self._rope[start, T] = (cos[0].contiguous(), sin[0].contiguous())
        return self._rope[start, T]

    def step(self, x_BTC: torch.Tensor, start: int, head: torch.Tensor | None = None):
        """The stack's normed output [B, T, C] for `x_BTC` at positions [start, start + T), and with a `head`
        weight [V, C] also the logits [B, V] of each row's last token (a new tensor; else None). The output is a
        buffer that the next step overwrites."""
        B, T, C = x_BTC.shape
        if B != self.batch or T > MAX_ROWS // B or start < 0 or start + T > self.cache.capacity:
            raise ValueError(f"x_BTC: expected batch {self.batch}, at most {MAX_ROWS // self.batch} tokens and "
                             f"{self.cache.capacity} positions, got {B}x{T} tokens at {start}")
        cos, sin = self._rotary(start, T)
        x = self.x.view(-1)[: B * T * C].view(B, T, C)
        x.copy_(x_BTC)
        args = self.args
        args.start, args.T, args.cos, args.sin = start, T, cos.data_ptr(), sin.data_ptr()
        logits = None
        if head is not None:
            logits = self._logits(head)
            args.head, args.V, args.logits = head.data_ptr(), head.shape[0], logits.data_ptr()
            args.logits_stride = head.shape[0]
        else:
            args.head = None
        args.threads = torch.get_num_threads()
        status = self.fn(ctypes.byref(args))
        if status:
            raise RuntimeError(f"qwen3omni dense_step kernel failed (status {status})")
        self.cache.length = start + T
        return self.out.view(-1)[: B * T * C].view(B, T, C), logits

    def greedy_frame(self, seq: torch.Tensor, heads: list[torch.Tensor], tables: list[torch.Tensor],
                     codes: torch.Tensor, logits: torch.Tensor) -> None:
        """A code predictor frame in one native call, greedy (argmax, the first maximum as torch.argmax).

        `seq` [B, n + 2, C] holds [hidden, embed(code 0)] in rows 0-1, laid out as `CodePredictor.predict` lays
        it out: step 0 reads rows 0-1 at positions 0-1, step i >= 1 reads row i + 1 at position i + 1. Step i's
        logits (head `heads[i]`) go to logits[:, i], its argmax to codes[:, i], and that code embedded by
        `tables[i]` to row i + 2. `seq`, `codes` [B, n] (int64) and `logits` [B, n, V] are contiguous CPU
        tensors; heads and tables contiguous float32 [V, C].
        """
        n, (B, rows, C) = len(heads), seq.shape
        V = heads[0].shape[0]
        fits = (B == self.batch and rows == n + 2 and C == self.args.C and n + 1 <= self.cache.capacity
                and len(tables) == n and codes.shape == (B, n) and logits.shape == (B, n, V))
        weights = [*heads, *tables]
        buffers = ((seq, torch.float32), (codes, torch.int64), (logits, torch.float32))  # what the kernel writes
        if not fits or any(w.dtype != torch.float32 or not w.is_contiguous() or w.shape != (V, C) for w in weights) \
                or any(t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() for t, dtype in buffers):
            raise ValueError(f"greedy_frame: expected seq [{self.batch}, n + 2, {self.args.C}], n heads and tables "
                             f"[V, {self.args.C}] (float32, contiguous), codes [B, n] (int64) and logits [B, n, V] "
                             f"(float32), contiguous on the CPU; got seq {tuple(seq.shape)} {seq.dtype}, {n} heads, "
                             f"{len(tables)} tables, codes {codes.dtype}, logits {logits.dtype}")
        cos, sin = self._rotary(0, n + 1)
        pointers = (ctypes.c_void_p * n)
        frame = cpu_kernels.GreedyFrame(
            steps=n, heads=pointers(*(h.data_ptr() for h in heads)), tables=pointers(*(t.data_ptr() for t in tables)),
            seq=seq.data_ptr(), cos=cos.data_ptr(), sin=sin.data_ptr(), codes=codes.data_ptr(),
            logits=logits.data_ptr(),
        )
        self.args.V, self.args.threads = V, torch.get_num_threads()
        status = cpu_kernels.dense_greedy_frame()(ctypes.byref(self.args), ctypes.byref(frame))
        if status:
            raise RuntimeError(f"qwen3omni dense_step kernel failed (status {status})")
        self.cache.length = n + 1

    def _logits(self, head: torch.Tensor) -> torch.Tensor:
        if head.dtype != torch.float32 or head.device.type != "cpu" or not head.is_contiguous() or \
                head.dim() != 2 or head.shape[1] != self.args.C:
            raise ValueError(f"head: expected a contiguous float32 CPU weight [V, {self.args.C}], got "
                             f"{head.dtype} {tuple(head.shape)} on {head.device}")
        return torch.empty(self.batch, head.shape[0])
