"""Convert a PEFT LoRA model on a bitsandbytes 4-bit (NF4) base into lora-triton layers.

The NF4 bytes are shared (nothing is re-quantized) and every adapter's weights are copied,
so the converted model computes what the PEFT model computed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules import LoRALinear4bit
from ..modules.nf4_linear import check_standard_bnb_layout
from .inject import is_bnb_linear4bit, replace_module
from .mixed_batch import enable_adapter_names


def _dropout_p(dropout: nn.Module) -> float:
    return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0


def _check_peft_layer(layer: nn.Module, name: str) -> None:
    """``TypeError``/``ValueError`` unless ``layer`` is plain LoRA on a bitsandbytes NF4 base."""
    base = layer.get_base_layer()
    if not is_bnb_linear4bit(base):
        raise TypeError(f"{name!r}: PEFT layer over a {type(base).__module__}.{type(base).__qualname__}; expected "
                        "a bitsandbytes Linear4bit (NF4) base")
    if getattr(base.weight, "quant_type", None) != "nf4":
        raise ValueError(f"{name!r}: bitsandbytes quant_type={getattr(base.weight, 'quant_type', None)!r}; "
                         "only NF4 is supported")
    check_standard_bnb_layout(base, name)
    if layer.merged:
        raise ValueError(f"{name!r}: PEFT adapter is merged into the 4-bit base; unmerge it first")
    if len(layer.active_adapters) > 1:
        raise ValueError(f"{name!r}: {len(layer.active_adapters)} adapters active at once; lora-triton runs one")
    unsupported = [f for f in ("use_dora", "lora_bias") if any(getattr(layer, f, {}).values())]
    unsupported += ["lora_embedding_A"] if len(getattr(layer, "lora_embedding_A", {})) else []
    if unsupported:
        raise ValueError(f"{name!r}: PEFT features {unsupported} are not supported by LoRALinear4bit")


def convert_peft_layer(layer: nn.Module, name: str, backend: str | None = None) -> LoRALinear4bit:
    """A ``LoRALinear4bit`` sharing ``layer``'s NF4 bytes and bias, with copies of all its adapters
    (fp32, same r / alpha / dropout / rsLoRA) and the same active adapter."""
    _check_peft_layer(layer, name)
    adapters = list(layer.lora_A)
    if not adapters:
        raise ValueError(f"{name!r}: PEFT layer has no adapter")
    out = None
    for adapter in adapters:
        hyper = dict(r=layer.r[adapter], lora_alpha=layer.lora_alpha[adapter],
                     lora_dropout=_dropout_p(layer.lora_dropout[adapter]), use_rslora=layer.use_rslora[adapter])
        if out is None:
            out = LoRALinear4bit.from_bnb(layer.get_base_layer(), adapter_name=adapter, backend=backend, **hyper)
        else:
            out.add_adapter(adapter, **hyper)
        if abs(out.scaling[adapter] - layer.scaling[adapter]) > 1e-12 * abs(layer.scaling[adapter]):
            raise ValueError(f"{name!r}: PEFT scaling {layer.scaling[adapter]} of adapter {adapter!r} differs from "
                             f"lora_alpha/r = {out.scaling[adapter]} (changed by set_scale?)")
        with torch.no_grad():
            out.lora_A[adapter].weight.copy_(layer.lora_A[adapter].weight)
            out.lora_B[adapter].weight.copy_(layer.lora_B[adapter].weight)
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if active:
        out.set_adapter(active[0])
    else:
        out.active_adapter = None
    return out


def from_peft(peft_model: nn.Module, backend: str | None = None) -> nn.Module:
    """Convert a PEFT model (``get_peft_model`` / ``PeftModel.from_pretrained`` output, LoRA on a
    bitsandbytes NF4 base) in place and return the underlying model (``peft_model.base_model.model``)
    with ``LoRALinear4bit`` layers where PEFT had LoRA layers. Only active adapters train."""
    from peft.tuners.lora import LoraLayer

    inner = getattr(getattr(peft_model, "base_model", None), "model", None)
    if inner is None:
        raise TypeError(f"expected a peft.PeftModel, got {type(peft_model).__name__}")
    peft_layers = {name: m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}
    if not peft_layers:
        raise ValueError("the PEFT model has no LoRA layers")
    converted_layers = {name: convert_peft_layer(layer, name, backend) for name, layer in peft_layers.items()}
    inner.requires_grad_(False)  # every layer converted (and checked) before the model changes
    for name, converted in converted_layers.items():
        replace_module(inner, name, converted)
        if converted.active_adapter is not None:
            converted.set_adapter(converted.active_adapter)
    enable_adapter_names(inner)
    return inner
