"""Adapters in PEFT's own files: ``adapter_model.safetensors`` + ``adapter_config.json``.

PEFT saves a LoRA adapter of the layer ``<path>`` (its qualified name in the wrapped model) as
``base_model.model.<path>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``
(the adapter name is not in the key), and the hyper-parameters in ``adapter_config.json``
(``r``, ``lora_alpha``, ``rank_pattern``/``alpha_pattern`` for layers that differ,
``lora_dropout``, ``use_rslora``, ``target_modules``). Files written here load with
``peft.PeftModel.from_pretrained``; files PEFT writes load here.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..modules import LoRALinear4bit
from .adapters import lora_layers
from .mixed_batch import enable_adapter_names
from ..format.nf4 import check_blocksize
from .inject import AdapterSpec, check_can_add_adapter, check_convertible, replace_module, to_lora_layer
from .peft_config import model_name_or_path, model_task_type, pattern_value

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"(?P<path>.+)\.lora_(?P<which>[AB])\.weight")
# Config fields naming PEFT features these layers do not implement, with the value meaning "off".
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "bias": "none",
                "modules_to_save": None, "layer_replication": None, "trainable_token_indices": None,
                "target_parameters": None}


# ----------------------------------------------------------------------------- saving
def _adapter_layers(model: nn.Module, adapter_name: str) -> dict[str, LoRALinear4bit]:
    layers = {name: layer for name, layer in lora_layers(model).items() if adapter_name in layer.lora_A}
    if not layers:
        raise ValueError(f"no LoRALinear4bit layer of the model has an adapter named {adapter_name!r}")
    return layers


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s weights under PEFT's keys (CPU, contiguous, their own dtype)."""
    out = {}
    for name, layer in _adapter_layers(model, adapter_name).items():
        for which, table in (("A", layer.lora_A), ("B", layer.lora_B)):
            out[f"{KEY_PREFIX}{name}.lora_{which}.weight"] = table[adapter_name].weight.detach().cpu().contiguous()
    return out


def _uniform(values: dict[str, object], what: str, adapter_name: str):
    distinct = set(values.values())
    if len(distinct) != 1:
        raise ValueError(f"adapter {adapter_name!r} has different {what} per layer ({sorted(distinct)}); PEFT's "
                         "adapter_config.json holds a single value")
    return distinct.pop()


