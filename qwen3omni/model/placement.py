"""Where each component lives, and moving activations to it where components meet.

`Qwen3Omni.from_pretrained(device=...)` takes one device for the whole model or a dict per component, e.g.
{"thinker": "cuda:0", "talker": "cuda:1", "code2wav": "cuda:1"} (the thinker alone is ~60 GB in bf16; the
talker and Code2Wav fit next to it on a second card). Each component then runs on its own device, and the code
that passes activations from one to the next (thinker states -> talker, codes -> Code2Wav, audio -> the caller)
moves them with `to_device(x, device_of(component))`, which is free when they already share a device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..errors import InputError, expect_device

COMPONENTS = ("thinker", "talker", "code2wav")


def resolve_devices(device, components: Iterable[str]) -> dict[str, torch.device]:
    """One torch.device per loaded component from `device` (None, a device, or a dict by component name).

    A dict must name every loaded component; names of components that are not loaded are ignored (so one
    mapping serves full and thinker-only loads), and unknown names are an error.
    """
    components = tuple(components)
    if not isinstance(device, Mapping):
        one = expect_device("cpu" if device is None else device, "device")
        return dict.fromkeys(components, one)
    unknown = sorted(set(device) - set(COMPONENTS), key=repr)  # keys may be of any type
    if unknown:
        raise InputError(f"device: unknown component(s) {unknown}; expected keys among {list(COMPONENTS)}")
    missing = [c for c in components if c not in device]
    if missing:
        raise InputError(
            f"device: no device given for loaded component(s) {missing}; got {dict(device)!r}. Name every loaded "
            f"component ({list(components)}) or load fewer with components=..."
        )
    return {c: expect_device(device[c], f"device[{c!r}]") for c in components}


def device_of(module: nn.Module | None) -> torch.device:
    """The device of a module's first parameter (or buffer); CPU for a module without tensors or None."""
    if module is None:
        return torch.device("cpu")
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def dtype_of(module: nn.Module) -> torch.dtype:
    """The floating dtype of a module's first floating parameter (float32 if none)."""
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def to_device(value, device: torch.device | str, non_blocking: bool = False):
    """`value` with every tensor in it (a tensor, or tuples, lists and dicts of them) moved to `device`.

    Tensors already there are returned as they are (no copy).
    """
    device = torch.device(device)
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device, non_blocking=non_blocking)
    if isinstance(value, tuple):
        return tuple(to_device(v, device, non_blocking) for v in value)
    if isinstance(value, list):
        return [to_device(v, device, non_blocking) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device, non_blocking) for k, v in value.items()}
    return value


def placement(model: nn.Module) -> dict[str, torch.device]:
    """{component: device} for the components a `Qwen3Omni` holds."""
    return {c: device_of(getattr(model, c)) for c in COMPONENTS if getattr(model, c, None) is not None}


def unmaterialized(model: nn.Module) -> list[str]:
    """Names of parameters and buffers still on the meta device (empty after a complete load)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in tensors if t.is_meta]
