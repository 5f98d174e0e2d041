"""Model-wide adapter handling: the per-layer calls of ``LoRALinear4bit`` applied to every layer."""

from __future__ import annotations

import contextlib

from torch import nn

from ..modules import LoRALinear4bit


def lora_layers(model: nn.Module) -> dict[str, LoRALinear4bit]:
    """Every ``LoRALinear4bit`` in ``model`` by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear4bit)}


def _layers_with(model: nn.Module, adapter_name: str) -> dict[str, LoRALinear4bit]:
    layers = {name: layer for name, layer in lora_layers(model).items() if adapter_name in layer.lora_A}
    if not layers:
        raise KeyError(f"no layer of the model has an adapter named {adapter_name!r}")
    return layers


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Activate ``adapter_name`` in every layer that has it (only it trains there)."""
    for layer in _layers_with(model, adapter_name).values():
        layer.set_adapter(adapter_name)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from every layer that has it."""
    for layer in _layers_with(model, adapter_name).values():
        layer.delete_adapter(adapter_name)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block every ``LoRALinear4bit`` computes its base output only."""
    with contextlib.ExitStack() as stack:
        for layer in lora_layers(model).values():
            stack.enter_context(layer.disable_adapter())
        yield model
