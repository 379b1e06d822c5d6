"""The Triton one-row kernel (`modules/triton_gemv.py`), run on CPU tensors through Triton's interpreter.

On a GPU the kernel serves every one-row product of a decode step; CI has no GPU, so its arithmetic (row
blocks, the masked K loop, the bias, the output dtype) is checked here with `TRITON_INTERPRET=1`, which runs the
same kernel body with NumPy. The interpreter must be chosen before the kernel is decorated, so the check runs in
a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

CHECK = r"""
import json, sys
import torch
import torch.nn.functional as F
from qwen3omni.modules import triton_gemv as tg

torch.manual_seed(0)
cases = [(37, 100, True, torch.float32), (9000, 1030, False, torch.float32), (600, 96, True, torch.bfloat16)]
out = []
for n, k, bias, dtype in cases:
    w, x = torch.randn(n, k, dtype=dtype), torch.randn(k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    y = tg.gemv(w, x, b)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    out.append({"shape": [n, k], "dtype": str(y.dtype), "blocks": list(tg._blocks(n, k)),
                "err": float((y.float() - want).abs().max() / want.abs().max())})
print(json.dumps(out))
"""


def test_kernel_matches_linear_in_the_interpreter():
    """Ragged row blocks (9000 rows in blocks of 16, 600 in blocks of 2), a K loop with a masked tail
    (1030 = 2 x 512 + 6), a bias, and bf16 output rounding: each product equals F.linear within float32 (bf16)
    rounding. Dropping the bias, the K mask, or changing the block sizes fails this test."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["blocks"] for r in results] == [[1, 128], [16, 512], [2, 128]]
    assert [r["dtype"] for r in results] == ["torch.float32", "torch.float32", "torch.bfloat16"]
    assert results[0]["err"] < 1e-6 and results[1]["err"] < 1e-6
    assert results[2]["err"] < 1e-2  # bf16 output: ~3 significant digits
