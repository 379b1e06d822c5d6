"""Moving weights between the released safetensors layout and our modules.

Our state dict uses the released tensor names with one exception, the MoE experts: the checkpoint stores
`...mlp.experts.{e}.{gate,up,down}_proj.weight` per expert; we hold `...mlp.experts.gate_up_proj` [E, 2I, H]
and `...mlp.experts.down_proj` [E, H, I]. `ExpertLayout` is the only place that knows this.

Loading reads each tensor straight from the file into its final parameter (a positional read into the
parameter's memory when the dtype and device already match, through a staging buffer per reader thread
otherwise), so peak host memory is about one copy of the weights (1.05x the checkpoint, `scripts/bench.py -w F`).
Only safetensors files are read; nothing is unpickled and no code from the folder is run.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, InputError, MissingFileError

try:
    import fcntl  # folder locks for the staging cleanup (POSIX)
except ImportError:  # pragma: no cover - Windows
    fcntl = None

INDEX_FILE = "model.safetensors.index.json"
_PREADV = hasattr(os, "preadv")  # positional reads: several threads can read one open file
SINGLE_FILE = "model.safetensors"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


# ---- the one conversion rule ------------------------------------------------------------------------------
class ExpertLayout:
    """Per-expert tensors on disk <-> stacked expert tensors in memory."""

    disk = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
    ours = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<param>gate_up_proj|down_proj)$")

    @classmethod
    def export(cls, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Our tensor -> the released tensors it stands for (views; works on meta tensors)."""
        m = cls.ours.match(name)
        if m is None:
            return {name: tensor}
        prefix, out = m["prefix"], {}
        for e in range(tensor.shape[0]):
            if m["param"] == "down_proj":
                out[f"{prefix}.{e}.down_proj.weight"] = tensor[e]
            else:
                gate, up = tensor[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate
                out[f"{prefix}.{e}.up_proj.weight"] = up
        return out

    @classmethod
    def destination(cls, state: dict[str, torch.Tensor], disk_name: str) -> torch.Tensor | None:
        """The view of our tensors that the released tensor `disk_name` fills, or None if we have no such tensor."""
        m = cls.disk.match(disk_name)
        if m is None:
            return state.get(disk_name)
        e, proj = int(m["expert"]), m["proj"]
        if proj == "down_proj":
            stacked = state.get(f"{m['prefix']}.down_proj")
            return None if stacked is None or e >= stacked.shape[0] else stacked[e]
        stacked = state.get(f"{m['prefix']}.gate_up_proj")
        if stacked is None or e >= stacked.shape[0]:
            return None
        gate, up = stacked[e].chunk(2, dim=0)
        return gate if proj == "gate_proj" else up


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict renamed and split into the released layout (views of our tensors; works on meta)."""
    out = {}
    for name, tensor in model.state_dict().items():
        out.update(ExpertLayout.export(name, tensor))
    return out


# PEFT wraps each target `nn.Linear` as `<name>.base_layer` + `<name>.lora_A/B.<adapter>` (and keeps
# `modules_to_save` copies beside `original_module`): names that neither our loader nor transformers read.
_ADAPTER_PARTS = {"base_layer", "original_module", "modules_to_save"}


def _is_adapter_name(name: str) -> bool:
    return any(part in _ADAPTER_PARTS or part.startswith("lora_") for part in name.split("."))


def refuse_adapters(names: Iterable[str]) -> None:
    """Raise if some tensor names come from PEFT adapters still attached: saved as they are, they give a folder
    in no released layout, which neither `from_pretrained` nor transformers can load."""
    wrapped = [n for n in names if _is_adapter_name(n)]
    if wrapped:
        raise InputError(
            f"model: {len(wrapped)} tensor(s) belong to PEFT adapters that are still attached (e.g. {wrapped[0]!r}); "
            "expected a model in the released layout: merge the adapters first (peft_model.merge_and_unload()), "
            "or save the adapters alone with PeftModel.save_pretrained"
        )


# ---- reading safetensors ----------------------------------------------------------------------------------
class SafetensorsFile:
    """A safetensors file read by header + offsets, one tensor at a time, straight into a destination."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(f"checkpoint shard {str(self.path)!r} does not exist")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (header of {n} bytes, file {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: unreadable safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: the safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = header
        for name, entry in header.items():
            self._check_entry(name, entry)
            end = self.data_start + entry["data_offsets"][1]
            if end > size:
                raise CheckpointError(
                    f"{self.path}: truncated safetensors file: tensor {name!r} ends at byte {end}, file has {size}"
                )

    def _check_entry(self, name: str, entry) -> None:
        """A header entry names a known dtype, an integer shape and byte offsets that fit that shape."""
        bad = f"{self.path}: tensor {name!r} has a malformed header entry {entry!r}"
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
            raise CheckpointError(bad if not isinstance(entry, dict) else
                                  f"{self.path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and x >= 0 for x in xs)  # noqa: E731
        if not ints(shape) or not ints(offsets) or len(offsets) != 2 or offsets[1] < offsets[0]:
            raise CheckpointError(bad)
        numel = math.prod(shape)
        if offsets[1] - offsets[0] != numel * _DTYPES[entry["dtype"]].itemsize:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} of shape {shape} ({entry['dtype']}) spans "
                f"{offsets[1] - offsets[0]} bytes, expected {numel * _DTYPES[entry['dtype']].itemsize}"
            )

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self.entries[name]["dtype"]]

    def read_into(self, name: str, dest: torch.Tensor, fd: int, staging, first_row: int = 0) -> None:
        """Fill `dest` (contiguous, right shape) with tensor `name`, converting dtype/device if needed; with
        `first_row`, `dest` holds `dest.shape[0]` consecutive rows (dim 0) from that row on (a rank's shard).

        Reads with `os.preadv` at the tensor's offset (no shared file position), so several threads can fill
        different tensors from one open file; `staging` is the calling thread's scratch (an object whose `buf`
        attribute holds a reusable byte buffer for tensors that need a dtype or device conversion).
        """
        begin, end = self.entries[name]["data_offsets"]
        src_dtype = self.dtype(name)
        shape = self.shape(name)
        row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
        offset = self.data_start + begin + first_row * row_bytes
        nbytes = dest.numel() * src_dtype.itemsize
        if offset + nbytes > self.data_start + end:
            raise CheckpointError(f"{self.path}: rows {first_row}.. of {name!r} {shape} do not fit {list(dest.shape)}")
        if dest.device.type == "cpu" and dest.dtype == src_dtype and dest.is_contiguous():
            self._read_exact(fd, dest.view(-1).view(torch.uint8), offset, nbytes, name)
            return
        buf = getattr(staging, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = staging.buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        view = buf[:nbytes]
        self._read_exact(fd, view, offset, nbytes, name)
        dest.copy_(view.view(src_dtype).view(dest.shape))

    def _read_exact(self, fd: int, dest_bytes: torch.Tensor, offset: int, nbytes: int, name: str) -> None:
        out, done = memoryview(dest_bytes.numpy()), 0
        reader = None if _PREADV else io.FileIO(fd, closefd=False)  # no preadv (Windows): one reader thread
        while done < nbytes:  # one read returns at most ~2 GB on Linux
            if reader is None:
                n = os.preadv(fd, [out[done:nbytes]], offset + done)
            else:
                reader.seek(offset + done)
                n = reader.readinto(out[done:nbytes])
            if not n:
                raise CheckpointError(f"{self.path}: short read for tensor {name!r}")
            done += n


def checkpoint_files(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> shard path for a folder with `model.safetensors` or a sharded index."""
    folder = Path(folder)
    if folder.is_file():
        raise MissingFileError(
            f"checkpoint folder: expected a folder, got the file {str(folder)!r}; pass the folder that holds it "
            f"({str(folder.parent)!r})"
        )
    if not folder.is_dir():
        raise MissingFileError(f"checkpoint folder {str(folder)!r} does not exist")
    index = folder / INDEX_FILE
    if index.is_file():
        files = {name: folder / f for name, f in _read_weight_map(index).items()}
        _check_index_against_shards(index, files)
        return files
    single = folder / SINGLE_FILE
    if single.is_file():
        return {name: single for name in SafetensorsFile(single).entries}
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(f"{folder}: only safetensors checkpoints are read (found pickle files, not loaded)")
    raise MissingFileError(f"checkpoint folder {str(folder)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _read_weight_map(index: Path) -> dict[str, str]:
    """The index's weight_map, checked to map tensor names to shard file names of the folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index}: weight_map must be a JSON object of tensor name -> shard file, got {type(weight_map).__name__}"
        )
    # Plain file names only: an index must not send the reader to files outside its folder.
    bad = [(n, f) for n, f in weight_map.items() if not isinstance(f, str) or not f or Path(f).name != f]
    if bad:
        raise CheckpointError(
            f"{index}: weight_map must map each tensor to a shard file name in the folder; got "
            + ", ".join(f"{n!r}: {f!r}" for n, f in bad[:5]) + (" ..." if len(bad) > 5 else "")
        )
    missing = sorted({f for f in weight_map.values() if not (index.parent / f).is_file()})
    if missing:
        raise CheckpointError(f"{index} names shard(s) that are not in the folder: {missing}")
    return weight_map


def _check_index_against_shards(index: Path, files: dict[str, Path]) -> None:
    """Every tensor is in the shard the index names: a stale index (shards edited or replaced by hand) would
    otherwise fail deep inside a read, or let a merge silently skip a tensor."""
    held = {path: SafetensorsFile(path).entries for path in sorted(set(files.values()))}
    stale = [(n, p.name) for n, p in files.items() if n not in held[p]]
    if stale:
        raise CheckpointError(
            f"{index} is stale: {len(stale)} tensor(s) are not in the shard it names: "
            + ", ".join(f"{n} (-> {f})" for n, f in stale[:8]) + (" ..." if len(stale) > 8 else "")
        )


# ---- materialising a meta model ---------------------------------------------------------------------------
class _NoRandomInitOnMeta(torch.overrides.TorchFunctionMode):
    """In-place random fills of meta tensors return at once: a meta tensor has no values to fill."""

    FILLS = frozenset({
        torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.random_, torch.Tensor.bernoulli_,
        torch.Tensor.exponential_, torch.Tensor.log_normal_, torch.Tensor.cauchy_, torch.Tensor.geometric_,
        # torch.nn.init's functions dispatch as themselves first
        *(getattr(torch.nn.init, name) for name in ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_",
                                                     "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
                                                     "orthogonal_", "sparse_")),
    })

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FILLS:
            tensor = args[0] if args else kwargs.get("tensor")  # (torch.nn.init passes it by keyword)
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta():
    """Build modules on the meta device (shapes only, no storage), skipping their random initialisations.
    Some initialisers (nn.Embedding's normal_) run a meta tensor through Python reference implementations that
    import torch._dynamo on first use: ~1 s of a fresh process's `from_pretrained`, for values never used."""
    with torch.device("meta"), _NoRandomInitOnMeta():
        yield


