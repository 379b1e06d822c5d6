"""Mixture of experts: router -> dispatch -> stacked experts -> combine, with an optional gated shared expert.

Expert weights are stacked: `gate_up_proj` [E, 2I, H] (gate rows first, then up) and `down_proj` [E, H, I].
The checkpoint stores them one tensor per expert; `qwen3omni.checkpoint` converts between the two.

`Experts` has several dispatch strategies (see its docstring), chosen per call by device and token count:
on CPU a loop over the chosen experts' weight slices for decoding and a sort-by-expert grouping for
prefill (a native kernel for a float32 one where it builds, `torch._grouped_mm` for a bf16 one); on CUDA
`torch._grouped_mm`, with no host sync, so a decode step can be captured in a CUDA graph.
`moe_reference` is the slow, obviously-correct loop the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from . import cpu_kernels
from .activations import activation
from .few_rows import cpu_autocast
from .mlp import SwiGLU


@dataclass
class Routing:
    logits: torch.Tensor  # [N, E] router logits (for the load-balancing loss)
    weights: torch.Tensor  # [N, k] combine weights, in the input dtype
    experts: torch.Tensor  # [N, k] chosen expert ids


class Router(nn.Module):
    """linear -> softmax (float32) -> top-k -> optional renormalisation of the k weights."""

    def __init__(self, dim: int, num_experts: int, top_k: int, normalize: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, dim))
        self.top_k, self.normalize = top_k, normalize

    def forward(self, x_NH: torch.Tensor) -> Routing:
        logits = F.linear(x_NH, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(logits, weights.to(x_NH.dtype), experts)


def grouped_mm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs these tensors natively: CUDA, bf16, compute capability 8.0 or newer.

    (PyTorch has a CPU `_grouped_mm` too: slower than "pairs" for decoding, no faster than "sorted" for a
    float32 prefill, ~10% faster for a bf16 one; see `cpu_grouped_mm_faster`.)
    """
    if not (hasattr(torch, "_grouped_mm") and x.is_cuda and weight.dtype == torch.bfloat16):
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 0)


# torch._grouped_mm has a CPU kernel from torch 2.9 on (2.8 has the op, CUDA only).
_CPU_GROUPED_MM = hasattr(torch, "_grouped_mm") and torch.torch_version.TorchVersion(torch.__version__) >= "2.9"


def cpu_grouped_mm_faster(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether a CPU prefill takes `torch._grouped_mm`: bf16 inference, where its kernel is ~10% faster than
    the "sorted" loop per thinker prefill (measured: 512 tokens, real widths, 2 threads); not in float32 (no
    faster than "sorted" there), nor when gradients are recorded. The kernel wants 16-byte-aligned rows and
    data: widths that are multiples of 8 bf16 values (the released ones are)."""
    if not (_CPU_GROUPED_MM and x.dtype == gate_up.dtype == down.dtype == torch.bfloat16):
        return False
    hidden, inner = gate_up.shape[-1], down.shape[-1]
    aligned = all(t.data_ptr() % 16 == 0 for t in (x, gate_up, down))
    return hidden % 8 == 0 and inner % 8 == 0 and aligned and not torch.is_grad_enabled()


def cpu_kernel_usable(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether a CPU prefill can take the native grouped kernel (`cpu_kernels`): float32 inference (no
    gradient recorded, no autocast) on a CPU with AVX-512 where the kernel builds, with each expert's weight
    rows stored contiguously (the stacked parameters are)."""
    if x.device.type != "cpu" or not x.dtype == gate_up.dtype == down.dtype == torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or gate_up.requires_grad or down.requires_grad):
        return False
    if cpu_autocast():
        return False
    rows_contiguous = all(w.stride(2) == 1 and w.stride(1) == w.shape[2] for w in (gate_up, down))
    return rows_contiguous and cpu_kernels.grouped_gemm() is not None


def by_expert(routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, choice) pairs sorted by expert, stably (each token keeps its place within a group): the
    flat expert ids [P], the sorting permutation [P] and each sorted pair's token [P]. Device ops only."""
    ids = routing.experts.flatten()
    order = torch.argsort(ids, stable=True)
    return ids, order, order // routing.experts.shape[1]


