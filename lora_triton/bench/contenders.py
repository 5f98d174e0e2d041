"""The layers a layer benchmark compares, built on one quantized weight and one adapter.

``ours``            ``LoRALinear4bit`` (shares the bitsandbytes layer's bytes when there is one)
``bnb_peft``        a real ``bitsandbytes.nn.Linear4bit`` wrapped by PEFT's LoRA layer
                    (only when both import): the default QLoRA stack
``dequant_linear``  dequantize NF4 (bitsandbytes' kernel when installed, else ours), then
                    ``F.linear`` + PEFT-style LoRA matmuls, under plain autograd

All three compute the same function: same NF4 bytes, same ``A``, ``B`` (in the activation
dtype), same scale, no bias, no dropout.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..format import NF4Weight
from .environment import import_bitsandbytes

NAMES = ("ours", "bnb_peft", "dequant_linear")


@dataclass
class Contender:
    """A layer to time: ``module(x) -> y`` and its trainable adapter ``(A [r, K], B [N, r])``."""

    name: str
    module: nn.Module
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    note: str = ""


class DequantLinearLoRA(nn.Module):
    """``F.linear(x, dequant(W)) + s * (x @ A^T) @ B^T``: dequantize, then dense matmuls."""

    def __init__(self, weight: NF4Weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dequant):
        super().__init__()
        self.weight, self.scale, self.dequant = weight, scale, dequant
        self.lora_a = nn.Parameter(lora_a.detach().clone())
        self.lora_b = nn.Parameter(lora_b.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = nn.functional.linear
        return f(x, self.dequant(x.dtype)) + f(f(x, self.lora_a), self.lora_b) * self.scale


class _Wrapper(nn.Module):
    """A one-layer model PEFT can inject into (its target is the module named ``proj``)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _bnb_linear4bit(bnb, dense: torch.Tensor, device: torch.device) -> nn.Module | None:
    """A quantized ``bnb.nn.Linear4bit`` (NF4, double quant, blocksize 64) holding ``dense``."""
    n, k = dense.shape
    try:
        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dense.dtype, compress_statistics=True,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.cpu(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)
        return layer.to(device)  # quantizes on the way
    except Exception as err:  # no native library for this device in this build
        print(f"bitsandbytes Linear4bit unusable on {device} ({type(err).__name__}: {err})", file=sys.stderr)
        return None


def _peft_wrap(layer: nn.Module, r: int, alpha: float):
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"], bias="none")
    return peft.inject_adapter_in_model(config, _Wrapper(layer))


def _dequant_fn(weight: NF4Weight, bnb_layer: nn.Module | None, bnb):
    """``dtype -> W [N, K]``: bitsandbytes' dequantize when there is a layer, else our kernel on
    CUDA, else the plain-torch dequantization."""
    if bnb_layer is not None:
        packed, state = bnb_layer.weight.data, bnb_layer.weight.quant_state
        return lambda dtype: bnb.functional.dequantize_4bit(packed, state).to(dtype), "bitsandbytes dequantize_4bit"
    if weight.device.type == "cuda":
        from ..ops.candidates import dequantize_kernel

        return lambda dtype: dequantize_kernel(weight, dtype), "lora-triton dequant kernel"
    return weight.dequantize, "plain-torch dequantize"


def build(n: int, k: int, r: int, dtype: torch.dtype, device: torch.device, backend: str,
          seed: int = 0) -> tuple[list[Contender], NF4Weight, float]:
    """The contenders for a ``[N, K]`` layer of rank ``r`` in ``dtype`` on ``device``.

    ``backend`` is ours' (``"triton"`` on a GPU or the interpreter, ``"torch"`` for the CPU
    path). Returns ``(contenders, the shared NF4 weight, scale)``; ``bnb_peft`` is left out
    when bitsandbytes or PEFT is missing or cannot run on ``device``.
    """
    from ..modules import LoRALinear4bit

    gen = torch.Generator().manual_seed(seed)
    dense = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype)
    alpha = 2.0 * r
    bnb = import_bitsandbytes()
    have_peft = importlib.util.find_spec("peft") is not None
    bnb_layer = _bnb_linear4bit(bnb, dense, device) if bnb is not None and have_peft else None
    if bnb_layer is not None:
        ours = LoRALinear4bit.from_bnb(bnb_layer, r=r, lora_alpha=alpha, init_lora_weights=False, backend=backend)
    else:
        weight = NF4Weight.quantize(dense.to(device), 64, True)
        ours = LoRALinear4bit.from_nf4(weight, None, r=r, lora_alpha=alpha, init_lora_weights=False,
                                       backend=backend)
    ours = ours.to(device=device, dtype=dtype)
    weight, scale = ours.base_layer.nf4, ours.scaling[ours.active_adapter]
    a, b = ours.lora_A[ours.active_adapter].weight, ours.lora_B[ours.active_adapter].weight
    contenders = [Contender("ours", ours, a, b, f"LoRALinear4bit backend={backend}")]

    if bnb_layer is not None:
        wrapped = _peft_wrap(bnb_layer, r, alpha)
        lora_a, lora_b = wrapped.proj.lora_A["default"], wrapped.proj.lora_B["default"]
        for module, same in ((lora_a, a), (lora_b, b)):
            module.to(device=device, dtype=dtype)
            with torch.no_grad():
                module.weight.copy_(same)
        contenders.append(Contender("bnb_peft", wrapped, lora_a.weight, lora_b.weight,
                                    f"bitsandbytes Linear4bit + peft {type(wrapped.proj).__module__}"))

    dequant, how = _dequant_fn(weight, bnb_layer, bnb)
    plain = DequantLinearLoRA(weight, a, b, scale, dequant)
    contenders.append(Contender("dequant_linear", plain, plain.lora_a, plain.lora_b, how))
    return contenders, weight, scale
