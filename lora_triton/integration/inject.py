"""One call turns an existing model into a QLoRA model, in place."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..modules import LoRALinear4bit
from ..modules.nf4_linear import check_standard_bnb_layout
from .report import InjectionReport, memory_bytes, parameter_counts
from .targets import TargetSpec, find_targets


@dataclass(frozen=True)
class AdapterSpec:
    """Hyper-parameters of one adapter, as PEFT's ``LoraConfig`` names them."""

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: str | bool = True


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
    """Put ``new`` where the sub-module called ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def inject_lora(model: nn.Module, target_modules: TargetSpec = "all-linear", r: int = 8, lora_alpha: float = 16,
                lora_dropout: float = 0.0, use_rslora: bool = False, exclude_modules: TargetSpec | None = None,
                adapter_name: str = "default", init_lora_weights: str | bool = True, blocksize: int = 64,
                double_quant: bool = True, include_lm_head: bool = False,
                backend: str | None = None) -> InjectionReport:
    """Convert ``model`` in place into a QLoRA model and freeze everything but the adapters.

    Every ``nn.Linear`` / bitsandbytes NF4 ``Linear4bit`` whose qualified name matches
    ``target_modules`` (PEFT's rules: list of names matched as suffixes, a full-match regex,
    or ``"all-linear"``) and not ``exclude_modules`` becomes a ``LoRALinear4bit`` (fp32
    adapter ``A [r, in]``, ``B [out, r]``). Targets that already are ``LoRALinear4bit`` get
    the new adapter ``adapter_name`` added and made active. The output head is skipped unless
    ``include_lm_head``. All other parameters (embeddings, norms, head, inactive adapters) get
    ``requires_grad=False``.

    Returns an ``InjectionReport`` (``print`` it): converted layer names, trainable count and
    percentage, bytes of parameters + buffers before and after.
    """
    spec = AdapterSpec(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
    before = memory_bytes(model)
    names = find_targets(model, target_modules, exclude_modules, include_lm_head)
    layers = {name: model.get_submodule(name) for name in names}
    for name, module in layers.items():  # fail before changing anything
        check_convertible(module, name)
    model.requires_grad_(False)
    for name, module in layers.items():
        layer = to_lora_layer(module, name, spec, adapter_name, blocksize, double_quant, backend)
        if layer is not module:
            replace_module(model, name, layer)
    for module in model.modules():
        if isinstance(module, LoRALinear4bit) and module.active_adapter is not None:
            module.set_adapter(module.active_adapter)  # re-enable grads of the active adapters only
    trainable, total = parameter_counts(model)
    return InjectionReport(tuple(names), trainable, total, before, memory_bytes(model))
