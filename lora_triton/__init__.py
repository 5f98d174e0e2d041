"""lora-triton: Triton kernels for QLoRA layers on a bitsandbytes-exact NF4 base weight.

Layers, in the order a newcomer should read them:
    format     - NF4 code books, quantize/dequantize, ``NF4Weight`` (bitsandbytes' bytes and keys)
    reference  - the layer's forward and backward in plain torch (oracle and CPU path)
    kernels    - Triton kernels and their launchers
    testing    - error measures and random problems shared by tests and benchmarks
"""

from .format import NF4Weight, dynamic_map_signed, nf4_code
from .reference import lora_backward, lora_forward, lora_linear_reference

__version__ = "0.1.0"

__all__ = ["NF4Weight", "nf4_code", "dynamic_map_signed", "lora_forward", "lora_backward",
           "lora_linear_reference", "__version__"]
