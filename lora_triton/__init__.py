"""lora-triton: Triton kernels for QLoRA layers on a bitsandbytes-exact NF4 base weight.

Layers, in the order a newcomer should read them:
    format     - NF4 code books, quantize/dequantize, ``NF4Weight`` (bitsandbytes' bytes and keys)
    reference  - the layer's forward and backward in plain torch (oracle and CPU path)
    kernels    - Triton kernels and their launchers
    ops        - the torch.library custom ops (autograd, torch.compile) that pick a backend
    modules    - NF4Linear and LoRALinear4bit, the drop-in layers
    integration- inject into existing models, PEFT files and models, merging
    training   - forgetting protection (ContinualLoRA), gradient-spike guard, warm starts
    testing    - error measures, random problems and a tiny Llama shared by tests and benchmarks
Front doors: ``cli`` (the ``lora-triton`` command), ``demos`` (demo, forgetting benchmark),
``memory`` (estimate and measurement), ``bench`` (benchmark tables).
"""

import logging

# bitsandbytes logs at import, on AVX512-BF16 CPUs, "Failed to load CPU gemm_4bit_forward from
# kernels-community" when the optional Hugging Face `kernels` package is absent; nothing
# lora-triton uses needs it. Set once here, so every entry point (worker processes included)
# stays quiet, whichever imports bitsandbytes first after us.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# ruff: noqa: E402 (the logger above is set before anything imports bitsandbytes)
from .format import NF4Weight, dynamic_map_signed, nf4_code
from .integration import (delete_adapter, disable_adapters, enable_adapter_checkpoints, from_peft, inject_lora,
                          load_adapter, merge_into_nf4, merge_to_linear, route_adapters, save_adapter, save_adapters,
                          set_adapter, set_trainable_adapters, unmerge)
from .modules import LoRALinear4bit, NF4Linear
from .ops import lora_nf4_linear
from .reference import lora_backward, lora_forward, lora_linear_reference
from .training import ContinualLoRA, RoutedLoRA, causal_lm_loss

__version__ = "0.1.0"

__all__ = ["NF4Weight", "nf4_code", "dynamic_map_signed", "lora_forward", "lora_backward", "lora_linear_reference",
           "lora_nf4_linear", "NF4Linear", "LoRALinear4bit", "inject_lora", "save_adapter", "load_adapter",
           "from_peft", "merge_to_linear", "merge_into_nf4", "unmerge", "set_adapter", "delete_adapter",
           "disable_adapters", "save_adapters", "set_trainable_adapters", "route_adapters",
           "enable_adapter_checkpoints", "ContinualLoRA", "RoutedLoRA", "causal_lm_loss", "__version__"]
