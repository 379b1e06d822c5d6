"""`AheadOfTimeStep`: a decoder layer's one-token, static-cache decode step compiled ahead of time (CPU).

A torch.compile'd layer call on a CPU spends about as long in dynamo's per-call bookkeeping (evaluating ~200
guards, entering the compiled frame, running the graph's Python wrapper) as in its kernels: ~190 us a call at
workload C's widths, of which ~95 us is that bookkeeping. AOTInductor compiles the same layer once, through
torch.export into a shared library with a C++ runner, and a call is then the runner alone (measured: compiled
workload C ~19% faster per token, the same tokens).

What dynamo's guards checked on every call, this step checks itself, cheaply: the layer must have no forward
hooks (checked every call) and, once any module anywhere has been assigned a parameter or a submodule since
the last look, still the submodules, parameter objects, training flags and plain attribute values it had when
the step was built. A layer that fails the check runs eagerly, hooks included (torch.compile'd steps run no
forward hooks of a layer's modules). A call the step was not built for (a first step of several tokens, no
static cache, gradients recorded) runs the torch.compile'd step. Settings changed without any assignment of a
parameter or submodule afterwards (say `experts.dispatch`) are not looked at again: call `compile_decode_step`
again after such a change. Parameters are inputs of the compiled library (not baked in), so one library serves
every layer of a stack, and weights updated in place are seen. A library is built per batch size and dtype on
first use (measured: 9 s for workload C's stack, 15 s for D's talker and code predictor together).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .kv_cache import LayerKV

_SIMPLE = (bool, int, float, str, type(None))

# Bumped whenever any module anywhere gets a parameter or a submodule assigned (torch's global registration
# hooks, installed by the first AheadOfTimeStep): a built step re-checks its layer's structure only then.
_assignments = [0]
_watching = False


def _count_assignment(*_):
    _assignments[0] += 1


def _watch_assignments() -> None:
    global _watching
    if not _watching:
        nn.modules.module.register_module_parameter_registration_hook(_count_assignment)
        nn.modules.module.register_module_module_registration_hook(_count_assignment)
        _watching = True


class _LayerShape:
    """What a built step assumes about a layer: its modules, their parameters, plain settings and no hooks."""

    def __init__(self, layer: nn.Module):
        named = list(layer.named_modules())
        self.modules = [m for _, m in named]
        self.children = [tuple(m._modules.values()) for m in self.modules]
        self.slots = [(m, name) for _, m in named for name, p in m._parameters.items() if p is not None]
        self.names = [f"{prefix}.{name}".lstrip(".") for prefix, m in named
                      for name, p in m._parameters.items() if p is not None]
        self.params = [m._parameters[name] for m, name in self.slots]
        # the plain attribute values (the training flag, strings, numbers) a forward may branch on
        self.settings = [(m, k, v) for m in self.modules for k, v in vars(m).items()
                         if not k.startswith("_") and isinstance(v, _SIMPLE)]
        self.seen = _assignments[0]
        self.hooks = hook_tables(layer)  # one any() per call

    def unchanged(self) -> bool:
        """No hooks (checked every call), and, when any module was assigned a parameter or a submodule since
        the last look, still the same submodules, parameter objects and settings."""
        if any(self.hooks):
            return False
        if self.seen == _assignments[0]:
            return True
        same = (
            all(tuple(m._modules.values()) == c for m, c in zip(self.modules, self.children))
            and all(m._forward_hooks is self.hooks[2 + 2 * i] and m._forward_pre_hooks is self.hooks[3 + 2 * i]
                    for i, m in enumerate(self.modules))
            and all(m._parameters.get(name) is p for (m, name), p in zip(self.slots, self.params))
            and all(getattr(m, k, _MISSING) == v for m, k, v in self.settings)
        )
        if same:
            self.seen = _assignments[0]
        return same


_MISSING = object()


def hook_tables(layer: nn.Module) -> list[dict]:
    """The forward (pre-)hook tables a call of `layer` would consult: global ones, then each module's. They stay
    the same dict objects as hooks come and go, so one `any()` over them per call says whether hooks would run."""
    glob = nn.modules.module
    tables = [glob._global_forward_hooks, glob._global_forward_pre_hooks]
    return tables + [d for m in layer.modules() for d in (m._forward_hooks, m._forward_pre_hooks)]


class EagerWhenHooked:
    """Callable as `run_layer(layer, x, rope, mask, kv)`: the torch.compile'd step `compiled` for a layer that
    has no forward hooks, the eager layer (its hooks run) for one that has (on any of its modules, or global
    ones). torch.compile'd steps do not run hooks; with this a hook registered during compiled decoding fires
    as it would in eager decoding. Costs one `any()` over the layer's hook tables per call; the tables are
    listed again after any module anywhere is assigned a parameter or a submodule (a new module brings new
    tables)."""

    def __init__(self, layers: nn.ModuleList, compiled):
        _watch_assignments()
        self.layers, self.compiled = layers, compiled
        self._list_tables()

    def _list_tables(self) -> None:
        self.seen = _assignments[0]
        self.tables = {id(layer): hook_tables(layer) for layer in self.layers}

    def __call__(self, layer, x, rope, mask, kv):
        if self.seen != _assignments[0]:
            self._list_tables()
        tables = self.tables.get(id(layer))
        if tables is None or any(tables):
            return layer(x, rope, mask, kv)
        return self.compiled(layer, x, rope, mask, kv)


class _Exported(nn.Module):
    """The layer as a function of tensors only: activations, rotary tables, mask, cache buffers, parameters."""

    def __init__(self, layer: nn.Module, names: list[str]):
        super().__init__()
        self.layer, self.names = layer, names

    def forward(self, x, cos, sin, mask, keys, values, position, *params):
        kv = LayerKV(keys, values, 0, position)
        out, logits = torch.func.functional_call(self.layer, dict(zip(self.names, params)), (x, (cos, sin), mask, kv))
        return (out,) if logits is None else (out, logits)


class AheadOfTimeStep:
    """Callable as `run_layer(layer, x, rope, mask, kv)`: the AOTInductor library where it applies, else
    `fallback` (the stack's torch.compile'd step)."""

    def __init__(self, layers: nn.ModuleList, fallback, inductor_options: dict | None = None):
        _watch_assignments()
        self.fallback = fallback
        self.inductor_options = dict(inductor_options or {})
        self.shapes = {id(layer): _LayerShape(layer) for layer in layers}
        self.runners: dict[tuple, object] = {}  # (batch, mask batch, dtype) -> runner, or None where building failed
        self._dir = None  # where the builds go, made on the first one

    def __getstate__(self):  # the runners are native handles; a copy rebuilds them on use
        state = self.__dict__.copy()
        state["runners"], state["_dir"] = {}, None
        return state

    def __call__(self, layer, x, rope, mask, kv):
        shape = self.shapes.get(id(layer))
        if shape is not None and not shape.unchanged():
            return layer(x, rope, mask, kv)  # eager, which runs hooks (torch.compile'd steps do not)
        applies = (
            x.shape[1] == 1 and kv is not None and kv.position is not None and mask is not None
            and mask.shape[-1] >= 2 and not torch.is_grad_enabled() and x.device.type == "cpu"
        )
        if shape is None or not applies:
            return self.fallback(layer, x, rope, mask, kv)
        key = (x.shape[0], mask.shape[0], x.dtype)
        if key not in self.runners:
            self.runners[key] = self._build(layer, x, rope, mask, kv, shape)
        runner = self.runners[key]
        if runner is None:
            return self.fallback(layer, x, rope, mask, kv)
        cos, sin = (t.contiguous() for t in rope)
        out = runner(x.contiguous(), cos, sin, mask.contiguous(), kv.keys, kv.values, kv.position, *shape.params)
        return out[0], (out[1] if len(out) > 1 else None)

    def _build(self, layer, x, rope, mask, kv, shape: _LayerShape):
        names = shape.names
        args = (x.contiguous(), *(t.contiguous() for t in rope), mask.contiguous(), kv.keys, kv.values, kv.position,
                *shape.params)
        capacity = torch.export.Dim("capacity", min=2)
        dynamic = (None, None, None, {3: capacity}, {2: capacity}, {2: capacity}, None, tuple(None for _ in names))
        try:
            program = torch.export.export(_Exported(layer, names), args, dynamic_shapes=dynamic, strict=False)
            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="qwen3omni-aot-")
            path = Path(self._dir.name) / f"layer_{len(self.runners)}.pt2"
            package = torch._inductor.aoti_compile_and_package(
                program, package_path=str(path), inductor_configs=self.inductor_options
            )
            return torch._inductor.aoti_load_package(package)
        except Exception as err:  # noqa: BLE001 - any export/compile failure: the torch.compile'd step stands in
            warnings.warn(f"ahead-of-time decode step not built ({type(err).__name__}: {str(err)[:200]}); "
                          "using the torch.compile'd step", RuntimeWarning, stacklevel=3)
            return None
