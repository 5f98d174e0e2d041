"""What tests/test_distributed.py runs on 2 ranks (a module, so spawned processes can import it).

Each ``check_*`` function runs on every rank of a gloo group (``run_spawned``) and rank 0 saves
what it measured to ``<out>/<name>.pt``; the test compares that with a single process.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ..integration.distributed import (base_fingerprint, check_same_base, export_adapter, load_checkpoint,
                                       nf4_parameter_names, nf4_storage_bytes, save_checkpoint, shard_model, unwrap,
                                       wrap_ddp)
from ..modules import LoRALinear4bit, NF4Linear
from .distributed_train import RunConfig, adapter_tensors, build_model, global_batches, local_rows, train


def _save(rank: int, out: Path, name: str, value: dict) -> None:
    if rank == 0:
        torch.save(value, out / f"{name}.pt")


def step0_grads(model, cfg: RunConfig, rank: int = 0, world_size: int = 1, backward=None) -> dict:
    """Gradients of the trainable tensors after one forward/backward on the first global batch
    (whole tensors, averaged over ranks as DDP/FSDP2 do); the grads are cleared afterwards."""
    ids = local_rows(global_batches(cfg)[0], rank, world_size)
    loss = model(input_ids=ids, labels=ids).loss
    (backward or (lambda value: value.backward()))(loss)
    out = {}
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad:
            g = p.grad.detach()
            out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()
            p.grad = None
    loss = loss.detach().clone()
    if world_size > 1:
        dist.all_reduce(loss)
        loss /= world_size
    return {"loss": float(loss), "grads": out}


def check_ddp(rank: int, world_size: int, out: str, cfg: RunConfig) -> None:
    """DDP: bytes broadcast at start, parameters DDP holds, step-0 grads, training, the base check."""
    out = Path(out)
    model = build_model(cfg)
    broadcast = []
    original = dist._broadcast_coalesced

    def counting(process_group, tensors, *args, **kwargs):
        broadcast.extend(t.numel() * t.element_size() for t in tensors)
        return original(process_group, tensors, *args, **kwargs)

    dist._broadcast_coalesced = counting
    try:
        ddp = wrap_ddp(model)
    finally:
        dist._broadcast_coalesced = original
    held = {id(p) for p in ddp._module_parameters}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    adapter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    grads = step0_grads(ddp, cfg, rank, world_size)
    losses, _ = train(ddp, cfg)
    adapters = adapter_tensors(ddp)
    export_adapter(ddp, out / "ddp_adapter")
    # A rank whose base differs by one byte is refused by every rank.
    other = build_model(cfg)
    if rank == 1:
        layer = next(m for m in other.modules() if isinstance(m, NF4Linear))
        with torch.no_grad():
            layer.weight[0, 0] ^= 1
    try:
        check_same_base(other)
        refused = ""
    except RuntimeError as err:
        refused = str(err)
    _save(rank, out, "ddp", dict(losses=losses, adapters=adapters, step0=grads, broadcast_bytes=sum(broadcast),
                                 adapter_bytes=adapter_bytes, buffer_bytes=buffer_bytes,
                                 holds_only_adapters=held == trainable, refused=refused))


def _layer_bytes(layer) -> int:
    return sum(m.weight.numel() + m.weight_absmax.numel() * m.weight_absmax.element_size()
               + (0 if m.weight_nested_absmax is None else m.weight_nested_absmax.numel() * 4)
               for m in layer.modules() if isinstance(m, NF4Linear))


def check_fsdp(rank: int, world_size: int, out: str, cfg: RunConfig, ws1_checkpoint: str) -> None:
    """FSDP2: storage per rank (between layers and inside each), step-0 grads, training, DCP save
    and reload (same world size, and a checkpoint written by one process), PEFT export."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    out = Path(out)
    model = build_model(cfg)
    fingerprint = base_fingerprint(model)
    layers = list(model.model.layers)
    layer_logical = [_layer_bytes(layer) for layer in layers]
    shard_model(model)
    after_shard = nf4_storage_bytes(model)
    inside = []
    hooks = [layer.register_forward_pre_hook(lambda module, args, i=i: inside.append(
        (i, nf4_storage_bytes(model)["whole"]))) for i, layer in enumerate(layers)]
    grads = step0_grads(model, cfg, rank, world_size)
    for hook in hooks:
        hook.remove()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    losses, _ = train(model, cfg, optimizer=optimizer)
    between = nf4_storage_bytes(model)
    adapters = adapter_tensors(model)
    save_checkpoint(model, out / "fsdp_checkpoint", optimizer, include_base=True)
    optim_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                       cpu_offload=True))
    export_adapter(model, out / "fsdp_adapter")
    # Round trip at the same world size, into a freshly built and sharded model.
    fresh = shard_model(build_model(RunConfig(**{**cfg.__dict__, "seed": cfg.seed + 7})))
    fresh_optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=cfg.lr)
    load_checkpoint(fresh, out / "fsdp_checkpoint", fresh_optimizer, include_base=True)
    same_ws = dict(adapters=adapter_tensors(fresh), fingerprint=_whole_fingerprint(fresh))
    # A bitsandbytes state dict of whole tensors, loaded layer by layer into shards.
    into_shards = shard_model(build_model(RunConfig(**{**cfg.__dict__, "seed": cfg.seed + 11})))
    source = dict(build_model(cfg).named_modules())
    for name, module in into_shards.named_modules():
        if isinstance(module, NF4Linear):
            module.load_state_dict(source[name].state_dict())
    nf4_names = set(nf4_parameter_names(into_shards))
    frozen = [n for n, p in into_shards.named_parameters() if not p.requires_grad]
    mask = torch.tensor([n in nf4_names for n in frozen])
    whole_into_shards = bool(torch.equal(_whole_fingerprint(into_shards)[mask], fingerprint[mask]))
    printed = repr(into_shards)  # a sharded model prints (layer metadata, no bytes needed)
    # A checkpoint saved by one process, loaded into 2 shards.
    from_ws1 = shard_model(build_model(RunConfig(**{**cfg.__dict__, "seed": cfg.seed + 9})))
    load_checkpoint(from_ws1, ws1_checkpoint, include_base=True)
    ws1 = dict(adapters=adapter_tensors(from_ws1), fingerprint=_whole_fingerprint(from_ws1))
    _save(rank, out, "fsdp", dict(losses=losses, adapters=adapters, step0=grads, fingerprint=fingerprint,
                                  after_shard=after_shard, between=between, inside=inside,
                                  layer_logical=layer_logical, same_ws=same_ws, from_ws1=ws1,
                                  optimizer=optim_state, wrapper=type(model).__name__,
                                  whole_into_shards=whole_into_shards, printed=printed))


