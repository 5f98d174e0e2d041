"""Merging adapters for deployment, and the error each merge path adds.

The adapter was trained against ``dequant(W4)``, so the faithful merged weight is
``T = dequant(W4) + s * B @ A``. Two paths:

- ``merge_to_linear``: ``T`` rounded once to 16 bits, in ordinary ``nn.Linear`` layers. Keeps
  what was learned (error: one 16-bit rounding of ``T``).
- ``merge_into_nf4``: ``T`` re-quantized to NF4. The NF4 step is far larger than a typical
  adapter update, so most of ``s * B @ A`` is rounded away; the report says how much.
  ``unmerge`` restores the original bytes exactly.

Errors (``MergeError``), with ``M`` the merged weight, in float64 Frobenius norms:
``weight_error = ||M - T|| / ||T||`` and ``update_error = ||M - T|| / ||s*B@A||`` - the
fraction of the learned update lost (0: kept exactly; about 1: as large as the update itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..modules import LoRALinear4bit
from .adapters import lora_layers
from .inject import replace_module


@dataclass(frozen=True)
class MergeError:
    """Error one merge added to one layer (see the module docstring)."""

    name: str
    weight_error: float
    update_error: float


@dataclass(frozen=True)
class MergeReport:
    """Per-layer errors of one merge path (``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"nf4"``)."""

    path: str
    layers: tuple[MergeError, ...]

    @property
    def max_weight_error(self) -> float:
        return max((e.weight_error for e in self.layers), default=0.0)

    @property
    def max_update_error(self) -> float:
        return max((e.update_error for e in self.layers), default=0.0)

    def __str__(self) -> str:
        return (f"merge into {self.path}: {len(self.layers)} layers, max relative weight error "
                f"{self.max_weight_error:.2e}, max fraction of the adapter update lost {self.max_update_error:.2e}")


def merge_error(name: str, merged: torch.Tensor, target: torch.Tensor, update: torch.Tensor) -> MergeError:
    """``MergeError`` of ``merged`` against ``target = base + update`` (all ``[out, in]``)."""
    diff = (merged.double() - target.double()).norm().item()
    update_norm = update.double().norm().item()
    update_error = diff / update_norm if update_norm > 0 else (0.0 if diff == 0 else float("inf"))
    return MergeError(name, diff / max(target.double().norm().item(), 1e-300), update_error)


def _layers_to_merge(model: nn.Module) -> dict:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRALinear4bit layers to merge")
    for name, layer in layers.items():
        if layer.active_adapter is None:
            raise ValueError(f"layer {name!r} has no active adapter to merge")
        if layer.merged_adapter is not None:
            raise ValueError(f"layer {name!r} is already merged into NF4; unmerge() first")
    return layers


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of the model's parameters outside its ``LoRALinear4bit`` layers (None: none)."""
    inside = {id(p) for layer in lora_layers(model).values() for p in layer.parameters()}
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in inside}
    return dtypes.pop() if len(dtypes) == 1 else None


def merge_to_linear(model: nn.Module, dtype: torch.dtype | None = None) -> MergeReport:
    """Replace every ``LoRALinear4bit`` of ``model`` in place by an ``nn.Linear`` of ``dtype``
    holding ``dequant(W) + s*B@A`` of its active adapter (computed in float32, rounded once).

    ``dtype`` (float16, bfloat16 or float32; default: the dtype of the model's other parameters, or
    bfloat16 when they have none or several): when it differs from the rest of the model's, the rest
    is cast to it too, so the model runs in ``dtype`` end to end (a bf16 layer among fp32 activations
    would fail at the next forward). One-way: the NF4 base and the adapters are dropped.
    """
    rest = _model_dtype(model)
    dtype = dtype or rest or torch.bfloat16
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"merge dtype must be float16, bfloat16 or float32, got {dtype}")
    if isinstance(model, LoRALinear4bit):
        raise TypeError("merge_to_linear(model) replaces the LoRALinear4bit layers inside a model; for a single "
                        "layer call layer.merge_to_linear(dtype), which returns the nn.Linear")
    errors = []
    for name, layer in _layers_to_merge(model).items():
        target, update = layer.merged_weight(torch.float32), layer.delta_weight()
        linear = layer.merge_to_linear(dtype)
        errors.append(merge_error(name, linear.weight, target, update))
        replace_module(model, name, linear)
    if rest is not None and rest != dtype:
        model.to(dtype)
    return MergeReport(str(dtype).removeprefix("torch."), tuple(errors))


def merge_into_nf4(model: nn.Module) -> MergeReport:
    """Re-quantize every layer's ``dequant(W) + s*B@A`` to NF4 in place (``merge_nf4``) and report
    the error that adds. Reversible with ``unmerge``; lossy in between."""
    errors = []
    for name, layer in _layers_to_merge(model).items():
        target, update = layer.merged_weight(torch.float32), layer.delta_weight()
        layer.merge_nf4()
        errors.append(merge_error(name, layer.base_layer.nf4.dequantize(torch.float32), target, update))
    return MergeReport("nf4", tuple(errors))


def unmerge(model: nn.Module) -> int:
    """Undo ``merge_into_nf4`` in every merged layer (original bytes back); returns how many."""
    merged = [layer for layer in lora_layers(model).values() if layer.merged_adapter is not None]
    for layer in merged:
        layer.unmerge()
    return len(merged)
