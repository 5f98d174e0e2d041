"""Training on several processes through torch.distributed: DDP, FSDP2, checkpoints, PEFT export.

Nothing here is a distributed engine of its own: these are the few lines each engine needs to
treat a QLoRA model right, with the engines doing the work.

* ``wrap_ddp(model)`` - ``DistributedDataParallel`` over the trainable parameters only: the
  frozen base (NF4 bytes, embeddings, norms, head) is left out of DDP's start-up broadcast and is
  never in a gradient bucket; instead a 64-bit fingerprint of every frozen tensor is compared
  across ranks once, so a rank that built a different base fails at once, not silently.
* ``shard_model(model)`` - FSDP2 ``fully_shard`` per decoder layer, then the root. The NF4 bytes
  and block scales are frozen integer parameters of ``NF4Linear`` (see
  ``lora_triton/modules/nf4_linear.py``), so FSDP2 shards them ~1/world_size per rank and
  all-gathers them per layer for compute; ``MixedPrecisionPolicy`` casts the adapters (floats)
  and never the NF4 state (integers).
* ``save_checkpoint`` / ``load_checkpoint`` - ``torch.distributed.checkpoint`` of the adapters
  (and, with ``include_base=True``, the base in bitsandbytes' keys) plus, if given, the
  optimizer; each rank writes and reads only its shards, and a checkpoint reloads at another
  world size (world size 1 included, no process group needed).
* ``export_adapter(model, directory)`` - the adapter in PEFT's files, gathered from the shards
  (every rank calls it) and written by one rank; equal to ``save_adapter`` of the same model in
  one process.

``get_model_state_dict`` / ``set_model_state_dict`` of ``torch.distributed.checkpoint.state_dict``
do not handle bitsandbytes-style keys (``weight.absmax`` is no attribute path; the same holds for
bitsandbytes' own ``Linear4bit``): use ``save_checkpoint``/``load_checkpoint``, which pass the
model's own ``state_dict()`` (DTensors under FSDP2) to DCP. The optimizer goes through
``get_optimizer_state_dict``/``set_optimizer_state_dict``, keyed by parameter names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..modules import LoRALinear4bit, NF4Linear
from ..modules.nf4_linear import NF4_PARAMETERS, _is_dtensor
from .adapters import lora_layers
from .peft_io import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, adapter_config

_BLOB_SUFFIX = "weight.quant_state.bitsandbytes__nf4"

__all__ = ["wrap_ddp", "ignore_frozen_in_ddp", "shard_model", "decoder_layers", "nf4_parameter_names",
           "frozen_parameter_names",
           "base_fingerprint", "check_same_base", "nf4_storage_bytes", "checkpoint_state_dict", "save_checkpoint",
           "load_checkpoint", "export_adapter", "unwrap"]


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` (or ``torch.compile``) wrapper."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


# ----------------------------------------------------------------------------- names
def nf4_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of the NF4 parameters (packed bytes, block scales) of every ``NF4Linear``."""
    return [f"{name}.{p}" if name else p for name, module in model.named_modules() if isinstance(module, NF4Linear)
            for p in NF4_PARAMETERS if module._parameters.get(p) is not None]


def frozen_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of every parameter that does not train: the whole base model."""
    return [name for name, p in model.named_parameters() if not p.requires_grad]


# ----------------------------------------------------------------------------- the same base on every rank
def _tensor_fingerprint(t: torch.Tensor, chunk: int = 1 << 24) -> torch.Tensor:
    """A 64-bit position-weighted sum of a tensor's bytes (int64, on its device)."""
    data = t.detach()
    if _is_dtensor(data):
        data = data.to_local()
    data = data.contiguous().reshape(-1).view(torch.uint8)
    total = torch.zeros((), dtype=torch.int64, device=data.device)
    for start in range(0, data.numel(), chunk):
        part = data[start:start + chunk].to(torch.int64)
        weights = torch.arange(start + 1, start + 1 + part.numel(), device=data.device, dtype=torch.int64) % 65521
        total += (part * (weights + 1)).sum()
    return total


def base_fingerprint(model: nn.Module) -> torch.Tensor:
    """int64 ``[n]``: one fingerprint per frozen parameter (in ``named_parameters`` order)."""
    values = [_tensor_fingerprint(p) for _, p in unwrap(model).named_parameters() if not p.requires_grad]
    return torch.stack(values) if values else torch.zeros(0, dtype=torch.int64)


