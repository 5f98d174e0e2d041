"""QLoRA training on several processes: DDP or FSDP2 over a tiny Llama with our NF4 layers.

The multi-GPU recipe, runnable as it is on CPU (gloo) and on GPUs (NCCL, one process per GPU):

    torchrun --standalone --nproc-per-node 2 -m lora_triton.demos.distributed_train --strategy fsdp
    accelerate launch --multi_gpu --num_processes 2 -m lora_triton.demos.distributed_train \\
        --launcher accelerate --strategy fsdp

It builds the same model on every rank (a seeded ``transformers`` Llama, all seven projections
of every layer NF4 + LoRA), wraps it (``wrap_ddp`` or ``shard_model``: FSDP2 ``fully_shard`` per
decoder layer), trains ``--steps`` AdamW steps on a global batch split across the ranks, saves a
``torch.distributed.checkpoint`` (adapters, base, optimizer) and exports the adapter in PEFT's
format from rank 0. ``--out`` receives ``result.json`` (losses, per-rank NF4 storage, step
times), ``checkpoint/`` and ``adapter/``.

Under ``accelerate launch`` the model and optimizer go through ``Accelerator.prepare``. On GPUs
with an FSDP2 config (``fsdp_version: 2``) that is accelerate's own FSDP2 path; on CPU accelerate
runs only DDP (its FSDP is GPU-only), so ``--strategy fsdp`` there calls accelerate's own
``fsdp2_prepare_model`` with an ``FullyShardedDataParallelPlugin`` instead, the function
``prepare`` calls on GPUs.

``run_spawned`` starts the ranks with ``torch.multiprocessing`` for the tests (same functions,
no launcher).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..integration import inject_lora
from ..integration.distributed import (export_adapter, ignore_frozen_in_ddp, nf4_storage_bytes, save_checkpoint,
                                       shard_model, unwrap, wrap_ddp)
from ..testing import LLAMA_PROJECTIONS, tiny_llama


@dataclass(frozen=True)
class RunConfig:
    """The training run: model size, adapter, data and optimizer (the same on every rank)."""

    steps: int = 3
    global_batch: int = 4
    seq: int = 16
    hidden: int = 64
    layers: int = 2
    vocab: int = 128
    r: int = 4
    lr: float = 1e-2
    seed: int = 0
    init_lora_weights: bool | str = False  # random A and B (a non-zero B trains both from step 1)


def build_model(cfg: RunConfig, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The seeded tiny Llama with NF4 + LoRA on every projection (identical on every rank)."""
    model = tiny_llama(cfg.seed, hidden=cfg.hidden, layers=cfg.layers, vocab=cfg.vocab)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        inject_lora(model, LLAMA_PROJECTIONS, r=cfg.r, lora_alpha=2 * cfg.r, init_lora_weights=cfg.init_lora_weights)
    return model.train().to(device)


def global_batches(cfg: RunConfig) -> list[torch.Tensor]:
    """``steps`` token batches ``[global_batch, seq]`` (seeded)."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    return [torch.randint(0, cfg.vocab, (cfg.global_batch, cfg.seq), generator=gen) for _ in range(cfg.steps)]


def local_rows(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch."""
    if batch.shape[0] % world_size:
        raise ValueError(f"global batch {batch.shape[0]} does not split over {world_size} ranks")
    per = batch.shape[0] // world_size
    return batch[rank * per:(rank + 1) * per]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(model: torch.nn.Module, cfg: RunConfig, device: torch.device | str = "cpu", backward=None,
          optimizer: torch.optim.Optimizer | None = None, on_step=None) -> tuple[list[float], list[float]]:
    """``cfg.steps`` AdamW steps on this rank's share of each global batch; returns the global
    mean loss of each step (the mean of the ranks' means: equal shares) and step times (s)."""
    rank, world_size = _world()
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    backward = backward or (lambda loss: loss.backward())
    losses, times = [], []
    for step, batch in enumerate(global_batches(cfg)):
        start = time.perf_counter()
        ids = local_rows(batch, rank, world_size).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        if on_step is not None:
            on_step(step)
        backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(loss)
            loss /= world_size
        losses.append(float(loss))
        if device != "cpu" and torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return losses, times


def adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor, whole (FSDP2 shards gathered: every rank must call it), on CPU."""
    out = {}
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad:
            t = p.detach()
            out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu().clone()
    return out


# ----------------------------------------------------------------------------- the command
def _setup(launcher: str) -> tuple[torch.device, object]:
    """Join the process group the launcher describes; returns (device, accelerator or None)."""
    if launcher == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        return accelerator.device, accelerator
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=120))
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu"), None


def _accelerate_fsdp2(accelerator, model):
    """accelerate's FSDP2 preparation of ``model``: ``prepare`` on GPUs (a config with FSDP2),
    accelerate's own ``fsdp2_prepare_model`` with an FSDP2 plugin on CPU (where ``prepare`` does DDP)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    if accelerator.distributed_type == DistributedType.FSDP:
        return accelerator.prepare(model)
    layer = type(unwrap(model).model.layers[0]).__name__
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=[layer],
        reshard_after_forward=True, cpu_ram_efficient_loading=False)
    return fsdp2_prepare_model(accelerator, model)


def run(args: argparse.Namespace) -> dict:
    """One training run as the command describes it; returns (and writes) its result."""
    cfg = RunConfig(steps=args.steps, global_batch=args.global_batch, seq=args.seq, hidden=args.hidden,
                    layers=args.layers, r=args.rank, lr=args.lr)
    device, accelerator = _setup(args.launcher)
    rank, world_size = _world()
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    out = Path(args.out)
    model = build_model(cfg, device)
    logical = nf4_storage_bytes(model)["logical"]
    backward = None
    if accelerator is not None:
        if args.strategy == "fsdp":
            model = _accelerate_fsdp2(accelerator, model)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
            optimizer = accelerator.prepare(optimizer)
        else:
            ignore_frozen_in_ddp(model)  # the DDP that prepare builds leaves the base alone
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
            model, optimizer = accelerator.prepare(model, optimizer)
        backward = accelerator.backward
    else:
        model = shard_model(model) if args.strategy == "fsdp" else wrap_ddp(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    storage = nf4_storage_bytes(model)
    losses, times = train(model, cfg, device, backward, optimizer)
    save_checkpoint(model, out / "checkpoint", optimizer, include_base=True)
    export_adapter(model, out / "adapter")
    result = {"strategy": args.strategy, "launcher": args.launcher, "world_size": world_size, "device": str(device),
              "backend": dist.get_backend(), "wrapper": type(model).__name__, "losses": losses,
              "step_times_s": times, "nf4_logical_bytes": logical, "nf4_local_bytes": storage["sharded"] +
              storage["whole"], "config": asdict(cfg)}
    gathered = [None] * world_size
    dist.all_gather_object(gathered, result["nf4_local_bytes"])
    result["nf4_local_bytes_per_rank"] = gathered
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"{args.strategy} x{world_size} ({args.launcher}, {dist.get_backend()}, {type(model).__name__}): "
              f"losses {[round(v, 4) for v in losses]}; NF4 bytes per rank {gathered} of {logical}; "
              f"median step {sorted(times)[len(times) // 2] * 1e3:.1f} ms")
    dist.barrier()
    del model, optimizer
    gc.collect()
    dist.destroy_process_group()
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_triton.demos.distributed_train",
                                description="QLoRA data-parallel training of a tiny Llama: DDP or FSDP2 "
                                            "(start it with torchrun or accelerate launch)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="fsdp")
    p.add_argument("--launcher", choices=["torchrun", "accelerate"], default="torchrun",
                   help="torchrun: plain torch.distributed; accelerate: Accelerator.prepare")
    p.add_argument("--steps", type=int, default=RunConfig.steps)
    p.add_argument("--global-batch", type=int, default=RunConfig.global_batch)
    p.add_argument("--seq", type=int, default=RunConfig.seq)
    p.add_argument("--hidden", type=int, default=RunConfig.hidden)
    p.add_argument("--layers", type=int, default=RunConfig.layers)
    p.add_argument("--rank", type=int, default=RunConfig.r, help="LoRA rank")
    p.add_argument("--lr", type=float, default=RunConfig.lr)
    p.add_argument("--out", default="lora_triton_out/distributed", help="output folder (default: %(default)s)")
    return p


# ----------------------------------------------------------------------------- spawning (tests)
def _spawn_entry(rank: int, world_size: int, init_file: str, fn, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        gc.collect()  # DDP reducers and FSDP states still holding the group go first
        dist.destroy_process_group()


def run_spawned(fn, world_size: int, args: tuple = (), timeout_s: float = 120.0, workdir: str | Path = ".") -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined in a gloo group.

    A rank that raises ends the job: the others are terminated and ``ProcessRaisedException``
    carries the failing rank's traceback. Past ``timeout_s`` every process is killed and
    ``TimeoutError`` raised (nothing hangs); the group's own timeout is 60 s per collective.
    """
    import torch.multiprocessing as mp

    init_file = Path(workdir) / f"dist_init_{os.getpid()}_{time.monotonic_ns()}"
    context = mp.start_processes(_spawn_entry, args=(world_size, str(init_file), fn, args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"{world_size} ranks still running after {timeout_s:.0f} s: killed")
    finally:
        init_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