def _times_transposed(x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """x @ w.T. For a few dozen rows, computed as (w @ x.T).T: BLAS then streams the big weight untransposed
    and packs only the small activation block (~20% faster per MoE layer on CPU at 512 tokens, top-8 of 128);
    for larger blocks the direct product is as fast or faster. Not for bf16: its (AMX) kernel is as fast on
    the direct product, and the transposed result then makes `index_add_` ~10x slower (a strided bf16 source),
    ~10% of a bf16 prefill (measured at 512 tokens)."""
    if x_MK.shape[0] <= 64 and not x_MK.is_cuda and x_MK.dtype == torch.float32:
        return (w_NK @ x_MK.t()).t()
    return x_MK @ w_NK.t()


class Experts(nn.Module):
    """E SwiGLU experts stored as two stacked tensors, with five interchangeable dispatch strategies.

    - "pairs": loop over the (token, expert) pairs, multiplying straight by each chosen expert's weight slice
      (a view, no copy). Decoding on CPU: a batch-1 step reads the k chosen experts once, which is all a
      memory-bound step can do. Reads the chosen ids on the host (free on CPU).
    - "sorted": sort the pairs by expert and run each active expert once on its contiguous group (prefill and
      training on CPU: big matrix products; one host read of the group sizes per layer).
    - "cpu_kernel": the same grouping, with all groups' products done by the native kernel of `cpu_kernels` in
      two calls (float32 inference on AVX-512 CPUs: a prefill MoE layer of 512 tokens at real widths takes
      ~180 ms instead of ~290 with "sorted", since the kernel streams the expert weights under its
      multiply-adds instead of between them).
    - "grouped_mm": the same grouping done by `torch._grouped_mm` in two kernels, with group offsets computed on
      the device: no host sync and no data-dependent shapes (CUDA bf16; CUDA graphs and torch.compile friendly).
    - "gathered": copy the chosen experts' weights and run batched matmuls; also sync-free, the fallback for
      accelerators without `_grouped_mm` (it moves k expert matrices per token, so eager CPU calls do not use it).
    `dispatch = "auto"` (the default) picks per call: on CPU pairs for a few tokens, else cpu_kernel for
    float32 inference where it builds, grouped_mm for bf16 inference, sorted otherwise; inside torch.compile
    grouped_mm or gathered. Set it to a name to force one (tests compare them all against `moe_reference`).
    """

    STRATEGIES = ("auto", "pairs", "sorted", "cpu_kernel", "grouped_mm", "gathered")

    def __init__(self, num_experts: int, dim: int, hidden: int, act: str = "silu"):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.act = activation(act)
        self.dispatch = "auto"
        # Up to this many tokens a CPU call loops over pairs; beyond, it groups them by expert.
        self.pairs_limit = 4
        # Used inside torch.compile, where only sync-free strategies fit; set by `prepare_compile` (outside the
        # graph: it reads the device's capability).
        self.compiled_dispatch = "gathered"

    def prepare_compile(self) -> None:
        usable = grouped_mm_usable(self.gate_up_proj, self.gate_up_proj)  # activations share the weights' device
        self.compiled_dispatch = "grouped_mm" if usable else "gathered"

    def _swiglu(self, gate_up: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """act(gate) * up (* scale), in place on the activation's output when no gradient is recorded."""
        gate, up = gate_up.chunk(2, dim=-1)
        if torch.is_grad_enabled():
            h = self.act(gate) * up
            return h if scale is None else h * scale
        h = self.act(gate).mul_(up)
        return h if scale is None else h.mul_(scale)

    def forward(self, x_NH: torch.Tensor, routing: Routing) -> torch.Tensor:
        # Under autocast the products come out in the autocast dtype; the block returns the input's, as the
        # reference does.
        return getattr(self, "_" + self.strategy(x_NH, routing))(x_NH, routing).to(x_NH.dtype)

    def strategy(self, x_NH: torch.Tensor, routing: Routing) -> str:
        if self.dispatch != "auto":
            if self.dispatch not in self.STRATEGIES:
                raise InputError(f"dispatch: expected one of {list(self.STRATEGIES)}, got {self.dispatch!r}")
            return self.dispatch
        if torch.compiler.is_compiling():  # no host reads inside a compiled graph
            return self.compiled_dispatch
        if x_NH.device.type == "cpu":
            if x_NH.shape[0] <= self.pairs_limit:
                return "pairs"
            if cpu_kernel_usable(x_NH, self.gate_up_proj, self.down_proj):
                return "cpu_kernel"
            return "grouped_mm" if cpu_grouped_mm_faster(x_NH, self.gate_up_proj, self.down_proj) else "sorted"
        if grouped_mm_usable(x_NH, self.gate_up_proj):
            return "grouped_mm"
        return "gathered" if routing.experts.numel() <= self.gate_up_proj.shape[0] else "sorted"

    def _pairs(self, x_NH, routing):
        N, k = routing.experts.shape
        chosen = routing.experts.tolist()
        # Two matrix-vector products per pair straight on the expert's weight slice (a view), one activation
        # for all pairs. `mv(W, x)` reads W row by row: ~10% faster on CPU than `x @ W.T` for one row.
        up, down = self.gate_up_proj, self.down_proj
        h_PI = self._swiglu(torch.stack([torch.mv(up[e], x_NH[n]) for n, row in enumerate(chosen) for e in row]))
        experts = [e for row in chosen for e in row]
        y_PH = torch.stack([torch.mv(down[e], h) for h, e in zip(h_PI, experts)])
        # [N, 1, k] @ [N, k, H]: the weighted sum over each token's k experts.
        return torch.bmm(routing.weights.unsqueeze(1), y_PH.view(N, k, -1)).squeeze(1)

    def _sorted(self, x_NH, routing):
        ids, order, token = by_expert(routing)
        scale = routing.weights.flatten()[order].unsqueeze(-1)
        counts = torch.bincount(ids, minlength=self.gate_up_proj.shape[0]).tolist()
        up, down = self.gate_up_proj, self.down_proj
        out = torch.zeros_like(x_NH)
        # One expert at a time, gathering its rows and adding its outputs straight back: every temporary is
        # one group's size. (Gathering all pairs first makes tens-of-MB temporaries per layer at prefill
        # sizes, and on CPU each fresh one of those costs page faults comparable to the products.) Each token
        # still sums its experts in ascending id order.
        start = 0
        for expert, n in enumerate(counts):
            if not n:
                continue
            rows = token[start : start + n]
            # The routing weight scales the narrow hidden activation rather than the wider output (same product).
            h = self._swiglu(_times_transposed(x_NH.index_select(0, rows), up[expert]), scale[start : start + n])
            out.index_add_(0, rows, _times_transposed(h, down[expert]).to(x_NH.dtype))
            start += n
        return out

    # Tokens per native-kernel call: bounds its [tokens * k, 2I] temporaries (200 MB at the released widths);
    # an expert gets ~tokens * k / E of them, enough to keep the products compute-bound.
    kernel_tokens = 4096  # also keeps the kernel's int32 gather offsets (rows * width) far below 2**31

    def _cpu_kernel(self, x_NH, routing):
        if not cpu_kernel_usable(x_NH, self.gate_up_proj, self.down_proj):
            raise InputError(
                "dispatch: 'cpu_kernel' needs float32 CPU tensors, no gradient, and the native kernel "
                f"(AVX-512 and a C++ compiler; see qwen3omni.modules.cpu_kernels); got {x_NH.dtype} on {x_NH.device}"
            )
        x = x_NH.contiguous()
        out = torch.zeros_like(x)
        for start in range(0, x.shape[0], self.kernel_tokens):
            rows = slice(start, start + self.kernel_tokens)
            part = Routing(routing.logits[rows], routing.weights[rows], routing.experts[rows])
            self._cpu_kernel_rows(x[rows], part, out[rows])
        return out

    def _cpu_kernel_rows(self, x_NH, routing, out_NH):
        E = self.gate_up_proj.shape[0]
        ids, order, token = by_expert(routing)
        counts = torch.bincount(ids, minlength=E)  # (raises for a negative id)
        if counts.numel() > E:  # the kernel would read past the stacked weights
            raise InputError(f"routing.experts: expected ids in [0, {E}), got {int(ids.max())}")
        active = counts.nonzero().flatten()
        groups = (active, (counts.cumsum(0) - counts)[active], counts[active])
        # [P, 2I]: one row per (token, expert) pair in expert order, the kernel gathering the tokens from x.
        gate_up = cpu_kernels.grouped_products(self.gate_up_proj, groups, x_NH, cols=token.int(), columns=ids.numel())
        gate, up = gate_up.chunk(2, dim=1)
        h_PI = self.act(gate).mul_(up).mul_(routing.weights.flatten()[order].unsqueeze(1))
        # Each group's outputs are added to its tokens' rows, groups in ascending expert order (as "sorted").
        cpu_kernels.grouped_products(self.down_proj, groups, h_PI, out=out_NH, tokens=token)

    def _grouped_mm(self, x_NH, routing):
        N, k = routing.experts.shape
        E = self.gate_up_proj.shape[0]
        ids, order, token = by_expert(routing)
        # Group sizes by a scatter-add rather than bincount, which reads the largest id on the host.
        counts = torch.zeros(E, dtype=torch.int32, device=ids.device).scatter_add_(
            0, ids, torch.ones_like(ids, dtype=torch.int32)
        )
        offsets = counts.cumsum(0, dtype=torch.int32)
        x_sorted = x_NH.index_select(0, token)
        h = self._swiglu(torch._grouped_mm(x_sorted, self.gate_up_proj.transpose(1, 2), offs=offsets))
        y_sorted = torch._grouped_mm(h, self.down_proj.transpose(1, 2), offs=offsets)
        # Back to (token, choice) order with a permutation (deterministic, unlike an atomic index_add), then the
        # weighted sum over each token's k experts.
        y_PH = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)
        return torch.bmm(routing.weights.unsqueeze(1), y_PH.view(N, k, -1)).squeeze(1)

    def _gathered(self, x_NH, routing):
        ids = routing.experts.flatten()  # [P]
        x_P1H = x_NH.repeat_interleave(routing.experts.shape[1], dim=0).unsqueeze(1)
        h = self._swiglu(torch.bmm(x_P1H, self.gate_up_proj[ids].transpose(1, 2)))
        y_PH = torch.bmm(h, self.down_proj[ids].transpose(1, 2)).squeeze(1)
        y_NkH = y_PH.view(*routing.experts.shape, -1) * routing.weights.unsqueeze(-1)
        return y_NkH.sum(dim=1)


class MoeBlock(nn.Module):
    """Routed experts plus, optionally, a shared expert scaled by sigmoid(shared_expert_gate(x))."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        expert_hidden: int,
        normalize: bool,
        shared_hidden: int = 0,
        act: str = "silu",
    ):
        super().__init__()
        self.gate = Router(dim, num_experts, top_k, normalize)
        self.experts = Experts(num_experts, dim, expert_hidden, act)
        self.shared_expert = SwiGLU(dim, shared_hidden, act) if shared_hidden else None
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if shared_hidden else None

    def forward(self, x_BTH: torch.Tensor, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the block output and the router logits [B*T, E]."""
        x_NH = x_BTH.reshape(-1, x_BTH.shape[-1])
        routing = self.gate(x_NH)
        y = moe_reference(self.experts, x_NH, routing) if reference else self.experts(x_NH, routing)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x_NH)) * self.shared_expert(x_NH)
        return y.view_as(x_BTH), routing.logits


def moe_reference(experts: Experts, x_NH: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Every expert over every token, masked by the routing: slow and obviously correct."""
    out = torch.zeros_like(x_NH)
    for e in range(experts.gate_up_proj.shape[0]):
        weight_N = (routing.weights * (routing.experts == e)).sum(dim=-1)
        h = experts._swiglu(x_NH @ experts.gate_up_proj[e].T)
        out = out + weight_N.unsqueeze(-1) * (h @ experts.down_proj[e].T)
    return out
