"""Activation functions by the names the checkpoint config uses."""

from __future__ import annotations

import functools

import torch.nn.functional as F

from ..errors import ConfigError

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
}


def activation(name: str):
    """The function for `hidden_act` / `activation_function` `name`."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"activation {name!r} is not supported; expected one of {sorted(_ACTIVATIONS)}") from None
