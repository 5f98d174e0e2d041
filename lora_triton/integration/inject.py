"""One call turns an existing model into a QLoRA model, in place."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

from ..format.nf4 import check_blocksize
from ..modules import LoRALinear4bit, NF4Linear
from ..modules.lora_linear4bit import check_adapter_hyperparameters
from ..modules.nf4_linear import check_standard_bnb_layout
from .peft_config import (check_peft_only_fields, default_target_modules, fields_from_peft_config, is_peft_config,
                          pattern_value, record_task_type)
from .adapters import lora_layers, set_adapter
from .mixed_batch import enable_adapter_names, set_trainable_adapters
from .report import InjectionReport, memory_bytes, parameter_counts
from .targets import TargetSpec, find_targets


@dataclass(frozen=True)
class AdapterSpec:
    """Hyper-parameters of one adapter, as PEFT's ``LoraConfig`` names them (checked on creation)."""

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: str | bool = True

    def __post_init__(self) -> None:
        check_adapter_hyperparameters(self.r, self.lora_alpha, self.lora_dropout, self.use_rslora,
                                      self.init_lora_weights)


def is_bnb_linear4bit(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def to_lora_layer(module: nn.Module, name: str, spec: AdapterSpec, adapter_name: str, blocksize: int = 64,
                  double_quant: bool = True, backend: str | None = None) -> LoRALinear4bit:
    """A ``LoRALinear4bit`` for ``module`` (named ``name`` in its model) carrying adapter ``adapter_name``.

    ``nn.Linear`` is quantized to NF4 (``blocksize``, ``double_quant``); a bitsandbytes NF4
    ``Linear4bit`` is wrapped sharing its bytes; a ``LoRALinear4bit`` gets the adapter added
    and is returned itself. Anything else raises ``TypeError``.
    """
    args = (spec.r, spec.lora_alpha)
    kwargs = dict(lora_dropout=spec.lora_dropout, use_rslora=spec.use_rslora,
                  init_lora_weights=spec.init_lora_weights, adapter_name=adapter_name, backend=backend)
    check_convertible(module, name)
    if isinstance(module, LoRALinear4bit):
        module.add_adapter(adapter_name, *args, spec.lora_dropout, spec.use_rslora, spec.init_lora_weights)
        return module
    if is_bnb_linear4bit(module):
        return LoRALinear4bit.from_bnb(module, *args, **kwargs)
    return LoRALinear4bit.from_linear(module, *args, blocksize=blocksize, double_quant=double_quant, **kwargs)


def check_convertible(module: nn.Module, name: str) -> None:
    """Raise ``TypeError`` unless ``to_lora_layer`` can handle ``module``."""
    # nn.Linear subclasses other than Linear4bit (8-bit, other quantizers) hold weights we cannot read.
    if is_bnb_linear4bit(module) and getattr(module.weight, "quant_type", "nf4") != "nf4":
        raise ValueError(f"{name!r} is a bitsandbytes Linear4bit with quant_type={module.weight.quant_type!r}; "
                         "only NF4 is supported")
    if is_bnb_linear4bit(module):
        check_standard_bnb_layout(module, name)
    if isinstance(module, LoRALinear4bit) or is_bnb_linear4bit(module) or type(module) is nn.Linear:
        return
    raise TypeError(f"cannot put a LoRA adapter on {name!r} of type {type(module).__module__}."
                    f"{type(module).__qualname__}: expected torch.nn.Linear, bitsandbytes.nn.Linear4bit (NF4) "
                    "or LoRALinear4bit")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the sub-module called ``name`` is (``ValueError`` for ``""``: a model
    cannot replace itself in place)."""
    if not name:
        raise ValueError(f"cannot replace the model itself (a {type(model).__name__}) in place; pass the model "
                         "that contains it")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def inject_lora(model: nn.Module, target_modules: TargetSpec | object = "all-linear", r: int = 8,
                lora_alpha: float = 16, lora_dropout: float = 0.0, use_rslora: bool = False,
                exclude_modules: TargetSpec | None = None, adapter_name: str | list[str] = "default",
                init_lora_weights: str | bool = True, blocksize: int = 64, double_quant: bool = True,
                include_lm_head: bool = False, backend: str | None = None, *, bias: str = "none",
                task_type: str | None = None, modules_to_save: list[str] | None = None,
                rank_pattern: dict | None = None, alpha_pattern: dict | None = None) -> InjectionReport:
    """Convert ``model`` in place into a QLoRA model and freeze everything but the adapters.

    ``target_modules`` may be a ``peft.LoraConfig`` instead (``inject_lora(model, config)``, as
    ``get_peft_model(model, config)``): its fields are used, and a field set to a PEFT feature
    these layers lack raises a ``ValueError`` naming it. Otherwise the fields come as keywords,
    with PEFT's names: every ``nn.Linear`` / bitsandbytes NF4 ``Linear4bit`` whose qualified name
    matches ``target_modules`` (PEFT's rules: list of names matched as suffixes, a full-match
    regex, or ``"all-linear"``; ``None``: PEFT's default projections for ``model.config.model_type``)
    and not ``exclude_modules`` becomes a ``LoRALinear4bit`` (fp32 adapter ``A [r, in]``,
    ``B [out, r]``; ``rank_pattern`` / ``alpha_pattern`` override r / alpha per layer). Targets that
    already are ``LoRALinear4bit`` get the new adapter ``adapter_name`` added and made active.
    The output head is skipped unless ``include_lm_head``. All other parameters (embeddings,
    norms, head, inactive adapters) get ``requires_grad=False``. ``adapter_name`` may be a list:
    each gets its own adapter of these settings, all of them trainable (for training them in one
    pass on mixed batches, ``model(..., adapter_names=[...])``), the first one active.
    Afterwards the model takes PEFT's ``adapter_names`` (``mixed_batch.enable_adapter_names``), and
    a ``transformers`` model's ``save_pretrained`` writes the adapters in PEFT's layout (what
    ``transformers.Trainer`` checkpoints hold; ``trainer.enable_adapter_checkpoints``). ``bias`` must be ``"none"`` and
    ``modules_to_save`` None (not supported); ``task_type`` is recorded for ``save_adapter``.

    Atomic: every check (hyper-parameters, targets, adapter-name clashes, quantization of every
    layer) runs before the model changes, so a ``ValueError``/``TypeError`` leaves it untouched.

    Returns an ``InjectionReport`` (``print`` it): converted layer names, trainable count and
    percentage, bytes of parameters + buffers before and after.
    """
    if not isinstance(adapter_name, str):
        return _inject_several(model, list(adapter_name), target_modules=target_modules, r=r, lora_alpha=lora_alpha,
                               lora_dropout=lora_dropout, use_rslora=use_rslora, exclude_modules=exclude_modules,
                               init_lora_weights=init_lora_weights, blocksize=blocksize, double_quant=double_quant,
                               include_lm_head=include_lm_head, backend=backend, bias=bias, task_type=task_type,
                               modules_to_save=modules_to_save, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    fields = dict(target_modules=target_modules, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                  use_rslora=use_rslora, exclude_modules=exclude_modules, init_lora_weights=init_lora_weights,
                  bias=bias, task_type=task_type, modules_to_save=modules_to_save, rank_pattern=rank_pattern,
                  alpha_pattern=alpha_pattern)
    if is_peft_config(target_modules):
        defaults = {name: p.default for name, p in inspect.signature(inject_lora).parameters.items()}
        fields = fields_from_peft_config(target_modules, {k: v for k, v in fields.items() if v != defaults[k]
                                                          and k != "target_modules"})
    fields["rank_pattern"], fields["alpha_pattern"] = fields["rank_pattern"] or {}, fields["alpha_pattern"] or {}
    check_peft_only_fields(fields["bias"], fields["modules_to_save"], fields["task_type"])
    check_blocksize(blocksize)
    targets = fields["target_modules"]
    if targets is None:
        targets = default_target_modules(model)
    before = memory_bytes(model)
    names = find_targets(model, targets, fields["exclude_modules"], include_lm_head)
    layers = {name: model.get_submodule(name) for name in names}
    specs = {name: AdapterSpec(pattern_value(fields["rank_pattern"], name, fields["r"]),
                               pattern_value(fields["alpha_pattern"], name, fields["lora_alpha"]),
                               fields["lora_dropout"], fields["use_rslora"], fields["init_lora_weights"])
             for name in names}
    for name, module in layers.items():  # fail before changing anything
        check_convertible(module, name)
        if isinstance(module, LoRALinear4bit):
            check_can_add_adapter(module, name, adapter_name)
    new_layers = {name: to_lora_layer(module, name, specs[name], adapter_name, blocksize, double_quant, backend)
                  for name, module in layers.items() if not isinstance(module, LoRALinear4bit)}
    model.requires_grad_(False)
    for name, module in layers.items():
        if name in new_layers:
            replace_module(model, name, new_layers[name])
        else:
            to_lora_layer(module, name, specs[name], adapter_name)
    for module in model.modules():
        if isinstance(module, LoRALinear4bit) and module.active_adapter is not None:
            module.set_adapter(module.active_adapter)  # re-enable grads of the active adapters only
    if fields["task_type"] is not None:
        record_task_type(model, adapter_name, fields["task_type"])
    enable_adapter_names(model)
    from .trainer import enable_adapter_checkpoints  # here: trainer -> peft_io -> inject would be a cycle

    enable_adapter_checkpoints(model)
    trainable, total = parameter_counts(model)
    return InjectionReport(tuple(names), trainable, total, before, memory_bytes(model), full_precision_linears(model))


def full_precision_linears(model: nn.Module) -> tuple[str, ...]:
    """Names of the model's plain ``nn.Linear`` layers (not converted: full precision, no adapter); the
    adapters' own ``lora_A`` / ``lora_B`` inside our layers are not counted."""
    ours = [name + "." for name, module in model.named_modules() if isinstance(module, (LoRALinear4bit, NF4Linear))]
    return tuple(name for name, module in model.named_modules()
                 if type(module) is nn.Linear and not any(name.startswith(prefix) for prefix in ours))


def _inject_several(model: nn.Module, adapter_names: list[str], **fields) -> InjectionReport:
    """``inject_lora`` with a list of adapter names: one adapter each, all trainable, the first active."""
    if not adapter_names or any(not isinstance(name, str) for name in adapter_names):
        raise ValueError(f"adapter_name must be a str or a non-empty list of str, got {adapter_names!r}")
    if len(set(adapter_names)) != len(adapter_names):
        raise ValueError(f"adapter_name lists a name twice: {adapter_names!r}")
    for layer_name, layer in lora_layers(model).items():  # fail before changing anything
        for name in adapter_names:
            check_can_add_adapter(layer, layer_name, name)
    first = inject_lora(model, adapter_name=adapter_names[0], **fields)
    for name in adapter_names[1:]:
        inject_lora(model, adapter_name=name, **fields)
    set_adapter(model, adapter_names[0])
    set_trainable_adapters(model, adapter_names)
    trainable, total = parameter_counts(model)
    return InjectionReport(first.converted, trainable, total, first.memory_before, memory_bytes(model),
                           first.full_precision)


def check_can_add_adapter(layer: LoRALinear4bit, name: str, adapter_name: str) -> None:
    """``ValueError`` unless adapter ``adapter_name`` can be added to ``layer`` (called ``name``)."""
    if adapter_name in layer.lora_A:
        raise ValueError(f"{name!r} already has an adapter named {adapter_name!r}; pick another adapter_name "
                         "(nothing was changed)")
    if layer.merged_adapter is not None:
        raise ValueError(f"{name!r} has adapter {layer.merged_adapter!r} merged into its NF4 base; unmerge() first "
                         "(nothing was changed)")