def materialize(model: nn.Module, device, dtype: torch.dtype | None) -> None:
    """Give a model built on `meta` real (uninitialised) storage: one allocation per tensor, final dtype."""
    if dtype is not None:
        model.to(dtype)
    devices = device if isinstance(device, dict) else None
    if devices is None:
        _to_empty(model, device or "cpu")
    else:
        for name, child in model.named_children():
            _to_empty(child, devices.get(name, "cpu"))
    reset_buffers(model)


def _to_empty(module: nn.Module, device) -> None:
    """`module.to_empty(device=device)` by plain `torch.empty` of each tensor's shape: `to_empty`'s `empty_like`
    of a meta tensor runs a Python reference that imports sympy on first use (~0.4 s of a fresh process)."""
    module._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def reset_buffers(model: nn.Module) -> None:
    """Recompute the derived buffers (rotary tables, position tables) of a model materialised from `meta`."""
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset()


def load_state(
    model: nn.Module,
    folder: str | Path,
    prefixes: Iterable[str] | None = None,
    strict: bool = True,
    progress: bool | None = None,
) -> None:
    """Fill `model`'s tensors from the checkpoint in `folder`.

    `prefixes` limits which released tensors are considered (e.g. ("thinker.",) for a thinker-only load);
    the others are skipped unread. With `strict`, any missing, unexpected or mis-shaped tensor raises a
    `CheckpointError` listing them all before anything is read.
    """
    state = model.state_dict()
    _read_checkpoint(model, folder, prefixes, strict, progress, lambda name: (ExpertLayout.destination(state, name), 0))


