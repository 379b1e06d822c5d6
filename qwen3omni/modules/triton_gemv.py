"""One-row products on CUDA as a Triton matrix-vector kernel (used by `few_rows.few_row_linear`).

At batch 1 every projection of a decode step is a product of one row with a weight of a few MB. On an H200
cuBLAS runs those as GEMM tiles (`nvjet ... 8x64`): 8-9 us for a 6 MB weight whose read alone takes ~1.5 us,
and a speech frame runs ~700 of them. This kernel reads the weight once, row blocks in parallel,
accumulating in float32 as cuBLAS does. Measured inside the CUDA graph of a compiled speech frame
(scripts/gpu_check.py --experiments, session 8): 3.2 us per product on average against 4.5-8.1 us, the frame
7.86 -> 6.41 ms (logits within bf16 noise of cuBLAS's: 0.057 of their scale, same argmax).

`available` says whether Triton is installed (it ships with CUDA builds of torch; CPU builds lack it).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch
    triton = tl = None

available = triton is not None
MAX_WEIGHT_NUMEL = 1 << 24  # larger weights (an LM head) already stream near the bandwidth through cuBLAS

if available:

    @triton.jit
    def _gemv_kernel(w_ptr, x_ptr, b_ptr, y_ptr, N, K, stride_wn,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0)
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def _blocks(n: int, k: int) -> tuple[int, int]:
    """Rows per program (enough programs to cover the GPU twice over: ~256 for the 1-3k rows of a projection)
    and the K chunk each loop step reads."""
    block_n = 1
    while block_n < 16 and n // (block_n * 2) >= 256:
        block_n *= 2
    block_k = min(512, triton.next_power_of_2(k))
    return block_n, block_k


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One row of a contiguous CUDA weight of at most MAX_WEIGHT_NUMEL elements, same dtype, no gradient, no
    CUDA autocast (which would choose the product's dtype itself: those calls stay on F.linear)."""
    return (
        available
        and x.is_cuda
        and x.numel() == x.shape[-1]
        and x.dtype == weight.dtype
        and weight.dim() == 2
        and weight.is_contiguous()
        and weight.numel() <= MAX_WEIGHT_NUMEL
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cuda")
    )


@torch.library.custom_op("qwen3omni::gemv", mutates_args=())
def gemv(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """weight [N, K] @ x [K] (+ bias [N]) -> [N], one kernel launch (an op torch.compile calls as it is)."""
    n, k = weight.shape
    x = x.contiguous()
    y = torch.empty(n, dtype=weight.dtype, device=weight.device)
    block_n, block_k = _blocks(n, k)
    grid = (triton.cdiv(n, block_n),)
    b = bias.contiguous() if bias is not None else y  # (not read without a bias)
    _gemv_kernel[grid](weight, x, b, y, n, k, weight.stride(0), HAS_BIAS=bias is not None, BLOCK_N=block_n,
                       BLOCK_K=block_k, num_warps=4)
    return y


@gemv.register_fake
def _(weight, x, bias):
    return weight.new_empty(weight.shape[0])
