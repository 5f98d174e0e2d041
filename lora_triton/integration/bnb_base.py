"""Quantize a model's linear layers with bitsandbytes itself (NF4 ``Linear4bit``), on any device.

This builds the base PEFT uses for QLoRA without ``from_pretrained(load_in_4bit=True)``:
useful to compare lora-triton with PEFT + bitsandbytes on the very same bytes, or to start
from a model that exists only in memory.
"""

from __future__ import annotations

import torch
from torch import nn

from .inject import replace_module
from .targets import TargetSpec, find_targets


def bnb_linear4bit(linear: nn.Linear, compute_dtype: torch.dtype | None = None, blocksize: int = 64,
                   double_quant: bool = True) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` (NF4) quantized by bitsandbytes from ``linear``'s weight, on
    its device; ``compute_dtype`` defaults to the weight's dtype. The bias is copied, frozen.

    bitsandbytes' CPU backend, on CPUs with AVX512-BF16, repacks the weight into another byte
    layout at the first eval-mode forward and then computes in bfloat16 whatever the compute
    dtype. The layer made here opts out of that (``support_avx512bf16_for_cpu = False``), so it
    keeps the standard NF4 bytes and computes in ``compute_dtype`` like on other devices."""
    import bitsandbytes as bnb

    if type(linear) is not nn.Linear:
        raise TypeError(f"expected a torch.nn.Linear, got {type(linear).__name__}")
    weight = linear.weight.detach()
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype or weight.dtype, compress_statistics=double_quant,
                              quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight.cpu().clone(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type="nf4")
    layer.support_avx512bf16_for_cpu = False
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer.train(linear.training)  # a new module starts in training mode; keep the replaced layer's mode
    return layer.to(weight.device)  # bitsandbytes quantizes when the parameter is moved to a device


def quantize_with_bnb(model: nn.Module, target_modules: TargetSpec = "all-linear",
                      exclude_modules: TargetSpec | None = None, compute_dtype: torch.dtype | None = None,
                      blocksize: int = 64, double_quant: bool = True) -> list[str]:
    """Replace the matching ``nn.Linear`` layers of ``model`` (same rules as ``inject_lora``; the
    output head is kept) by bitsandbytes NF4 ``Linear4bit`` in place; returns their names.

    Sets ``model.is_loaded_in_4bit = True``, the flag PEFT reads to wrap these layers in its
    own bitsandbytes LoRA layer (``peft.tuners.lora.bnb.Linear4bit``).
    """
    names = find_targets(model, target_modules, exclude_modules)
    for name in names:
        replace_module(model, name, bnb_linear4bit(model.get_submodule(name), compute_dtype, blocksize,
                                                   double_quant))
    model.is_loaded_in_4bit = True
    return names
