"""``transformers.Trainer`` checkpoints in PEFT's layout, with no callback and no Trainer subclass.

The Trainer saves a ``PreTrainedModel`` with ``model.save_pretrained(folder, state_dict=None,
is_main_process=...)``, and on ``resume_from_checkpoint`` (and ``load_best_model_at_end``)
reads the folder's ``model.safetensors`` back with ``model.load_state_dict(tensors, False)``.
It special-cases ``peft.PeftModel`` in both places (``save_pretrained`` writes the adapter,
resuming calls ``load_adapter``); a model converted in place by ``inject_lora`` is a plain
``transformers`` model to it, so by default every checkpoint would hold the whole state dict,
NF4 bytes and embeddings included, and a checkpoint without it could not be resumed.

``inject_lora`` therefore calls ``enable_adapter_checkpoints(model)``, which gives that model
instance (not its class) a ``save_pretrained`` writing only the adapters:

``adapter_model.safetensors`` + ``adapter_config.json``
    PEFT's layout of ``PeftModel.save_pretrained``: adapter ``"default"`` in the folder itself,
    every other adapter in ``<folder>/<name>/`` (as ``save_adapters`` writes them);
    ``peft.PeftModel.from_pretrained`` and ``load_adapter`` read them.
``model.safetensors``
    the same adapter tensors under the model's own state-dict keys
    (``<layer>.lora_A.<adapter>.weight``), plus a marker entry: the file the Trainer's resume path
    loads. With ``strict=False`` ``load_state_dict`` ignores keys the model lacks without a
    word, so a load-state-dict pre-hook on the model checks a file carrying the marker: every
    adapter tensor in it must exist in the model with the same shape, and every adapter of the
    model must be in it; otherwise ``load_state_dict`` raises instead of resuming from untrained
    adapters.

A checkpoint is then the adapters twice (a few MB; 19.5 MB per copy at rank 16 on every
projection of a 135M model) plus the Trainer's optimizer, scheduler and RNG state, instead of
the whole model.
The NF4 base is not saved: resuming needs the same base model, converted with the same
``inject_lora`` call, as with PEFT. ``disable_adapter_checkpoints(model)`` restores
``transformers``' own ``save_pretrained`` (the whole state dict, NF4 bytes in bitsandbytes'
keys) for those who ask for it.

Models without a ``transformers`` ``save_pretrained`` (plain ``nn.Module``) are left alone: the
Trainer saves their ``state_dict()`` itself.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import nn

from .adapters import lora_layers
from .peft_io import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, adapter_config

#: The file ``transformers.Trainer`` resumes from (its ``SAFE_WEIGHTS_NAME``).
RESUME_NAME = "model.safetensors"
#: The marker entry of a resume file; its value is the file layout's version.
MARKER = "__lora_triton_adapter_checkpoint__"
_HOOK_FLAG = "_lora_triton_resume_check"
_IGNORED_KEYWORDS = ("safe_serialization", "max_shard_size")


def _adapter_weights(model: nn.Module) -> dict[str, dict[str, tuple[str, nn.Parameter]]]:
    """``{adapter: {state-dict key: (PEFT key, parameter)}}`` of every LoRA weight of the model."""
    out: dict[str, dict[str, tuple[str, nn.Parameter]]] = {}
    for path, layer in lora_layers(model).items():
        for name in layer.lora_A:
            for which, table in (("A", layer.lora_A), ("B", layer.lora_B)):
                out.setdefault(name, {})[f"{path}.lora_{which}.{name}.weight"] = (
                    f"{KEY_PREFIX}{path}.lora_{which}.weight", table[name].weight)
    return out


def _tensor(key: str, param: nn.Parameter, state_dict: dict | None) -> torch.Tensor:
    """The weight to save: from ``state_dict`` when one is given, else the parameter itself."""
    if state_dict is None:
        return param.detach().cpu().contiguous()
    if key not in state_dict:
        raise ValueError(f"the state_dict passed to save_pretrained lacks the adapter weight {key!r}")
    return state_dict[key].detach().cpu().contiguous()


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def save_adapter_checkpoint(model: nn.Module, save_directory: str | Path, state_dict: dict | None = None,
                            is_main_process: bool = True, selected_adapters: list[str] | None = None,
                            push_to_hub: bool = False, **kwargs) -> Path:
    """What ``model.save_pretrained`` does once ``enable_adapter_checkpoints(model)`` ran
    (module docstring): PEFT's files of every adapter (or of ``selected_adapters``) plus the
    Trainer's resume file ``model.safetensors``. The tensors come from ``state_dict`` when one
    is given (the Trainer passes a gathered one under DeepSpeed / FSDP), else from the model.
    Nothing is written unless ``is_main_process``. ``safe_serialization`` / ``max_shard_size``
    are accepted and ignored (always one safetensors file); ``push_to_hub`` and any other
    keyword raise before anything is written. Returns ``save_directory``."""
    from safetensors.torch import save_file

    if push_to_hub:
        raise ValueError("save_pretrained of a model with lora-triton adapters does not push to the Hub; push the "
                         "saved folder with huggingface_hub instead")
    unknown = sorted(set(kwargs) - set(_IGNORED_KEYWORDS))
    if unknown:
        raise TypeError(f"save_pretrained of a model with lora-triton adapters writes the adapters only and takes "
                        f"state_dict, is_main_process and selected_adapters; got {', '.join(unknown)}. "
                        "disable_adapter_checkpoints(model) restores transformers' own save_pretrained.")
    weights = _adapter_weights(model)
    if not weights:
        raise ValueError("the model has no LoRA adapters to save")
    names = list(weights) if selected_adapters is None else list(selected_adapters)
    missing = sorted(set(names) - set(weights))
    if missing or not names:
        raise ValueError(f"selected_adapters must name adapters of the model ({list(weights)}), got {names}")
    configs = {name: adapter_config(model, name) for name in names}  # raises before any file is written
    tensors = {name: {key: _tensor(key, param, state_dict) for key, (_, param) in weights[name].items()}
               for name in names}
    directory = Path(save_directory)
    if not is_main_process:
        return directory
    for name in names:
        folder = directory if name == "default" else directory / name
        folder.mkdir(parents=True, exist_ok=True)
        save_file({weights[name][key][0]: t for key, t in tensors[name].items()}, str(folder / WEIGHTS_NAME),
                  metadata={"format": "pt"})
        (folder / CONFIG_NAME).write_text(json.dumps(configs[name], indent=2, sort_keys=True) + "\n")
    resume = {key: t for name in names for key, t in tensors[name].items()}
    resume[MARKER] = torch.tensor([1], dtype=torch.int32)
    save_file(resume, str(directory / RESUME_NAME),
              metadata={"format": "pt", "lora_triton": "adapter weights only, under the model's state-dict keys "
                        "(transformers.Trainer resumes from this file); PEFT's files: adapter_model.safetensors"})
    return directory


def _save_pretrained(model: nn.Module, save_directory, *args, **kwargs) -> Path:
    """``save_pretrained`` of a model with lora-triton adapters: ``save_adapter_checkpoint``."""
    if args:
        raise TypeError("save_pretrained of a model with lora-triton adapters takes one positional argument, the "
                        "folder; pass the others by keyword")
    return save_adapter_checkpoint(model, save_directory, **kwargs)


def _check_resume_file(module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs) -> None:
    """Load-state-dict pre-hook: a resume file (it carries ``MARKER``) must match the model's
    adapters exactly, names and shapes; the marker itself is removed before loading."""
    if prefix or MARKER not in state_dict:
        return
    state_dict.pop(MARKER)
    ours = {key: param for weights in _adapter_weights(module).values() for key, (_, param) in weights.items()}
    problems = []
    if unknown := sorted(set(state_dict) - set(ours)):
        problems.append(f"the model has no adapter weight {_some(unknown)}")
    if absent := sorted(set(ours) - set(state_dict)):
        problems.append(f"the checkpoint lacks {_some(absent)}")
    if shapes := sorted(k for k in set(state_dict) & set(ours) if state_dict[k].shape != ours[k].shape):
        problems.append(f"the checkpoint has other shapes for {_some(shapes)}")
    if problems:
        error_msgs.append(f"this lora-triton adapter checkpoint does not fit the model ({'; '.join(problems)}): "
                          "resume with the same base model converted by the same inject_lora call (targets, ranks, "
                          "adapter names)")


def enable_adapter_checkpoints(model: nn.Module) -> bool:
    """Give ``model`` (an instance with ``transformers``' ``save_pretrained``) the adapter-only
    ``save_pretrained`` and the resume check of the module docstring. Idempotent. Returns False
    (and changes nothing) for a model without ``save_pretrained``."""
    if not callable(getattr(type(model), "save_pretrained", None)):
        return False
    # a partial of a module-level function pickles (a bound method stored on the instance does not)
    model.save_pretrained = functools.partial(_save_pretrained, model)
    if not getattr(model, _HOOK_FLAG, False):
        model.register_load_state_dict_pre_hook(_check_resume_file)
        object.__setattr__(model, _HOOK_FLAG, True)
    return True


def disable_adapter_checkpoints(model: nn.Module) -> None:
    """Restore ``transformers``' own ``save_pretrained`` on ``model``: checkpoints then hold the
    whole state dict (NF4 bytes under bitsandbytes' keys, embeddings, norms, adapters). The
    resume check stays; it only acts on files that carry the marker."""
    if "save_pretrained" in vars(model):
        del model.save_pretrained
