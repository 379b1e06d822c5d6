"""Native CPU kernels, compiled on first use with the system C++ compiler and loaded with ctypes.

Two kernels, both float32 on x86 CPUs (each file's header says why torch is slow there):
- `csrc/grouped_gemm.cpp`: the expert products of a MoE prefill (`grouped_gemm()`, used by `moe.Experts`),
  for AVX-512;
- `csrc/dense_step.cpp`: one decode step of a whole dense decoder stack, the code predictor's (`dense_step()`),
  or a whole greedy code predictor frame (`dense_greedy_frame()`), used by `dense_step.NativeDenseStep`, for
  AVX-512 or AVX2 with FMA (a build per instruction set).
Each is built for the instruction set torch reports for this CPU (`torch.backends.cpu.get_cpu_capability()`).
Nothing here is required: where there is no compiler, no instruction set a kernel supports, or the build fails,
`grouped_gemm()` and `dense_step()` return None (a build failure is warned about once) and the callers keep
their torch paths.
`QWEN3OMNI_CPU_KERNELS=0` turns the kernels off.

Each shared library is cached under `$QWEN3OMNI_CACHE_DIR` (default `~/.cache/qwen3omni`), named by a hash of
the source, the flags and the compiler's version, and written atomically (temp file, then rename), so
concurrent first uses and interrupted builds never leave a broken library behind.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-pthread", "-fopenmp"]
# The instruction sets each kernel is built for, by torch's name for the CPU's (torch.backends.cpu).
ISA_FLAGS = {"AVX512": ["-mavx512f", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}
KERNEL_ISAS = {"grouped_gemm": ("AVX512",), "dense_step": ("AVX512", "AVX2")}
ENABLED = os.environ.get("QWEN3OMNI_CPU_KERNELS", "1") != "0"

_lock = threading.Lock()
_loaded: dict[str, object] = {}


def cache_dir() -> Path:
    """`$QWEN3OMNI_CACHE_DIR`, else `~/.cache/qwen3omni` (or under `$XDG_CACHE_HOME`); a per-user folder in the
    temp directory where that one cannot be created or written (a read-only home, say)."""
    root = os.environ.get("QWEN3OMNI_CACHE_DIR")
    if root:
        return Path(root)
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen3omni"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"qwen3omni-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(compiler: str, name: str, isa: str) -> Path:
    source = CSRC / f"{name}.cpp"
    flags = FLAGS + ISA_FLAGS[isa]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{isa.lower()}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, str(source), "-o", tmp], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip()[-2000:])
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load(name: str, isa: str, entries: dict):
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler, name, isa)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"qwen3omni: the CPU kernel {name} could not be built ({err}); using the torch path",
                      stacklevel=4)
        return None
    functions = {}
    for symbol, argtypes in entries.items():
        fn = getattr(lib, symbol)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
        functions[symbol] = fn
    return functions


def _kernel(name: str, entries: dict, symbol: str):
    """Entry point `symbol` of kernel `name` (a ctypes function; `entries` gives every entry point's argument
    types), or None where it cannot run here. The first call on a machine builds the kernel (a second or two);
    later calls return what the first one found."""
    if not ENABLED:
        return None
    if name not in _loaded:
        with _lock:
            if name not in _loaded:
                isa = torch.backends.cpu.get_cpu_capability()
                _loaded[name] = _load(name, isa, entries) if isa in KERNEL_ISAS[name] else None
    return None if _loaded[name] is None else _loaded[name][symbol]


_p, _i64 = ctypes.c_void_p, ctypes.c_int64


def grouped_gemm():
    """`csrc/grouped_gemm.cpp`'s entry point, or None where it cannot run here."""
    args = [_p, _i64, _i64, _i64, _p, _p, _p, _i64, _p, _i64, _p, _p, _i64, _p, _i64, _p, ctypes.c_int]
    return _kernel("grouped_gemm", {"q3o_grouped_gemm": args}, "q3o_grouped_gemm")


class DenseLayer(ctypes.Structure):
    """`Q3oDenseLayer` of `csrc/dense_step.cpp`: one layer's weights."""

    _fields_ = [(name, _p) for name in (
        "input_norm", "q", "k", "v", "q_norm", "k_norm", "o", "post_norm", "gate", "up", "down")]


class DenseStep(ctypes.Structure):
    """`Q3oDenseStep` of `csrc/dense_step.cpp`: one call's widths, weights, cache and rows."""

    _fields_ = [
        *[(n, _i64) for n in ("layers", "C", "H", "Hk", "D", "I")], ("eps", ctypes.c_float),
        ("layer", ctypes.POINTER(DenseLayer)), ("keys", _p), ("values", _p), ("B", _i64), ("capacity", _i64),
        ("start", _i64), ("T", _i64), ("cos", _p), ("sin", _p), ("x", _p), ("final_norm", _p), ("out", _p),
        ("head", _p), ("V", _i64), ("logits", _p), ("logits_stride", _i64), ("threads", ctypes.c_int),
    ]


class GreedyFrame(ctypes.Structure):
    """`Q3oGreedyFrame` of `csrc/dense_step.cpp`: a whole greedy code predictor frame's heads, tables and outputs."""

    _fields_ = [("steps", _i64), ("heads", ctypes.POINTER(_p)), ("tables", ctypes.POINTER(_p)), ("seq", _p),
                ("cos", _p), ("sin", _p), ("codes", _p), ("logits", _p)]


_DENSE = {"q3o_dense_step": [ctypes.POINTER(DenseStep)],
          "q3o_dense_greedy_frame": [ctypes.POINTER(DenseStep), ctypes.POINTER(GreedyFrame)]}


def dense_step():
    """`csrc/dense_step.cpp`'s one-step entry point (takes a pointer to a `DenseStep`), or None where it cannot
    run here."""
    return _kernel("dense_step", _DENSE, "q3o_dense_step")


def dense_greedy_frame():
    """`csrc/dense_step.cpp`'s greedy-frame entry point (a `DenseStep` and a `GreedyFrame`), or None."""
    return _kernel("dense_step", _DENSE, "q3o_dense_greedy_frame")


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def grouped_products(
    weight_EMK: torch.Tensor,
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    x: torch.Tensor,
    cols: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    columns: int | None = None,
) -> torch.Tensor | None:
    """Per group (expert e, columns [start, start + n)): weight[e] @ the group's columns, each a row of x.

    `groups` = (experts, starts, counts), int64. Column p is x[cols[p]] with `cols` (int32), else x[p]. The
    products go to a new [columns, M] tensor (returned), or with `out` and `tokens` are added to out[tokens[p]]
    ([N, M], nothing returned).
    """
    fn = grouped_gemm()
    _, M, K = weight_EMK.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    if x.shape[0] * x.stride(0) >= 2**31:
        raise ValueError(f"x: at most 2**31 elements (the kernel's offsets are int32), got {tuple(x.shape)}")
    experts, starts, counts = groups
    c = None if out is not None else torch.empty(columns, M, dtype=x.dtype)
    status = fn(
        weight_EMK.data_ptr(), weight_EMK.stride(0), M, K, experts.data_ptr(), starts.data_ptr(), counts.data_ptr(),
        experts.numel(), x.data_ptr(), x.stride(0), _ptr(cols), _ptr(c), 0 if c is None else c.stride(0),
        _ptr(out), 0 if out is None else out.stride(0), _ptr(tokens), torch.get_num_threads(),
    )
    if status:
        raise MemoryError("qwen3omni grouped_gemm: could not allocate its panel buffers")
    return c
