"""Warm-start initialisations of a ``LoRALinear4bit`` adapter, rsLoRA scaling and LoRA+.

What each init does to the layer's output at step 0 (``W`` = the float weight, ``Q(.)`` = NF4
quantize-dequantize, ``s`` = the adapter's scale; all exact statements, tested):

* ``"kaiming"`` (PEFT's default) / ``"gaussian"``: ``B = 0``, base untouched - the output
  equals the quantized base's, ``x Q(W)^T + b``.
* ``"pissa"``: ``s B A = U_r S_r V_r^T`` (top-r singular triplets of ``W``), base becomes
  ``Q(W - s B A)``: the output is ``x W^T + b + x (Q(R) - R)^T`` with ``R = W - s B A`` - the
  float weight's output up to the NF4 error of the residual.
* ``"olora"``: ``W = Q R`` (QR), ``B = Q[:, :r] / sqrt(s)``, ``A = R[:r] / sqrt(s)``, base
  becomes ``Q(W - s B A)``: same statement as PiSSA.
* ``"loftq"``: alternate ``Q_k = Q(W - s B_{k-1} A_{k-1})`` and ``s B_k A_k`` = best rank-r
  approximation of ``W - Q_k``; the iterate with the smallest ``||W - Q_k - s B_k A_k||_F``
  is kept (the first one already beats plain ``Q(W)``, so the result never does worse). The
  output is ``x (Q_k + s B_k A_k)^T + b`` = ``x W^T + b`` minus ``x`` times that residual.

``W`` defaults to the layer's dequantized NF4 weight; pass the original float weight for
PiSSA/OLoRA/LoftQ to do what their papers intend. The inits that move part of ``W`` into the
adapter depend on ``s``: choose rsLoRA (``set_rslora``) before them, not after.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..format import NF4Weight
from ..modules import LoRALinear4bit

INIT_METHODS = ("kaiming", "gaussian", "pissa", "olora", "loftq")


def init_adapter(layer: LoRALinear4bit, method: str = "kaiming", adapter: str | None = None,
                 weight: torch.Tensor | None = None, loftq_iters: int = 5) -> None:
    """Initialise ``layer``'s adapter (default: the active one) in place with ``method``.

    Args:
        weight: float ``[N, K]``, the unquantized weight (PiSSA/OLoRA/LoftQ; ignored otherwise).
        loftq_iters: LoftQ alternations.
    """
    name = adapter or layer.active_adapter
    if name is None:
        raise ValueError("layer has no active adapter; pass adapter=")
    if method in ("kaiming", "gaussian"):
        layer.reset_adapter(name, method)
        return
    w = _float_weight(layer, weight)
    if method == "pissa":
        b, a = _split_scaled(*_top_singular(w, layer.r[name]), layer.scaling[name])
    elif method == "olora":
        b, a = _olora_factors(w, layer.r[name], layer.scaling[name])
    elif method == "loftq":
        b, a = _loftq(layer, w, name, loftq_iters)
    else:
        raise ValueError(f"unknown init {method!r}; expected one of {INIT_METHODS}")
    _set_adapter_and_residual(layer, name, b, a, w)


def init_model_adapters(model: nn.Module, method: str = "kaiming", weights: dict[str, torch.Tensor] | None = None,
                        **kwargs) -> None:
    """``init_adapter`` on every ``LoRALinear4bit`` of ``model``; ``weights`` maps module names
    to their float weights (missing ones use the dequantized NF4 weight)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear4bit):
            init_adapter(module, method, weight=(weights or {}).get(name), **kwargs)


# ------------------------------------------------------------------------ factorisations
def _float_weight(layer: LoRALinear4bit, weight: torch.Tensor | None) -> torch.Tensor:
    """The weight ``[N, K]`` to factor, float32 on the layer's device."""
    nf4 = layer.base_layer.nf4
    if weight is None:
        return nf4.dequantize(torch.float32)
    if tuple(weight.shape) != nf4.shape:
        raise ValueError(f"weight shape {list(weight.shape)} != layer weight {list(nf4.shape)}")
    return weight.detach().to(device=nf4.device, dtype=torch.float32)


def _top_singular(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors of ``w [N, K]``: ``(U_r S_r^1/2 [N, r], S_r^1/2 V_r^T [r, K])``."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:r].sqrt()
    return (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()


def _split_scaled(b: torch.Tensor, a: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide both factors by ``sqrt(scale)`` so that ``scale * B A`` equals ``b a``."""
    root = math.sqrt(scale)
    return b / root, a / root


def _olora_factors(w: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA: ``W = Q R``; ``B = Q[:, :r]``, ``A = R[:r]`` (both / sqrt(scale))."""
    q, rr = torch.linalg.qr(w.double())
    return _split_scaled(q[:, :r].float(), rr[:r].float(), scale)


def _requantize(nf4: NF4Weight, w: torch.Tensor) -> NF4Weight:
    """``w`` quantized with ``nf4``'s block size, double quant and quant-state dtype."""
    return NF4Weight.quantize(w.to(nf4.dtype), nf4.blocksize, nf4.double_quant)


def _loftq(layer: LoRALinear4bit, w: torch.Tensor, name: str, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoftQ's alternation; returns the ``(B, A)`` of the best iterate."""
    scale, r, nf4 = layer.scaling[name], layer.r[name], layer.base_layer.nf4
    low_rank = torch.zeros_like(w)
    best, best_error = None, math.inf
    for _ in range(max(iters, 1)):
        q = _requantize(nf4, w - low_rank).dequantize(torch.float32)
        b, a = _top_singular(w - q, r)
        low_rank = b @ a
        error = float((w - q - low_rank).norm())
        if error < best_error:
            best, best_error = _split_scaled(b, a, scale), error
    return best


def _set_adapter_and_residual(layer: LoRALinear4bit, name: str, b: torch.Tensor, a: torch.Tensor,
                              w: torch.Tensor) -> None:
    """Write ``B``, ``A`` into adapter ``name`` and make the base ``NF4(W - s B A)``."""
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    with torch.no_grad():
        lora_a.copy_(a.to(lora_a.dtype))
        lora_b.copy_(b.to(lora_b.dtype))
        residual = w - layer.scaling[name] * (lora_b.float() @ lora_a.float())
    layer.base_layer.nf4 = _requantize(layer.base_layer.nf4, residual)


# ------------------------------------------------------------------------ scaling, optimizer
def set_rslora(layer: LoRALinear4bit, adapter: str | None = None, enabled: bool = True) -> float:
    """Switch ``layer``'s adapter to rsLoRA scaling ``alpha / sqrt(r)`` (or back to
    ``alpha / r``). Returns the new scale."""
    name = adapter or layer.active_adapter
    layer.use_rslora[name] = enabled
    r, alpha = layer.r[name], layer.lora_alpha[name]
    layer.scaling[name] = alpha / math.sqrt(r) if enabled else alpha / r
    return layer.scaling[name]


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0,
                          weight_decay: float = 0.0) -> list[dict]:
    """LoRA+ optimizer groups: every trainable ``lora_B`` parameter at ``lr * ratio``, all other
    trainable parameters at ``lr``. Pass the result to any ``torch.optim`` optimizer."""
    groups = {"A": [], "B": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups["B" if "lora_B" in name.split(".") else "A"].append(param)
    out = [{"params": groups["A"], "lr": lr, "weight_decay": weight_decay},
           {"params": groups["B"], "lr": lr * ratio, "weight_decay": weight_decay}]
    return [group for group in out if group["params"]]