def check_same_base(model: nn.Module, group=None) -> None:
    """Raise ``RuntimeError`` on every rank unless all ranks hold the same frozen base bytes
    (two small all-reduces of the per-parameter fingerprints)."""
    local = base_fingerprint(model)
    device = local.device if local.numel() else torch.device("cpu")
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    lo, hi = local.to(device).clone(), local.to(device).clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    differ = (lo != hi).nonzero().flatten().tolist()
    if differ:
        names = [n for n, p in unwrap(model).named_parameters() if not p.requires_grad]
        raise RuntimeError(f"the frozen base differs between ranks in {len(differ)} tensor(s), e.g. "
                           f"{[names[i] for i in differ[:3]]}: every rank must build or load the same base model "
                           "(same checkpoint, same quantization) before wrap_ddp")


# ----------------------------------------------------------------------------- DDP
def wrap_ddp(model: nn.Module, check_base: bool = True, **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model, **ddp_kwargs)`` that never touches the frozen base.

    DDP broadcasts every parameter from rank 0 when it starts and buckets the trainable ones;
    here the frozen ones (the NF4 bytes and every other base tensor) are registered as ignored,
    so neither happens to them: only the adapters are broadcast once and all-reduced each step.
    Each rank must hold the same base; ``check_base`` verifies that once (fingerprints).
    """
    if check_base:
        check_same_base(model, ddp_kwargs.get("process_group"))
    ignore_frozen_in_ddp(model)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def ignore_frozen_in_ddp(model: nn.Module) -> list[str]:
    """Register the frozen parameters as ignored by any ``DistributedDataParallel`` built on
    ``model`` afterwards (also one made by ``accelerate``'s ``prepare``); returns their names."""
    names = frozen_parameter_names(model)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


# ----------------------------------------------------------------------------- FSDP2
def decoder_layers(model: nn.Module, layer_classes: Iterable[type | str] | None = None) -> list[nn.Module]:
    """The modules to shard one by one: instances of ``layer_classes`` (classes or class names),
    by default those named in a ``transformers`` model's ``_no_split_modules`` (its decoder
    layers), else every ``LoRALinear4bit``/``NF4Linear`` not inside another."""
    model = unwrap(model)
    wanted = list(layer_classes) if layer_classes is not None else list(getattr(model, "_no_split_modules", None) or [])
    if wanted:
        names = {c if isinstance(c, str) else c.__name__ for c in wanted}
        layers = [m for m in model.modules() if type(m).__name__ in names
                  or any(isinstance(m, c) for c in wanted if isinstance(c, type))]
        if layers:
            return layers
    found, seen = [], set()
    for module in model.modules():
        if isinstance(module, (LoRALinear4bit, NF4Linear)) and id(module) not in seen:
            found.append(module)
            seen.update(id(m) for m in module.modules())
    return found


def shard_model(model: nn.Module, *, mesh=None, mp_policy=None, reshard_after_forward: bool = True,
                offload_policy=None, layer_classes: Iterable[type | str] | None = None) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to each decoder layer, then to the root; returns ``model``.

    Every parameter is sharded ~1/world_size per rank, the NF4 bytes and block scales included
    (they are frozen integer parameters of ``NF4Linear``); each layer's are all-gathered for its
    forward and again for its backward, and freed after (``reshard_after_forward``). The
    adapters' gradients are reduce-scattered. ``mp_policy`` (``MixedPrecisionPolicy``) casts the
    floating-point parameters only, so the NF4 state keeps its bits whatever the policy.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                  mp_policy=mp_policy or MixedPrecisionPolicy(), offload_policy=offload_policy or OffloadPolicy())
    for layer in decoder_layers(model, layer_classes):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def nf4_storage_bytes(model: nn.Module) -> dict[str, int]:
    """What this rank holds of the NF4 parameters right now, in bytes of storage:
    ``sharded`` (its FSDP2 shards, padding included), ``whole`` (layers gathered or never
    sharded) and ``logical`` (the whole model's NF4 bytes, the same on every rank)."""
    out = {"sharded": 0, "whole": 0, "logical": 0}
    seen = set()
    for module in unwrap(model).modules():
        if not isinstance(module, NF4Linear):
            continue
        for name in NF4_PARAMETERS:
            p = module._parameters.get(name)
            if p is None:
                continue
            out["logical"] += p.numel() * p.element_size()
            local = p.to_local() if _is_dtensor(p) else p
            storage = local.untyped_storage()
            key = (local.device, storage.data_ptr(), storage.nbytes())
            if key in seen:
                continue
            seen.add(key)
            out["sharded" if _is_dtensor(p) else "whole"] += storage.nbytes()
    return out