def _value_and_pattern(values: dict[str, float]) -> tuple[float, dict[str, float]]:
    """The most common value and the layers that differ from it (PEFT's ``*_pattern``)."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {name: value for name, value in values.items() if value != common}


def adapter_config(model: nn.Module, adapter_name: str = "default", base_model_name_or_path: str | None = None,
                   task_type: str | None = None) -> dict:
    """The ``adapter_config.json`` contents PEFT needs to rebuild adapter ``adapter_name``.

    ``target_modules`` lists the adapted layers by full name (PEFT matches a full name
    exactly), so PEFT adapts exactly these layers. ``task_type`` defaults to the one given to
    ``inject_lora``, else the model's (a ``transformers`` causal LM: ``"CAUSAL_LM"``), and
    ``base_model_name_or_path`` to ``model.config._name_or_path``: with both,
    ``peft.AutoPeftModelForCausalLM.from_pretrained(directory)`` loads the adapter. Raises
    ``ValueError`` if dropout or rsLoRA differ between layers (PEFT stores one value for each).
    """
    layers = _adapter_layers(model, adapter_name)
    task_type = task_type or model_task_type(model, adapter_name)
    base_model_name_or_path = base_model_name_or_path or model_name_or_path(model)
    r, rank_pattern = _value_and_pattern({n: layer.r[adapter_name] for n, layer in layers.items()})
    alpha, alpha_pattern = _value_and_pattern({n: layer.lora_alpha[adapter_name] for n, layer in layers.items()})
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "lora_dropout": _uniform({n: l.lora_dropout[adapter_name] for n, l in layers.items()}, "lora_dropout",
                                 adapter_name),
        "use_rslora": _uniform({n: l.use_rslora[adapter_name] for n, l in layers.items()}, "use_rslora",
                               adapter_name),
        "target_modules": sorted(layers), "exclude_modules": None, "init_lora_weights": True,
        "inference_mode": True, **_UNSUPPORTED,
    }


def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None, task_type: str | None = None) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to ``directory`` in PEFT's format; returns it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    config = adapter_config(model, adapter_name, base_model_name_or_path, task_type)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model, adapter_name), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def save_adapters(model: nn.Module, directory: str | Path, adapter_names: list[str] | None = None,
                  base_model_name_or_path: str | None = None, task_type: str | None = None) -> dict[str, Path]:
    """Write several adapters (default: every adapter of the model) in PEFT's layout of
    ``PeftModel.save_pretrained``: ``"default"`` in ``directory`` itself, every other one in
    ``directory/<name>``; each folder loads with ``PeftModel.from_pretrained`` or ``load_adapter``.
    All configs are built (and checked) before anything is written. Returns ``{name: folder}``."""
    if adapter_names is None:
        adapter_names = list(dict.fromkeys(name for layer in lora_layers(model).values() for name in layer.lora_A))
    if not adapter_names:
        raise ValueError("the model has no adapters to save")
    for name in adapter_names:
        adapter_config(model, name, base_model_name_or_path, task_type)  # raises before any file is written
    directory = Path(directory)
    return {name: save_adapter(model, directory if name == "default" else directory / name, name,
                               base_model_name_or_path, task_type) for name in adapter_names}


# ----------------------------------------------------------------------------- loading
def read_adapter(directory: str | Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``(config, {layer path: (A [r, in], B [out, r])})`` from a PEFT adapter directory.

    Raises ``ValueError`` for a non-LoRA or unsupported config and for keys that are not
    plain LoRA weights (DoRA magnitudes, embedding adapters, biases, a missing A or B).
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found (expected a PEFT adapter directory)")
    config = json.loads((directory / CONFIG_NAME).read_text())
    _check_config(config)
    return config, _pair_by_layer(load_file(str(directory / WEIGHTS_NAME)))


def _check_config(config: dict) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"adapter_config.json has peft_type={config.get('peft_type')!r}; only 'LORA' is supported")
    for field, off in _UNSUPPORTED.items():
        if config.get(field, off) not in (off, [], {}):
            raise ValueError(f"adapter_config.json sets {field}={config[field]!r}, which lora-triton does not "
                             f"support (expected {off!r})")


def _pair_by_layer(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key.removeprefix(KEY_PREFIX)) if key.startswith(KEY_PREFIX) else None
        if match is None:
            raise ValueError(f"unexpected key {key!r} in the adapter file; expected "
                             f"'{KEY_PREFIX}<module path>.lora_A.weight' / '.lora_B.weight'")
        halves.setdefault(match["path"], {})[match["which"]] = tensor
    incomplete = [path for path, pair in halves.items() if set(pair) != {"A", "B"}]
    if incomplete:
        raise ValueError(f"adapter file lacks lora_A or lora_B for {incomplete}")
    return {path: (pair["A"], pair["B"]) for path, pair in halves.items()}


def _spec_for(config: dict, path: str, a: torch.Tensor, b: torch.Tensor, module: nn.Module) -> AdapterSpec:
    r = pattern_value(config.get("rank_pattern") or {}, path, config["r"])
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
        raise ValueError(f"{path}: adapter config says r={r} but the file holds lora_A {list(a.shape)}, "
                         f"lora_B {list(b.shape)}")
    out_f, in_f = _features(module, path)
    if a.shape[1] != in_f or b.shape[0] != out_f:
        raise ValueError(f"{path}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit a layer with "
                         f"in_features={in_f}, out_features={out_f}")
    alpha = pattern_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"])
    return AdapterSpec(r, alpha, config.get("lora_dropout", 0.0), config.get("use_rslora", False), True)


def _features(module: nn.Module, path: str) -> tuple[int, int]:
    if isinstance(module, (nn.Linear, LoRALinear4bit)):
        return module.out_features, module.in_features
    raise TypeError(f"the adapter file has weights for {path!r}, a {type(module).__name__}; expected a linear layer")


def _check_same_spec(layer: LoRALinear4bit, path: str, name: str, spec: AdapterSpec) -> None:
    have = (layer.r[name], layer.lora_alpha[name], layer.use_rslora[name])
    want = (spec.r, spec.lora_alpha, spec.use_rslora)
    if have != want:
        raise ValueError(f"{path}: adapter {name!r} exists with (r, lora_alpha, use_rslora)={have} but the file "
                         f"has {want}; load it under another adapter_name or delete it first")


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default", blocksize: int = 64,
                 double_quant: bool = True, backend: str | None = None) -> list[str]:
    """Load a PEFT LoRA adapter into ``model`` (in place) as adapter ``adapter_name``.

    Each layer named in the file gets the adapter: an ``nn.Linear`` is quantized to NF4
    (``blocksize``, ``double_quant``), a bitsandbytes NF4 ``Linear4bit`` is wrapped sharing
    its bytes, a ``LoRALinear4bit`` gets it added (or, if it already has an adapter of that
    name with the same r/alpha/rsLoRA, overwritten). The adapter becomes active; everything
    but the active adapters is frozen. Returns the loaded layers' names.

    Everything is checked before the model changes: ``ValueError`` for unsupported configs,
    mismatched shapes or ranks, or layers the model lacks; ``TypeError`` for non-linear targets.
    """
    config, pairs = read_adapter(directory)
    check_blocksize(blocksize)
    specs, modules = {}, {}
    for path, (a, b) in pairs.items():
        try:
            modules[path] = module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"the adapter has weights for {path!r}, which this model does not have") from None
        specs[path] = _spec_for(config, path, a, b, module)
        check_convertible(module, path)
        if isinstance(module, LoRALinear4bit) and adapter_name in module.lora_A:
            _check_same_spec(module, path, adapter_name, specs[path])
        elif isinstance(module, LoRALinear4bit):
            check_can_add_adapter(module, path, adapter_name)
    # Quantize every new layer before the model changes (a weight that cannot be quantized fails here).
    new_layers = {path: to_lora_layer(module, path, specs[path], adapter_name, blocksize, double_quant, backend)
                  for path, module in modules.items() if not isinstance(module, LoRALinear4bit)}
    model.requires_grad_(False)
    for path, (a, b) in pairs.items():
        if path in new_layers:
            replace_module(model, path, new_layers[path])
        _load_layer(model.get_submodule(path), path, specs[path], a, b, adapter_name)
    for layer in lora_layers(model).values():
        if layer.active_adapter is not None and layer.merged_adapter is None:
            layer.set_adapter(layer.active_adapter)
    enable_adapter_names(model)
    return sorted(pairs)


def _load_layer(layer: LoRALinear4bit, path: str, spec: AdapterSpec, a: torch.Tensor, b: torch.Tensor,
                adapter_name: str) -> None:
    """Copy ``(a, b)`` into ``layer``'s adapter ``adapter_name`` (added first if it is new) and activate it."""
    if adapter_name not in layer.lora_A:
        to_lora_layer(layer, path, spec, adapter_name)
    with torch.no_grad():
        layer.lora_A[adapter_name].weight.copy_(a)
        layer.lora_B[adapter_name].weight.copy_(b)
    layer.set_adapter(adapter_name)
