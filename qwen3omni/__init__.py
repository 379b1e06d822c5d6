"""qwen3omni: the Qwen3-Omni Thinker-Talker model as clean PyTorch modules that load the released weights."""

from .config import Qwen3OmniConfig
from .model.omni import Qwen3Omni
from .processing import Processor

__all__ = ["Qwen3Omni", "Qwen3OmniConfig", "Processor"]
__version__ = "0.1.0"
