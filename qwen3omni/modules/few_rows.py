"""`few_row_linear`: F.linear for one row or a handful of rows against a large weight, on CPU.

The decoders' projections and heads and Code2Wav's pointwise layers are `FewRowLinear`s.

One row in bf16 (a batch-1 decode step of a bf16 model on CPU): F.linear's bf16 kernel streams the weight at
6-9 Gparam/s here (2 threads), `torch.mv` at 8-11 (measured over 300 MB of [3072, 1024], [2048, 2048],
[768, 2048] ... weights), so one-row bf16 calls take `mv`. One row in fp32 stays on F.linear: there the two are
within noise of each other, and a batch-1 fp32 decode step stays bit-for-bit what it was.

Streaming Code2Wav multiplies 4-row blocks (one frame, upsampled ×4) by weights of tens of MB. For 3-8 rows
the default CPU GEMM streams the weight at about half the machine's bandwidth (measured: [4, 3072] × [3072,
6144] fp32 in 5.0 ms, 15 GB/s, 2 threads), while oneDNN's inner-product kernel, on the same unpacked weight,
takes 3.2-3.6 ms. For 1-2 rows the default path is the faster one (a matrix-vector kernel), and from a few
dozen rows on the two are within noise of each other, so only that narrow band is rerouted. The results
differ from F.linear by summation order only (about 1e-6 relative).

2-8 rows in bf16 (the code predictor's first step of a frame, batch-2 decoding): F.linear's bf16 kernel is
12-30% slower than the same product computed as weight @ x.T, which streams the weight as stored and packs only
the few rows (measured with the weight out of cache on [3072, 1024] ... [1024, 3072], 2 threads).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_gemv

FEW_ROWS = range(3, 9)  # rows for which the oneDNN kernel is used


def _onednn_linear():
    """The op, if this torch build has it and it computes a small product right (checked once, at import, so a
    build where the private op is missing or broken silently keeps F.linear)."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise  # what inductor itself emits for CPU linears
        # fixed values (drawing random ones would move the caller's global RNG at import)
        values = torch.arange(200, dtype=torch.float32).sin()
        x, w, b = values[:64].view(4, 16), values[64:192].view(8, 16), values[192:]
        with torch.no_grad():
            ok = torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    return op if ok else None


_ONEDNN_LINEAR = _onednn_linear()


# One-row products on CUDA through the Triton kernel of `triton_gemv` instead of cuBLAS, where Triton is
# installed (measured on an H200: a speech frame 7.86 -> 6.41 ms, a compiled thinker step 6.27 -> 5.92 ms).
# QWEN3OMNI_TRITON_GEMV=0 (or setting this to False) keeps cuBLAS.
CUDA_GEMV = os.environ.get("QWEN3OMNI_TRITON_GEMV", "1") != "0"


def cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `few_row_linear(x, weight)` takes the oneDNN kernel: fp32 CPU inference with 3-8 rows (the op
    has no autograd formula, so a call that records gradients stays on F.linear; nor does autocast know it, so
    calls under CPU autocast stay on F.linear too)."""
    if _ONEDNN_LINEAR is None or torch.compiler.is_compiling():  # inductor lowers the op only for weights
        return False  # it has frozen as graph constants; and `rows` may be symbolic there
    return (
        _rows(x) in FEW_ROWS
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not cpu_autocast()
    )


def _bf16_cpu_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """bf16 on CPU with no gradient recorded and no CPU autocast (which would choose the dtype itself)."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and not torch.is_grad_enabled()
        and not cpu_autocast()
    )


def uses_matvec(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `few_row_linear(x, weight)` takes `torch.mv`: one bf16 row (see `_bf16_cpu_inference`)."""
    return x.numel() == x.shape[-1] and _bf16_cpu_inference(x, weight)


def uses_weight_major(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `few_row_linear(x, weight)` computes weight @ x.T: 2-8 bf16 rows (see `_bf16_cpu_inference`),
    outside torch.compile (where `rows` may be symbolic and inductor picks its own kernel)."""
    return 2 <= _rows(x) < FEW_ROWS.stop and _bf16_cpu_inference(x, weight) and not torch.compiler.is_compiling()


@torch.library.custom_op("qwen3omni::matvec", mutates_args=())
def matvec(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """torch.mv as an op torch.compile does not look into: inductor would otherwise decompose it into its own
    reduction loop, which streams a bf16 weight ~25% slower than ATen's kernel (measured, 2 threads)."""
    return torch.mv(weight, x)


@matvec.register_fake
def _(weight, x):
    return weight.new_empty(weight.shape[0])


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, as F.linear, choosing the CPU kernel by row count (see the module note); on CUDA,
    one row through `triton_gemv` where `CUDA_GEMV` is set."""
    if CUDA_GEMV and x.is_cuda and triton_gemv.usable(x, weight):
        return triton_gemv.gemv(weight, x.reshape(-1), bias).view(*x.shape[:-1], weight.shape[0])
    if uses_matvec(x, weight):
        # (the custom op's dispatch costs ~8 us a call, so eager calls go straight to torch.mv)
        mv = matvec if torch.compiler.is_compiling() else torch.mv
        y = mv(weight, x.reshape(-1))
    elif uses_weight_major(x, weight):
        y = (weight @ x.reshape(-1, x.shape[-1]).t()).t().contiguous()
    elif uses_onednn(x, weight):
        # (the op reads the bias as contiguous memory: a strided one would give wrong values, silently)
        return _ONEDNN_LINEAR(x, weight, None if bias is None else bias.contiguous(), "none", [], "")
    else:
        return F.linear(x, weight, bias)
    y = y if bias is None else y.add_(bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class FewRowLinear(nn.Linear):
    """nn.Linear computed by `few_row_linear`: the same parameters and names, and it is still called as a
    module, so forward hooks and PEFT's LoRA wrappers see it like any other linear. (Tools that match the exact
    type, such as `torch.ao.quantization.quantize_dynamic`, skip it: set `module.__class__ = nn.Linear` on
    each first, or give them `{FewRowLinear}` and a mapping.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return few_row_linear(x, self.weight, self.bias)
