"""`few_row_linear`: F.linear for a handful of rows against a large weight, on CPU.

Streaming Code2Wav multiplies 4-row blocks (one frame, upsampled ×4) by weights of tens of MB. For 3-8 rows
the default CPU GEMM streams the weight at about half the machine's bandwidth (measured: [4, 3072] × [3072,
6144] fp32 in 5.0 ms, 15 GB/s, 2 threads), while oneDNN's inner-product kernel, on the same unpacked weight,
takes 3.2-3.6 ms. For 1-2 rows the default path is the faster one (a matrix-vector kernel), and from a few
dozen rows on the two are within noise of each other, so only that narrow band is rerouted. The results
differ from F.linear by summation order only (about 1e-6 relative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `few_row_linear(x, weight)` takes the oneDNN kernel: fp32 CPU inference with 3-8 rows (the op
    has no autograd formula, so a call that records gradients stays on F.linear)."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (
        _ONEDNN_LINEAR is not None
        and rows in FEW_ROWS
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_grad_enabled()
    )


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, as F.linear, choosing the CPU kernel by row count (see the module note)."""
    if uses_onednn(x, weight):
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class FewRowLinear(nn.Linear):
    """nn.Linear computed by `few_row_linear`: the same parameters and names, and it is still called as a
    module, so forward hooks and PEFT's LoRA wrappers see it like any other linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return few_row_linear(x, self.weight, self.bias)