# ----------------------------------------------------------------------------- checkpoints
def _is_adapter_key(key: str, trainable: set[str]) -> bool:
    return ".lora_A." in key or ".lora_B." in key or key in trainable


def checkpoint_state_dict(model: nn.Module, include_base: bool = False) -> dict[str, torch.Tensor]:
    """The model's own ``state_dict()`` (DTensor shards under FSDP2, bitsandbytes' keys for the
    base, each quant-state JSON blob as ``bytes``), the adapters only unless ``include_base``.
    Its tensors alias the model's, so a ``torch.distributed.checkpoint.load`` into it loads the
    model in place."""
    model = unwrap(model)
    state = model.state_dict()
    if not include_base:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        return {k: v for k, v in state.items() if _is_adapter_key(k, trainable)}
    # The quant-state JSON blob goes in as bytes: DCP replaces such an entry on load instead of
    # copying into a tensor of the same size (the blob's length varies with the nested offset).
    return {k: bytes(v.tolist()) if k.endswith(_BLOB_SUFFIX) else v for k, v in state.items()}


def _blobs_to_tensors(state: dict) -> dict:
    return {k: torch.tensor(list(v), dtype=torch.uint8) if k.endswith(_BLOB_SUFFIX) and isinstance(v, bytes) else v
            for k, v in state.items()}


def save_checkpoint(model: nn.Module, checkpoint_id: str | Path, optimizer: torch.optim.Optimizer | None = None,
                    include_base: bool = False) -> None:
    """``torch.distributed.checkpoint.save`` of the adapters (``include_base``: and the base)
    and the optimizer's state. Every rank calls it and writes its own shards."""
    import torch.distributed.checkpoint as dcp

    state = {"model": checkpoint_state_dict(model, include_base)}
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state["optimizer"] = get_optimizer_state_dict(unwrap(model), optimizer)
    dcp.save(state, checkpoint_id=str(checkpoint_id))


def load_checkpoint(model: nn.Module, checkpoint_id: str | Path, optimizer: torch.optim.Optimizer | None = None,
                    include_base: bool = False) -> None:
    """Load what ``save_checkpoint`` wrote, into a model sharded over any number of ranks or a
    whole one in a single process; every rank calls it. Raises if a tensor asked for is not in
    the checkpoint (``include_base=True`` needs a checkpoint saved with it)."""
    import torch.distributed.checkpoint as dcp

    model = unwrap(model)
    state = {"model": checkpoint_state_dict(model, include_base)}
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=str(checkpoint_id))
    # DCP loaded into the tensors in place (they alias the model's); loading the dict as well
    # covers entries that are not aliases and checks the quant states against the model.
    incompatible = model.load_state_dict(_blobs_to_tensors(state["model"]), strict=False)
    if incompatible.unexpected_keys:
        raise RuntimeError(f"checkpoint keys the model does not have: {incompatible.unexpected_keys[:5]}")
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state["optimizer"])


# ----------------------------------------------------------------------------- PEFT export
def export_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default", writer_rank: int = 0,
                   base_model_name_or_path: str | None = None, task_type: str | None = None) -> Path:
    """Write adapter ``adapter_name`` in PEFT's files from a DDP, FSDP2 or plain model.

    Every rank must call it (sharded adapters are gathered with ``full_tensor()``); rank
    ``writer_rank`` writes ``adapter_model.safetensors`` and ``adapter_config.json``, the others
    wait for it. The files equal ``save_adapter`` of the same model in one process.
    """
    from safetensors.torch import save_file

    model = unwrap(model)
    config = adapter_config(model, adapter_name, base_model_name_or_path, task_type)
    tensors = {}
    for name, layer in lora_layers(model).items():
        if adapter_name not in layer.lora_A:
            continue
        for which, table in (("A", layer.lora_A), ("B", layer.lora_B)):
            weight = table[adapter_name].weight.detach()
            weight = weight.full_tensor() if _is_dtensor(weight) else weight
            tensors[f"{KEY_PREFIX}{name}.lora_{which}.weight"] = weight.cpu().contiguous()
    directory = Path(directory)
    if _rank() == writer_rank:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return directory