def load_state_sharded(
    model: nn.Module, folder: str | Path, prefixes: Iterable[str] | None = None, strict: bool = True
) -> None:
    """`load_state` for a model whose parameters are dim-0 sharded DTensors (after `fully_shard` on a model
    built on `meta` and `to_empty`): each rank reads only the rows it holds (for stacked experts, only its
    experts' tensors), so no rank ever holds more than its shard. Buffers and unsharded tensors are read whole."""
    local = {name: _local_rows(t) for name, t in model.state_dict().items()}
    _read_checkpoint(model, folder, prefixes, strict, False, lambda name: _shard_destination(local, name))


Destination = Callable[[str], tuple[torch.Tensor | None, int]]


def _read_checkpoint(
    model: nn.Module, folder, prefixes, strict: bool, progress: bool | None, destination: Destination
) -> None:
    """Check the checkpoint against the model's released names and shapes, then read every wanted tensor into
    `destination(name)` = (where it goes, from which of its rows; None: not here)."""
    files = checkpoint_files(folder)
    keep = tuple(prefixes) if prefixes is not None else None
    wanted = {n: p for n, p in files.items() if keep is None or n.startswith(keep)}
    expected = {}  # released name -> shape, from the shapes alone (works for meta, real and sharded tensors)
    for name, tensor in model.state_dict().items():
        for disk, part in ExpertLayout.export(name, torch.empty(tensor.shape, device="meta")).items():
            expected[disk] = list(part.shape)
    headers = {p: SafetensorsFile(p) for p in sorted(set(wanted.values()))}
    _check_names(expected, wanted, headers, strict)
    by_file: dict[Path, list[str]] = {}
    for name, path in wanted.items():
        if name in expected:
            by_file.setdefault(path, []).append(name)
    total = sum(p.stat().st_size for p in by_file)
    show = progress if progress is not None else total > 2**30
    items = sorted(by_file.items())
    if show:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="Loading checkpoint shards", unit="shard")
    # Tensors of a shard are read by a few threads at once (`preadv` releases the GIL): page faults on the
    # fresh destination memory and the copy out of the page cache then overlap (~2x faster on 2 cores). Each
    # thread keeps its own staging buffer, so converting loads hold at most `workers` tensors extra.
    workers = max(1, min(4, os.cpu_count() or 1)) if _PREADV else 1
    staging = threading.local()

    def read(shard: SafetensorsFile, fd: int, name: str) -> None:
        dest, first_row = destination(name)
        if dest is not None and dest.numel():
            with torch.no_grad():
                shard.read_into(name, dest, fd, staging, first_row)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for path, names in items:
            shard = headers[path]
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            try:
                ordered = sorted(names, key=lambda n: shard.entries[n]["data_offsets"][0])
                for future in [pool.submit(read, shard, fd, name) for name in ordered]:
                    future.result()
            finally:
                os.close(fd)