def _whole_fingerprint(model) -> torch.Tensor:
    """``base_fingerprint`` of the whole (gathered) model: each FSDP2 module unsharded in turn."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
    try:
        return base_fingerprint(model)
    finally:
        for m in modules:
            m.reshard()


def check_fsdp_mixed_precision(rank: int, world_size: int, out: str, cfg: RunConfig) -> None:
    """FSDP2 with a bf16 ``MixedPrecisionPolicy``: what the layers see inside forward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    out = Path(out)
    model = build_model(cfg)
    layer = next(m for m in model.modules() if isinstance(m, LoRALinear4bit))
    packed = layer.base_layer.nf4.packed.clone()
    absmax = layer.base_layer.nf4.absmax.clone()
    nested = layer.base_layer.nf4.nested_absmax.clone()
    seen = {}

    def look(module, args):
        nf4 = module.base_layer.nf4
        seen.update(adapter_dtype=module.lora_A["default"].weight.dtype, x_dtype=args[0].dtype,
                    packed_equal=torch.equal(nf4.packed, packed), absmax_equal=torch.equal(nf4.absmax, absmax),
                    nested_equal=torch.equal(nf4.nested_absmax, nested), nested_dtype=nf4.nested_absmax.dtype)

    layer.register_forward_pre_hook(look)
    shard_model(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    result = step0_grads(model, cfg, rank, world_size)
    _save(rank, out, "fsdp_bf16", dict(loss=result["loss"], grads=result["grads"], seen=seen))


def check_all(rank: int, world_size: int, out: str, cfg: RunConfig, ws1_checkpoint: str) -> None:
    """The checks of one spawn, in order."""
    check_ddp(rank, world_size, out, cfg)
    check_fsdp(rank, world_size, out, cfg, ws1_checkpoint)
    check_fsdp_mixed_precision(rank, world_size, out, cfg)


def check_failing_rank(rank: int, world_size: int, cfg: RunConfig) -> None:
    """Rank 1 raises in the middle of step 1 while rank 0 goes on into the gradient all-reduce."""
    ddp = wrap_ddp(build_model(cfg))
    for step, batch in enumerate(global_batches(cfg)):
        ids = local_rows(batch, rank, world_size)
        loss = ddp(input_ids=ids, labels=ids).loss
        if step == 1 and rank == 1:
            raise RuntimeError("injected failure on rank 1 at step 1")
        loss.backward()
