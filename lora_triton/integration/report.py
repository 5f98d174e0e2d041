"""Counting a model's parameters and bytes, packed NF4 weights included."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..modules import NF4Linear
from ..modules.nf4_linear import NF4_PARAMETERS


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bnb_quant_state_bytes(param: torch.Tensor) -> int:
    """Bytes of a bitsandbytes ``Params4bit``'s quant state (absmax, nested absmax, code books)."""
    state = getattr(param, "quant_state", None)
    if state is None:
        return 0
    tensors = [state.absmax, state.code]
    if getattr(state, "nested", False):
        tensors += [state.state2.absmax, state.state2.code]
    return sum(_tensor_bytes(t) for t in tensors if isinstance(t, torch.Tensor))


def _nf4_parameter_ids(model: nn.Module) -> set[int]:
    """``id`` of every NF4 parameter of the model's ``NF4Linear`` layers (counted through ``nf4``)."""
    return {id(p) for m in model.modules() if isinstance(m, NF4Linear)
            for p in (m._parameters.get(name) for name in NF4_PARAMETERS) if p is not None}


def memory_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (each storage counted once, so tied
    weights count once), plus the packed NF4 weights and their statistics of ``NF4Linear``
    layers and bitsandbytes ``Linear4bit`` quant states."""
    seen, total = set(), 0
    nf4 = _nf4_parameter_ids(model)
    for t in [p for p in model.parameters() if id(p) not in nf4] + list(model.buffers()):
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += _tensor_bytes(t) + _bnb_quant_state_bytes(t)
    return total + sum(m.nf4.nbytes for m in model.modules() if isinstance(m, NF4Linear))


def _logical_numel(param: torch.Tensor) -> int:
    """Weights a parameter stands for (a packed 4-bit parameter holds two per byte)."""
    state = getattr(param, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else param.numel()


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` number of weights; NF4 weights count once per weight, not per byte."""
    nf4 = _nf4_parameter_ids(model)
    params = [p for p in model.parameters() if id(p) not in nf4]
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen_nf4 = sum(m.nf4.numel for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, sum(_logical_numel(p) for p in params) + frozen_nf4


@dataclass(frozen=True)
class InjectionReport:
    """What ``inject_lora`` did: layers converted, trainable weights, memory before/after (bytes)."""

    converted: tuple[str, ...]
    trainable_params: int
    total_params: int
    memory_before: int
    memory_after: int
    #: the model's other ``nn.Linear`` layers (not targeted): they stay in full precision, without adapters
    full_precision: tuple[str, ...] = ()

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        from ..outputs import format_bytes

        count = len(self.converted)
        kept = len(self.full_precision)
        verb = "s stay" if kept != 1 else " stays"
        kept_line = (f"  {kept} other linear layer{verb} in full precision (not targeted): "
                     f"{', '.join(self.full_precision[:4])}{', ...' if kept > 4 else ''}\n" if kept else "")
        return (f"lora-triton: {count} layer{'s' * (count != 1)} converted to LoRALinear4bit\n{kept_line}"
                f"  trainable params: {self.trainable_params:,} of {self.total_params:,} "
                f"({self.trainable_percent:.3f}%)\n"
                f"  memory (params + buffers): {format_bytes(self.memory_before)} -> {format_bytes(self.memory_after)} "
                f"({self.memory_after / max(self.memory_before, 1):.1%} of before)")
