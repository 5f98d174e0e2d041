"""``NF4Linear``: a frozen linear layer whose weight is an ``NF4Weight``.

Its state dict is exactly a ``bitsandbytes.nn.Linear4bit``'s: ``weight`` (packed uint8
``[(N*K+1)//2, 1]``), ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4`` and ``bias``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..format import NF4Weight

_WEIGHT_PREFIX = "weight"


def check_standard_bnb_layout(layer: nn.Module, name: str = "layer") -> None:
    """Raise ``ValueError`` if a bitsandbytes ``Linear4bit`` holds its CPU-only repacked bytes
    (bitsandbytes 0.50 repacks them at the first eval-mode CPU forward on AVX512-BF16 CPUs),
    which are no longer the NF4 format."""
    if getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False):
        raise ValueError(f"{name!r}: bitsandbytes has repacked this Linear4bit for its CPU bf16 kernel, so its "
                         "bytes are no longer the NF4 format; convert it before running it in eval mode on CPU "
                         "(or set layer.support_avx512bf16_for_cpu = False before the first forward)")


class NF4Linear(nn.Module):
    """Frozen ``y = x @ dequant(W)^T + b`` over a packed NF4 weight ``[out_features, in_features]``.

    The packed weight lives in ``self.nf4`` (not a Parameter: it never trains and is never
    converted by ``.half()``/``.to(dtype)``; ``.to(device)`` moves its bytes).
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        self.nf4 = weight
        self.out_features, self.in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape [{self.out_features}], got {list(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        """Quantize an ``nn.Linear`` (its weight's dtype becomes the quant state's dtype)."""
        weight = NF4Weight.quantize(linear.weight.detach(), blocksize, double_quant)
        return cls(weight, linear.bias)

    @classmethod
    def from_bnb(cls, layer: nn.Module) -> "NF4Linear":
        """Share the bytes of a quantized ``bitsandbytes.nn.Linear4bit`` (no re-quantization)."""
        state = getattr(layer.weight, "quant_state", None)
        if state is None:
            raise ValueError("the bitsandbytes layer is not quantized yet (move it to a device first)")
        check_standard_bnb_layout(layer)
        tensors = {k: v for k, v in layer.state_dict().items() if k.startswith(_WEIGHT_PREFIX)}
        return cls(NF4Weight.from_bnb_state_dict(tensors, _WEIGHT_PREFIX), layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Base only (no adapter): dequantizes transiently; the LoRA layer uses the fused op.
        return nn.functional.linear(x, self.nf4.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    # ---------------------------------------------------------------- device moves
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        target = fn(torch.empty(0, device=self.nf4.device)).device  # .to(dtype) must not touch the bytes
        if target != self.nf4.device:
            self.nf4 = self.nf4.to(target)
        return self

    # ---------------------------------------------------------------- bitsandbytes keys
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, tensor in self.nf4.to_bnb_state_dict(_WEIGHT_PREFIX).items():
            destination[prefix + key] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = {key[len(prefix):]: value for key, value in state_dict.items()
               if key.startswith(prefix + _WEIGHT_PREFIX)}
        if not own:
            missing_keys.append(prefix + _WEIGHT_PREFIX)
        else:
            weight = NF4Weight.from_bnb_state_dict(own, _WEIGHT_PREFIX).to(self.nf4.device)
            if weight.shape != self.nf4.shape:
                error_msgs.append(f"size mismatch for {prefix}weight: NF4 shape {list(weight.shape)} in the "
                                  f"checkpoint, {list(self.nf4.shape)} in the model")
            else:
                self.nf4 = weight
        rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix + _WEIGHT_PREFIX)}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.nf4.blocksize}, double_quant={self.nf4.double_quant}")
