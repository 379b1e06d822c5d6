"""qwen3omni: the Qwen3-Omni Thinker-Talker model as clean PyTorch modules that load the released weights."""

from __future__ import annotations

__all__ = ["Qwen3Omni", "Qwen3OmniConfig", "Processor"]
__version__ = "0.1.0"

_WHERE = {"Qwen3Omni": ".model.omni", "Qwen3OmniConfig": ".config", "Processor": ".processing"}


def __getattr__(name: str):
    # Imported on first use: the model needs no audio/image libraries, the processor no model code.
    if name in _WHERE:
        from importlib import import_module

        return getattr(import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module 'qwen3omni' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
