"""Layer 5 - drop-in ``nn.Module``s: the frozen NF4 base and the LoRA layer around it."""

from .lora_linear4bit import LoRALinear4bit
from .nf4_linear import NF4Linear

__all__ = ["NF4Linear", "LoRALinear4bit"]