# ---- loading into a sharded model (FSDP2) ------------------------------------------------------------------
def _local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's part, index of its first row): a dim-0 sharded DTensor's local chunk, or the whole tensor."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(tensor, DTensor):
        return tensor, 0
    if tuple(tensor.placements) != (Shard(0),):
        raise CheckpointError(f"sharded load: expected parameters sharded on dim 0, got {tensor.placements}")
    local = tensor.to_local()
    chunk = -(-tensor.shape[0] // tensor.device_mesh.size())  # torch.chunk's split, as FSDP2 shards
    start = min(tensor.device_mesh.get_local_rank() * chunk, tensor.shape[0])
    if local.shape[0] != max(0, min(chunk, tensor.shape[0] - start)):
        raise CheckpointError(f"sharded load: unexpected local shard {list(local.shape)} of {list(tensor.shape)}")
    return local, start


def _shard_destination(local: dict, disk_name: str) -> tuple[torch.Tensor | None, int]:
    """Where this rank puts released tensor `disk_name`, and from which of its rows (None: not on this rank)."""
    m = ExpertLayout.disk.match(disk_name)
    if m is None:
        return local[disk_name]
    e, proj = int(m["expert"]), m["proj"]
    rows, start = local[f"{m['prefix']}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"]
    if not start <= e < start + rows.shape[0]:
        return None, 0
    if proj == "down_proj":
        return rows[e - start], 0
    gate, up = rows[e - start].chunk(2, dim=0)
    return (gate if proj == "gate_proj" else up), 0


def _check_names(expected: dict, wanted: dict, headers: dict, strict: bool) -> None:
    problems = []
    missing = sorted(set(expected) - set(wanted))
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): " + _listing((n, expected[n], None) for n in missing))
    unexpected = sorted(set(wanted) - set(expected))
    if unexpected and strict:
        problems.append(
            f"{len(unexpected)} unexpected tensor(s): "
            + _listing((n, None, headers[wanted[n]].shape(n)) for n in unexpected)
        )
    mismatched = []
    for name in sorted(set(wanted) & set(expected)):
        shard = headers[wanted[name]]
        if shard.shape(name) != expected[name]:
            mismatched.append((name, expected[name], shard.shape(name)))
        elif not shard.dtype(name).is_floating_point:
            mismatched.append((name, "a floating-point tensor", f"{shard.dtype(name)}"))
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) of the wrong shape or dtype: " + _listing(mismatched))
    if problems and (strict or missing or mismatched):
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))


