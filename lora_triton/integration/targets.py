"""Which modules of a model get an adapter: PEFT's ``target_modules`` / ``exclude_modules`` rules.

- a list of names matches a module whose qualified name equals an entry or ends in ``"." + entry``;
- a string is a regular expression that must match the whole qualified name;
- ``"all-linear"`` means every linear layer except the output head.

Modules inside a ``LoRALinear4bit`` (its ``lora_A``/``lora_B`` linears) are never targets.
The output head (``model.get_output_embeddings()``) is left alone unless asked for.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence, Union

from torch import nn

from ..modules import LoRALinear4bit

ALL_LINEAR = "all-linear"
TargetSpec = Union[str, Sequence[str]]


def _name_matches(name: str, spec: TargetSpec) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def output_head_name(model: nn.Module) -> str | None:
    """Qualified name of the model's output embedding (LM head), or None if it has none."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every named module that could be a target: all modules except the model itself and the
    sub-modules of ``LoRALinear4bit`` layers (an adapter never wraps another adapter)."""
    inside_lora = {f"{name}.{sub}" for name, module in model.named_modules() if isinstance(module, LoRALinear4bit)
                   for sub, _ in module.named_modules() if sub}
    return {name: module for name, module in model.named_modules() if name and name not in inside_lora}


def _linear_names(modules: dict[str, nn.Module]) -> list[str]:
    return [name for name, module in modules.items() if isinstance(module, (nn.Linear, LoRALinear4bit))]


def find_targets(model: nn.Module, target_modules: TargetSpec, exclude_modules: TargetSpec | None = None,
                 include_lm_head: bool = False) -> list[str]:
    """Qualified names of the modules selected by ``target_modules`` minus ``exclude_modules``.

    Raises ``ValueError`` when nothing matches, or when an entry of a ``target_modules`` list
    matches no module at all (a typo would otherwise silently train nothing there), and
    ``TypeError`` for a bad ``target_modules`` type.
    """
    _check_spec(target_modules, "target_modules")
    if exclude_modules is not None:
        _check_spec(exclude_modules, "exclude_modules")
    modules = candidate_modules(model)
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        chosen = _linear_names(modules)
    else:
        chosen = [name for name in modules if _name_matches(name, target_modules)]
        _check_every_entry_used(target_modules, modules)
    head = None if include_lm_head else output_head_name(model)
    excluded = [name for name in chosen if exclude_modules is not None and _name_matches(name, exclude_modules)]
    targets = [name for name in chosen if name not in excluded and name != head]
    if not targets:
        raise ValueError(f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no "
                         f"module; linear layers in this model: {_preview(_linear_names(modules))}")
    return targets


def _check_spec(spec, what: str) -> None:
    if isinstance(spec, str):
        return
    if not isinstance(spec, Iterable) or not all(isinstance(entry, str) for entry in spec):
        raise TypeError(f"{what} must be a list of module names, a regex string or 'all-linear', got {spec!r}")
    if len(list(spec)) == 0:
        raise ValueError(f"{what} is empty")


def _check_every_entry_used(spec: TargetSpec, modules: dict[str, nn.Module]) -> None:
    if isinstance(spec, str):
        return
    unused = [entry for entry in spec if not any(_name_matches(name, [entry]) for name in modules)]
    if unused:
        raise ValueError(f"target_modules entries {unused} match no module name; linear layers in this model: "
                         f"{_preview(_linear_names(modules))}")


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "(none)"
