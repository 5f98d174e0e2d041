"""PEFT's conventions: ``LoraConfig`` fields, ``rank_pattern`` lookups, task types.

``inject_lora(model, peft.LoraConfig(...))`` reads the config here: the fields these layers
implement are used, metadata fields are ignored, and any other field set away from PEFT's
default names a feature lora-triton lacks, so it raises a ``ValueError`` naming the field.
``save_adapter`` fills ``task_type`` and ``base_model_name_or_path`` from the model here.
"""

from __future__ import annotations

import dataclasses
import re

from torch import nn

#: ``LoraConfig`` fields ``inject_lora`` takes (``target_modules`` ... ``alpha_pattern``).
USED_FIELDS = ("target_modules", "r", "lora_alpha", "lora_dropout", "use_rslora", "exclude_modules",
               "init_lora_weights", "bias", "task_type", "modules_to_save", "rank_pattern", "alpha_pattern")
#: Fields that describe the config, not the adapter (or only matter with a feature that is off).
METADATA_FIELDS = ("peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                   "inference_mode", "megatron_core", "runtime_config", "qalora_group_size")
#: PEFT's task types (``peft.TaskType`` values).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
_TASK_TYPE_ATTR = "_lora_triton_task_types"


def is_peft_config(value) -> bool:
    """True for a ``peft.LoraConfig`` (or any PEFT config: its ``peft_type`` is checked later)."""
    return dataclasses.is_dataclass(value) and hasattr(value, "peft_type")


def _text(value) -> object:
    """An enum member's value (PEFT stores ``TaskType``/``PeftType`` enums), anything else as is."""
    return getattr(value, "value", value)


def fields_from_peft_config(config, keywords: dict) -> dict:
    """``inject_lora``'s fields read from a PEFT ``config``. ``keywords``: the fields ``inject_lora``
    got as keywords away from their defaults, which must be empty (one source of truth). Raises
    ``ValueError`` for those, a non-LoRA config, or a field set to a feature these layers lack,
    naming it."""
    from peft import LoraConfig

    if keywords:
        raise ValueError(f"give the adapter's fields either in the LoraConfig or as keywords, not both: got "
                         f"{sorted(keywords)} as keywords with a LoraConfig")
    if _text(config.peft_type) != "LORA":
        raise ValueError(f"expected a LoraConfig, got a config with peft_type={_text(config.peft_type)!r}")
    defaults = {f.name: getattr(LoraConfig(), f.name) for f in dataclasses.fields(LoraConfig)}
    unsupported = [name for name, default in defaults.items()
                   if name not in USED_FIELDS + METADATA_FIELDS and getattr(config, name, default) != default]
    if unsupported:
        shown = ", ".join(f"{name}={getattr(config, name)!r}" for name in unsupported)
        raise ValueError(f"the LoraConfig sets {shown}: not supported by lora-triton (supported fields: "
                         f"{', '.join(USED_FIELDS)})")
    fields = {name: _text(getattr(config, name)) for name in USED_FIELDS}
    if isinstance(fields["target_modules"], (set, frozenset)):
        fields["target_modules"] = sorted(fields["target_modules"])
    if isinstance(fields["exclude_modules"], (set, frozenset)):
        fields["exclude_modules"] = sorted(fields["exclude_modules"])
    return fields


def check_peft_only_fields(bias: str, modules_to_save, task_type) -> None:
    """``ValueError`` unless ``bias`` / ``modules_to_save`` / ``task_type`` are values lora-triton supports."""
    if bias != "none":
        raise ValueError(f"bias={bias!r} is not supported (adapters here hold no bias): use bias='none', and "
                         "LoRALinear4bit(train_bias=True) to train a layer's own bias")
    if modules_to_save:
        raise ValueError(f"modules_to_save={modules_to_save!r} is not supported: lora-triton saves and loads LoRA "
                         "weights only")
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES} or None, got {task_type!r}")


def default_target_modules(model: nn.Module) -> list[str]:
    """PEFT's default ``target_modules`` for ``model.config.model_type`` (``LoraConfig`` with
    ``target_modules=None``); ``ValueError`` when PEFT has none for this model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults
    except ImportError:
        defaults = {}
    if model_type not in defaults:
        raise ValueError(f"target_modules=None needs PEFT's default for model_type={model_type!r}, and there is "
                         "none: give target_modules (a list of names, a regex or 'all-linear')")
    return list(defaults[model_type])


def pattern_value(pattern: dict, name: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a name it ends
    (as a regex, at a dot boundary); the first matching key wins."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", name):
            return value
    return default


def record_task_type(model: nn.Module, adapter_name: str, task_type: str) -> None:
    """Remember the ``task_type`` given to ``inject_lora`` for ``save_adapter``."""
    model.__dict__.setdefault(_TASK_TYPE_ATTR, {})[adapter_name] = task_type


def model_task_type(model: nn.Module, adapter_name: str) -> str | None:
    """The task type recorded for ``adapter_name``, else inferred from the model's class
    (``transformers``' ``*ForCausalLM`` -> ``"CAUSAL_LM"``, ...), else None."""
    recorded = model.__dict__.get(_TASK_TYPE_ATTR, {}).get(adapter_name)
    if recorded is not None:
        return recorded
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:
        return None
    class_names = {"CAUSAL_LM": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                   "SEQ_2_SEQ_LM": auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
                   "SEQ_CLS": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
                   "TOKEN_CLS": auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
                   "QUESTION_ANS": auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES}
    name = _model_class(model).__name__
    return next((task for task, mapping in class_names.items() if name in set(mapping.values())), None)


def _model_class(model: nn.Module) -> type:
    """The model's class; for a module FSDP2's ``fully_shard`` wrapped (class ``FSDP<Name>``), ``<Name>``."""
    cls = type(model)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return cls
    return next((c for c in cls.__mro__ if not issubclass(c, FSDPModule)), cls) if issubclass(cls, FSDPModule) \
        else cls


def model_name_or_path(model: nn.Module) -> str | None:
    """``model.config._name_or_path`` (what ``from_pretrained`` loaded), or None when empty or absent."""
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None
