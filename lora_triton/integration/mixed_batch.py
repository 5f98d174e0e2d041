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

The routing lasts exactly as long as the call that asked for it: a forward's ends when the forward
returns (or raises), ``generate``'s when it returns, and nothing a call routed is seen by the
next. Gradient checkpointing recomputes a forward during backward, after the forward returned: to
train a mixed batch with it, route both inside ``with route_adapters(model, names):`` (forward
and backward), which the recomputation then sees; a training forward of a checkpointed model given
``adapter_names`` as a keyword is refused with a ``ValueError`` saying so.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from ..modules import LoRALinear4bit
from ..modules.adapter_bank import MixedBatch
from .adapters import lora_layers

_ROUTER_ATTR = "_lora_triton_router"


class AdapterRouter:
    """The model's current mixed batch (``current``: a ``MixedBatch`` or None), read by its layers
    while a call that routed one runs (``_route_forward``, ``_generate_with_adapter_names``,
    ``route_adapters``)."""

    def __init__(self, model: nn.Module):
        self.layers: list[LoRALinear4bit] = []
        self.current: MixedBatch | None = None
        self.generating = False
        self.scoped = False  # inside route_adapters
        self._previous: list[MixedBatch | None] = []  # what each routed forward in progress replaced
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

    def __getstate__(self) -> dict:
        # a copy or pickle of the model is taken between calls: no routing travels with it
        return dict(self.__dict__, current=None, generating=False, scoped=False, _previous=[])


def _batch_and_device(model: nn.Module, args: tuple, kwargs: dict) -> tuple[int | None, torch.device]:
    """The batch size and device of a forward / generate call, from its first tensor input."""
    for value in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("inputs")):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0], value.device
    param = next(model.parameters(), None)
    return None, param.device if param is not None else torch.device("cpu")


def gradient_checkpointing_on(model: nn.Module) -> bool:
    """True when a forward of ``model`` would be recomputed during backward: the model is training
    with gradients on and a module's ``gradient_checkpointing`` flag (``transformers``' gradient
    checkpointing) is set."""
    if not (model.training and torch.is_grad_enabled()):
        return False
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def refuse_unscoped_recomputation(model: nn.Module, where: str) -> None:
    """``ValueError`` when ``adapter_names`` given to ``where`` would be lost to gradient checkpointing's
    recomputation (module docstring)."""
    if gradient_checkpointing_on(model):
        raise ValueError(f"adapter_names passed to {where} of a training model with gradient checkpointing: the "
                         "recomputation during backward runs after the call returned and would not see the "
                         "routing. Route forward and backward together: `with lora_triton.route_adapters(model, "
                         "adapter_names): loss = model(...).loss; loss.backward()`")


def _route_forward(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: take ``adapter_names`` out of the keywords and route it for this call."""
    router: AdapterRouter = getattr(model, _ROUTER_ATTR)
    adapter_names = kwargs.pop("adapter_names", None)
    if adapter_names is not None and (router.generating or router.scoped):
        where = "generate()" if router.generating else "route_adapters()"
        raise ValueError(f"adapter_names was given to {where}; do not pass it to forward as well")
    router._previous.append(router.current)
    if adapter_names is not None:
        try:
            refuse_unscoped_recomputation(model, "forward")
            batch, device = _batch_and_device(model, args, kwargs)
            router.current = router.route(adapter_names, batch, device)
        except BaseException:
            router._previous.pop()
            raise
    return args, kwargs


def _end_forward(model: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook (also when the forward raised): the routing this call set ends with it."""
    router: AdapterRouter = getattr(model, _ROUTER_ATTR)
    if router._previous:
        router.current = router._previous.pop()
    return output


def _generate_with_adapter_names(model: nn.Module, *args, adapter_names=None, **kwargs):
    """``generate`` of the model's class, with each sequence's adapter from ``adapter_names``."""
    generate = functools.partial(type(model).generate, model)
    if adapter_names is None:
        return generate(*args, **kwargs)
    router: AdapterRouter = getattr(model, _ROUTER_ATTR)
    if router.scoped:
        raise ValueError("adapter_names was given to route_adapters(); do not pass it to generate as well")
    batch, device = _batch_and_device(model, args, kwargs)
    mixed = router.route(adapter_names, batch, device, expandable=True)
    previous = router.current, router.generating
    router.current, router.generating = mixed, True
    try:
        return generate(*args, **kwargs)
    finally:
        router.current, router.generating = previous


@contextlib.contextmanager
def routed_call(model: nn.Module, adapter_names, batch: int | None, device: torch.device, where: str):
    """The routing of one call that runs the model's layers without its forward (``causal_lm_loss``
    runs the decoder body): ``adapter_names`` (None: nothing routed) for the block, checked as a
    forward checks it."""
    if adapter_names is None:
        yield None
        return
    router = enable_adapter_names(model)
    if router.scoped or router.generating:
        raise ValueError(f"adapter_names was given to {'generate()' if router.generating else 'route_adapters()'}; "
                         f"do not pass it to {where} as well")
    refuse_unscoped_recomputation(model, where)
    mixed = router.route(adapter_names, batch, device)
    previous = router.current
    router.current = mixed
    try:
        yield mixed
    finally:
        router.current = previous


@contextlib.contextmanager
def route_adapters(model: nn.Module, adapter_names):
    """``with route_adapters(model, names):`` - every forward of ``model`` in the block runs the mixed
    batch ``names`` (one adapter name per row, ``"__base__"`` for none; or ``adapter_ids``), and so does
    the recomputation of gradient checkpointing during a ``backward()`` in the block. The names are
    checked against the model here (PEFT's errors), the batch size at each forward."""
    router = enable_adapter_names(model)
    if router.scoped or router.generating:
        raise ValueError("route_adapters() blocks do not nest, nor run inside generate()")
    _, device = _batch_and_device(model, (), {})
    mixed = router.route(adapter_names, None, device)
    previous = router.current
    router.current, router.scoped = mixed, True
    try:
        yield mixed
    finally:
        router.current, router.scoped = previous, False


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
    model.register_forward_hook(_end_forward, with_kwargs=True, always_call=True)
    if callable(getattr(type(model), "generate", None)):
        # a partial, not a bound method: it pickles (a bound method pickles as getattr(model, its name))
        model.generate = functools.partial(_generate_with_adapter_names, model)
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
