"""PEFT's ``adapter_names`` on a whole model: ``model(**inputs, adapter_names=[...])`` and
``model.generate(**inputs, adapter_names=[...])``, one adapter name per sequence.

``inject_lora`` (and ``load_adapter`` / ``from_peft``) call ``enable_adapter_names(model)``. It
gives the model one ``AdapterRouter`` shared by its ``LoRALinear4bit`` layers, a forward
pre-hook on the model that takes ``adapter_names`` out of the call's keywords (a
``transformers`` model's forward would swallow it silently) and routes it, and, for a model with
``generate``, a ``generate`` that accepts it (``transformers`` refuses unknown generation
keywords). Semantics and error messages follow PEFT (``peft.tuners.lora.model``): one name per
row of the batch, ``"__base__"`` for the base model alone, a name no layer has is a
``ValueError``, so is a list whose length is not the batch size, and so is ``adapter_names``
while an adapter is merged. Beam search and ``num_return_sequences`` repeat each sequence; the
names are repeated with them. Unlike PEFT, training mode is allowed: each row's loss then
trains that row's adapter only (``set_trainable_adapters`` makes several trainable).

``adapter_names`` may also be an int64 tensor of indices into ``adapter_slots(model)`` (``-1``:
base), from ``adapter_ids(model, names)``: under ``torch.compile`` a list of names is a constant
that recompiles when it changes, a tensor is data.

The routing of a forward call lasts until the model's next forward call, so the recomputation of
gradient checkpointing (during backward) sees it: run backward before the next forward, as with
PEFT's aLoRA hooks.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

from ..modules import LoRALinear4bit
from ..modules.adapter_bank import MixedBatch
from .adapters import lora_layers

_ROUTER_ATTR = "_lora_triton_router"


class AdapterRouter:
    """The model's current mixed batch (``current``: a ``MixedBatch`` or None), read by its layers."""

    def __init__(self, model: nn.Module):
        self.layers: list[LoRALinear4bit] = []
        self.current: MixedBatch | None = None
        self.generating = False
        self.attach(model)

    def attach(self, model: nn.Module) -> None:
        """Point every ``LoRALinear4bit`` of ``model`` at this router."""
        self.layers = list(lora_layers(model).values())
        for layer in self.layers:
            layer.router = self

    @property
    def slots(self) -> tuple[str, ...]:
        """Every adapter name of the model's layers, in order of first appearance."""
        return tuple(dict.fromkeys(name for layer in self.layers for name in layer.lora_A))

    def route(self, adapter_names, batch: int | None, device: torch.device, expandable: bool = False) -> MixedBatch:
        """Check ``adapter_names`` against the model (PEFT's errors) and return its ``MixedBatch``."""
        merged = sorted({layer.merged_adapter for layer in self.layers if layer.merged_adapter is not None})
        if merged:
            raise ValueError(f"Cannot pass `adapter_names` when there are merged adapters ({', '.join(merged)}), "
                             "please call `unmerge` first.")
        custom = sorted({type(layer).__name__ for layer in self.layers if type(layer).forward is not
                         LoRALinear4bit.forward})
        if custom:
            raise ValueError(f"adapter_names is not supported by {', '.join(custom)} layers (their adapters are "
                             "all active at once)")
        mixed = MixedBatch.from_names(adapter_names, self.slots, device, "the model", expandable)
        if batch is not None:
            mixed.for_batch(batch)  # raises PEFT's length error before any layer runs
        return mixed


def _batch_and_device(model: nn.Module, args: tuple, kwargs: dict) -> tuple[int | None, torch.device]:
    """The batch size and device of a forward / generate call, from its first tensor input."""
    for value in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("inputs")):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0], value.device
    param = next(model.parameters(), None)
    return None, param.device if param is not None else torch.device("cpu")


def _route_forward(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: take ``adapter_names`` out of the keywords and route it (or clear)."""
    router: AdapterRouter = getattr(model, _ROUTER_ATTR)
    adapter_names = kwargs.pop("adapter_names", None)
    if router.generating:
        if adapter_names is not None:
            raise ValueError("adapter_names was given to generate(); do not pass it to forward as well")
        return args, kwargs
    if adapter_names is None:
        router.current = None
    else:
        batch, device = _batch_and_device(model, args, kwargs)
        router.current = router.route(adapter_names, batch, device)
    return args, kwargs


def _generate_with_adapter_names(model: nn.Module, *args, adapter_names=None, **kwargs):
    """``generate`` of the model's class, with each sequence's adapter from ``adapter_names``."""
    generate = functools.partial(type(model).generate, model)
    if adapter_names is None:
        return generate(*args, **kwargs)
    router: AdapterRouter = getattr(model, _ROUTER_ATTR)
    batch, device = _batch_and_device(model, args, kwargs)
    mixed = router.route(adapter_names, batch, device, expandable=True)
    previous = router.current, router.generating
    router.current, router.generating = mixed, True
    try:
        return generate(*args, **kwargs)
    finally:
        router.current, router.generating = previous


def enable_adapter_names(model: nn.Module) -> AdapterRouter:
    """Let ``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])``
    run mixed batches (module docstring). Idempotent: a second call re-attaches layers added
    since (new ``inject_lora`` targets). Returns the model's router."""
    router = getattr(model, _ROUTER_ATTR, None)
    if router is not None:
        router.attach(model)
        return router
    router = AdapterRouter(model)
    object.__setattr__(model, _ROUTER_ATTR, router)  # a plain attribute: not a sub-module or state
    model.register_forward_pre_hook(_route_forward, with_kwargs=True)
    if callable(getattr(type(model), "generate", None)):
        model.generate = types.MethodType(_generate_with_adapter_names, model)
    return router


def adapter_slots(model: nn.Module) -> tuple[str, ...]:
    """The adapter names ``adapter_ids`` indexes: every adapter of the model's layers."""
    return enable_adapter_names(model).slots


def adapter_ids(model: nn.Module, adapter_names, device: torch.device | str | None = None) -> torch.Tensor:
    """int64 ``[B]`` indices into ``adapter_slots(model)`` for a list of names (``"__base__"``:
    -1), to pass as ``adapter_names`` where the mix changes under ``torch.compile``."""
    router = enable_adapter_names(model)
    if device is None:
        _, device = _batch_and_device(model, (), {})
    return router.route(list(adapter_names), None, torch.device(device)).ids


def set_trainable_adapters(model: nn.Module, adapter_names) -> None:
    """Make exactly the adapters ``adapter_names`` trainable in every layer that has them (for
    training several adapters in one pass on a mixed batch); ``ValueError`` for a name no layer
    has, before changing anything."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    layers = lora_layers(model)
    known = {name for layer in layers.values() for name in layer.lora_A}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"no layer of the model has adapter(s) {', '.join(map(repr, unknown))}; have {sorted(known)}")
    for layer in layers.values():
        layer.set_trainable_adapters([name for name in names if name in layer.lora_A])
