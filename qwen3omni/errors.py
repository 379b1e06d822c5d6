"""The library's typed errors.

Every error a user can trigger with bad input is one of these. Each is a `ValueError` (or
`FileNotFoundError`) so generic handlers keep working, and each message names the argument, the value
received and what was expected.
"""

from __future__ import annotations


class Qwen3OmniError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(Qwen3OmniError, ValueError):
    """A configuration file or dict is missing a field, or a field has the wrong type or value."""


class CheckpointError(Qwen3OmniError, ValueError):
    """A checkpoint on disk does not match the model: missing, unexpected or mis-shaped tensors, bad files."""


class InputError(Qwen3OmniError, ValueError):
    """An argument of a public entry point is invalid (wrong shape, range, type or content)."""


class MissingFileError(Qwen3OmniError, FileNotFoundError):
    """A file or folder the user pointed at does not exist."""


class MissingDependencyError(Qwen3OmniError, ImportError):
    """An optional package a call needs is not installed (e.g. PyAV for video files); the message says which."""


def describe(value, limit: int = 80) -> str:
    """A short printable form of `value` for error messages (tensors by shape and dtype, not contents)."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{type(value).__name__}(shape={list(shape)}, dtype={dtype})"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def expect_int(value, name: str, least: int | None = None) -> int:
    """`value` as an int (bools and floats refused), at least `least`; else an InputError naming `name`."""
    import numbers

    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise InputError(f"{name}: expected an integer{'' if least is None else f' >= {least}'}, got {describe(value)}")
    if least is not None and value < least:
        raise InputError(f"{name}: must be >= {least}, got {value!r}")
    return int(value)


def expect_device(value, name: str):
    """`value` as a torch.device that exists here (an unavailable CUDA index is refused up front rather than
    failing later inside a copy); else an InputError naming `name`."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        expected = "a device such as 'cpu', 'cuda' or 'cuda:1'"
        raise InputError(f"{name}: expected {expected}, got {describe(value)}") from None
    if device.type == "meta":  # holds no data: a "loaded" model would have no weights
        raise InputError(f"{name}: expected a device that holds data, got {describe(value)}")
    if device.type != "cpu":  # an unavailable backend is refused here, not deep inside a copy
        backend = getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        count_of = getattr(backend, "device_count", None)
        count = count_of() if callable(count_of) and callable(available) and available() else 0
        if (device.index or 0) >= count:
            raise InputError(
                f"{name}: {describe(value)} is not available (torch.{device.type}.device_count() = {count})"
            )
    return device