def _listing(rows, limit: int = 12) -> str:
    rows = list(rows)
    parts = []
    for name, want, got in rows[:limit]:
        said = (want is not None and f"expected {want}", got is not None and f"found {got}")
        detail = ", ".join(x for x in said if x)
        parts.append(f"{name} ({detail})" if detail else name)
    more = f" ... and {len(rows) - limit} more" if len(rows) > limit else ""
    return ", ".join(parts) + more


# ---- saving ------------------------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB' / '500MiB'; at least one byte (a zero, negative or fractional
    size would otherwise put every tensor in a shard of its own)."""
    expected = "a positive int of bytes or a string like '5GB'"
    if isinstance(size, int) and not isinstance(size, bool):
        nbytes = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
        if m is None:
            raise InputError(f"max_shard_size: expected {expected}, got {size!r}")
        unit = (m[2] or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
        nbytes = int(float(m[1]) * scale)
    else:
        raise InputError(f"max_shard_size: expected {expected}, got {size!r}")
    if nbytes < 1:
        raise InputError(f"max_shard_size: expected {expected}, got {size!r} ({nbytes} bytes)")
    return nbytes


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current:
        shards.append(current)
    return shards


def save_checkpoint(
    tensors: dict[str, torch.Tensor], out_dir: str | Path, config: dict, max_shard_size: int | str = "5GB",
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write `tensors` (released names) + `config.json` to `out_dir` atomically.

    Everything goes into a temporary sibling folder that replaces `out_dir` only once complete, so an
    interrupted save leaves an existing checkpoint at `out_dir` as it was (a hard kill can leave the hidden
    `.NAME.tmp-*` sibling behind; the next save of `out_dir` on that host deletes it, see `staging`).
    Everything else in an existing `out_dir` -- files and subfolders (tokenizer, chat template, logs) -- is kept;
    only the weights and index of an earlier save there are replaced. A symlinked `out_dir` is updated through
    the link.
    """
    refuse_adapters(tensors)
    on_meta = [n for n, t in tensors.items() if t.is_meta]
    if on_meta:
        raise InputError(
            f"model: {len(on_meta)} tensor(s) are on the meta device and hold no data (e.g. {on_meta[0]!r}); "
            "expected a materialised model (load it with from_pretrained or call checkpoint.materialize)"
        )
    limit = parse_size(max_shard_size)
    out_dir = prepare_out_dir(out_dir)
    with staging(out_dir) as tmp:
        _write_checkpoint(tensors, tmp, out_dir, config, limit, extra_files)


