"""Layer 6 - model integration: inject LoRA into existing models, convert PEFT models, save and
load adapters in PEFT's file format, merge for deployment, mixed-adapter batches (PEFT's
``adapter_names``), ``transformers.Trainer`` checkpoints in PEFT's layout."""

from .adapters import delete_adapter, disable_adapters, lora_layers, set_adapter
from .bnb_base import bnb_linear4bit, quantize_with_bnb
from .inject import AdapterSpec, inject_lora
from .mixed_batch import adapter_ids, adapter_slots, enable_adapter_names, route_adapters, set_trainable_adapters
from .merge import MergeError, MergeReport, merge_into_nf4, merge_to_linear, unmerge
from .peft_convert import from_peft
from .peft_io import adapter_config, adapter_state_dict, load_adapter, read_adapter, save_adapter, save_adapters
from .report import InjectionReport, memory_bytes, parameter_counts
from .targets import find_targets
from .trainer import disable_adapter_checkpoints, enable_adapter_checkpoints, save_adapter_checkpoint

__all__ = ["inject_lora", "AdapterSpec", "InjectionReport", "find_targets", "memory_bytes", "parameter_counts",
           "lora_layers", "set_adapter", "delete_adapter", "disable_adapters", "from_peft", "save_adapter",
           "load_adapter", "read_adapter", "adapter_state_dict", "adapter_config", "merge_to_linear",
           "merge_into_nf4", "unmerge", "MergeReport", "MergeError", "quantize_with_bnb", "bnb_linear4bit",
           "enable_adapter_names", "adapter_ids", "adapter_slots", "set_trainable_adapters", "save_adapters",
           "enable_adapter_checkpoints", "disable_adapter_checkpoints", "save_adapter_checkpoint", "route_adapters"]