def _write_checkpoint(tensors, tmp: Path, out_dir: Path, config: dict, limit: int, extra_files) -> None:
    from safetensors.torch import save_file

    try:
        groups = _shards(tensors, limit)
        weight_map = {}
        for i, names in enumerate(groups, 1):
            fname = SINGLE_FILE if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            # Clone: expert views share storage, which safetensors refuses; one shard is in memory at a time.
            shard = {n: tensors[n].detach().to("cpu").contiguous().clone() for n in names}
            save_file(shard, tmp / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, fname))
            del shard
        if len(groups) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_out_dir(out_dir: str | Path) -> Path:
    """The real folder a save replaces, its parent created. Resolved: a save swaps folders in the parent, so a
    symlink must lead to its target (the link then keeps pointing at the new folder) and '.' to a named folder."""
    if not isinstance(out_dir, (str, os.PathLike)):
        raise InputError(f"out_dir: expected a folder path (str or Path), got {type(out_dir).__name__}")
    path = Path(out_dir).resolve()
    if path.exists() and not path.is_dir():
        raise InputError(f"out_dir: {str(out_dir)!r} exists and is not a folder")
    if path.parent == path or os.path.ismount(path):
        raise InputError(
            f"out_dir: {str(out_dir)!r} is a filesystem root or mount point, which a save cannot replace; "
            "expected a folder inside it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def staging(out_dir: Path):
    """A fresh hidden sibling of `out_dir` to write a save into, `.NAME.tmp-HOST-PID-XXXXXXXX`, locked (an
    exclusive `flock` on the folder) until the block ends.

    A save killed hard (OOM killer, preemption) cannot delete its staging folder, nor, once it has swapped the
    new folder in, the old one (`.NAME.old-HOST-PID-*`), and either holds a full checkpoint, tens of GB. So
    each save first deletes the folders of both kinds that earlier saves of `out_dir` left on this host whose
    process has ended (the host and process id in the name tell; folders of live processes, of other hosts
    sharing the filesystem, and of older versions without those fields are left alone). The lock covers what the
    name cannot: two containers given the same host name see each other's process ids as ended, but a folder
    whose save is still running stays locked, and a locked folder is never deleted. (Where folders cannot be
    locked, the name decides alone.) Only while `out_dir` itself exists: a save killed between its two renames
    leaves `out_dir` missing, the old contents in the `.old-` folder and the new ones in the staging folder, all
    kept for the user to recover.
    """
    host, pid = _host_tag(), os.getpid()
    if out_dir.is_dir():
        for stale in _stale_staging_dirs(out_dir, host):
            _delete_unless_locked(stale)
    # Made under a name no cleanup matches, locked, then renamed: there is no moment at which another save
    # could take it for a stale folder.
    fresh = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new-{host}-{pid}-", dir=out_dir.parent))
    lock = _lock_folder(fresh, wait=True)
    try:
        tmp = fresh.with_name(fresh.name.replace(".new-", ".tmp-", 1))
        os.replace(fresh, tmp)
        yield tmp
    finally:
        if lock is not None:
            os.close(lock)


def _lock_folder(folder: Path, wait: bool) -> int | None:
    """An open descriptor of `folder` holding an exclusive flock on it (closing it releases the lock), or None
    where this platform or filesystem cannot lock folders. Without `wait`, BlockingIOError if it is held."""
    if fcntl is None:
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # ENOLCK, EINVAL: no folder locks on this filesystem
        os.close(fd)
        return None
    return fd


def _delete_unless_locked(folder: Path) -> None:
    try:
        lock = _lock_folder(folder, wait=False)
    except BlockingIOError:  # its save is running (in a process this one cannot see)
        return
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        if lock is not None:
            os.close(lock)


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _stale_staging_dirs(out_dir: Path, host: str) -> list[Path]:
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(?:tmp|old)-{re.escape(host)}-(\d+)-[A-Za-z0-9_]+$")
    stale = []
    for item in out_dir.parent.iterdir():
        m = pattern.match(item.name)
        if m and item.is_dir() and not item.is_symlink() and not _process_alive(int(m[1])):
            stale.append(item)
    return stale


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (PermissionError), or a platform without signals: keep its folder
        return True
    return True


# The files a save writes or makes stale: weights of an earlier save with another shard count, and its index.
_WEIGHT_FILE = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")


def is_weight_file(name: str) -> bool:
    return name == INDEX_FILE or _WEIGHT_FILE.match(name) is not None


def commit_dir(new: Path, out_dir: Path) -> None:
    """Swap the finished folder `new` in for `out_dir` (resolved, see `prepare_out_dir`), keeping everything
    of the old folder that the save neither wrote nor made stale."""
    _carry_other_entries(out_dir, new)
    cwd = _cwd_within(out_dir)
    _replace_dir(new, out_dir)
    if cwd is not None:  # the process was inside the old folder, now deleted: step into its replacement
        os.chdir(cwd)


def _carry_other_entries(old: Path, new: Path) -> None:
    """Put every file and subfolder of `old` that `new` lacks (model weights and index excepted) into `new`.

    Files are hard-linked (copied where the filesystem has no links), so this costs almost nothing and the old
    folder stays untouched until the swap: an interrupted save loses nothing.
    """
    if not old.is_dir():
        return
    for item in old.iterdir():
        target = new / item.name
        if target.exists() or target.is_symlink() or is_weight_file(item.name):
            continue
        if item.is_symlink():
            os.symlink(os.readlink(item), target)
        elif item.is_dir():
            shutil.copytree(item, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(item, target)


def _link_or_copy(src, dst) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return str(dst)


def _cwd_within(folder: Path) -> Path | None:
    try:
        cwd = Path.cwd()
    except FileNotFoundError:
        return None
    return cwd if cwd == folder or folder in cwd.parents else None


def _replace_dir(new: Path, target: Path) -> None:
    if not target.exists():
        os.replace(new, target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{_host_tag()}-{os.getpid()}-", dir=target.parent))
    backup.rmdir()
    try:  # the old folder stays locked under its backup name until it is deleted (see `staging`)
        lock = _lock_folder(target, wait=False)
    except BlockingIOError:  # a save still holds it: go on without (it is ours to replace either way)
        lock = None
    try:
        os.replace(target, backup)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(backup, target)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    finally:
        if lock is not None:
            os.close(lock)
