"""The ``lora-triton`` command.

    lora-triton demo [--quick] [--out-dir DIR] [--device cuda|cpu] [--steps N]
    lora-triton verify [--out-features N] [--in-features K] [--blocksize B] [--no-double-quant]
    lora-triton memory [7b|13b|70b|config.json] [--batch B] [--seq S] [--gpus N [--fsdp [--cpu-offload]]] [--measure]
    lora-triton bench [--quick] [--out DIR] [--what forward,layer,cpu] [--budget-s S]
    lora-triton forgetting [--quick | --full | --smollm2] [--out-dir DIR] [--seeds N] [--jobs N]

``verify`` quantizes a random weight, checks the bytes against bitsandbytes (when installed),
checks the reference layer against float64, and prints the memory the packed format saves.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .bench.cli import add_bench_parser
from .demos.smollm2_demo import MainJobConfig
from .format import SUPPORTED_BLOCKSIZES, NF4Weight
from .outputs import default_dir, format_bytes, writable_dir
from .reference import lora_forward
from .testing import relative_error




def _compare_with_bitsandbytes(weight: torch.Tensor, ours: NF4Weight) -> str:
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return "bitsandbytes not installed: byte comparison skipped"
    packed, state = bnbf.quantize_4bit(weight, blocksize=ours.blocksize, quant_type="nf4",
                                       compress_statistics=ours.double_quant)
    same = torch.equal(packed.view(-1), ours.packed) and torch.equal(state.absmax, ours.absmax)
    same = same and torch.equal(bnbf.dequantize_4bit(packed, state), ours.dequantize())
    if ours.double_quant:
        same = same and torch.equal(state.state2.absmax, ours.nested_absmax) and torch.equal(state.offset, ours.offset)
    return "bit-exact with bitsandbytes" if same else "MISMATCH with bitsandbytes"


def verify(args: argparse.Namespace) -> int:
    """Quantize, compare, run the reference layer, report memory. Returns the exit code."""
    torch.manual_seed(args.seed)
    n, k, r = args.out_features, args.in_features, args.rank
    weight = (torch.randn(n, k) * k**-0.5).to(torch.bfloat16)
    start = time.perf_counter()
    ours = NF4Weight.quantize(weight, args.blocksize, not args.no_double_quant)
    seconds = time.perf_counter() - start
    print(f"weight [{n}, {k}] bf16 -> NF4, blocksize {ours.blocksize}, double quant {ours.double_quant} "
          f"({seconds * 1e3:.0f} ms on {weight.device})")
    bnb_status = _compare_with_bitsandbytes(weight, ours)
    print(f"  format:      {bnb_status}")

    quant_err = relative_error(ours.dequantize(torch.float32), weight)
    print(f"  NF4 error:   ||dequant(W) - W|| / ||W|| = {quant_err:.4f}")

    x = torch.randn(args.tokens, k)
    a, b = torch.randn(r, k) * k**-0.5, torch.randn(n, r) * r**-0.5
    y32, _ = lora_forward(x, ours, a, b, 2.0)
    y64, _ = lora_forward(x.double(), ours, a.double(), b.double(), 2.0)
    layer_err = relative_error(y32, y64)
    print(f"  reference:   fp32 layer vs float64, relative error {layer_err:.2e} (M={args.tokens}, r={r})")

    dense16 = weight.numel() * 2
    saved = 1 - ours.nbytes / dense16
    effect = (f"{saved:.1%} saved" if saved >= 0 else
              f"{-saved:.1%} larger: at {weight.numel()} weights the code tables outweigh the 4-bit savings")
    print(f"  memory:      fp16/bf16 {format_bytes(dense16)} -> NF4 {format_bytes(ours.nbytes)} "
          f"({ours.bits_per_weight:.3f} bits/weight, {effect})")
    ok = "MISMATCH" not in bnb_status and layer_err < 1e-5 and quant_err < 0.15
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def _model_shape(model: str):
    """``(ModelShape, name)`` for a preset name (any case) or a transformers ``config.json`` (or
    the folder holding one); ``SystemExit`` with a message saying what is accepted otherwise."""
    import json
    from pathlib import Path

    from .memory.estimate import PRESETS, ModelShape

    if model.lower() in PRESETS:
        return PRESETS[model.lower()], model.lower()
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SystemExit(f"lora-triton memory: {model!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                         "transformers config.json (or a folder holding one)")
    try:
        config = json.loads(path.read_text())
        return ModelShape.from_config(config), str(path)
    except (ValueError, TypeError, KeyError) as err:
        raise SystemExit(f"lora-triton memory: cannot read a LLaMA-style model shape from {path}: {err}") from None


def _count(n: float) -> str:
    """``6.74 B``, ``124.4 M``, ``922.2 K`` parameters."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "B" else f"{n / size:.1f} {unit}"
    return f"{n:.0f}"


def memory(args: argparse.Namespace) -> int:
    """Print the memory estimate of full / LoRA / QLoRA fine-tuning, optionally checked
    against measured training steps of a small LLaMA."""
    from .memory.estimate import METHODS, TrainingSetup, estimate, format_table

    shape, name = _model_shape(args.model)
    setup = TrainingSetup(batch=args.batch, seq=args.seq, rank=args.rank,
                          gradient_checkpointing=not args.no_checkpointing)
    print(f"model {name}: {_count(shape.params)} parameters; batch {setup.batch} x seq {setup.seq}"
          f"{' per GPU' if args.gpus > 1 or args.fsdp else ''}, r={setup.rank}, gradient checkpointing "
          f"{setup.gradient_checkpointing}")
    if args.cpu_offload and not args.fsdp:
        raise SystemExit("lora-triton memory: --cpu-offload needs --fsdp (DDP keeps everything on every GPU)")
    if args.gpus == 1 and not args.fsdp:
        print(format_table([estimate(shape, setup, m) for m in METHODS]))
    else:
        _memory_distributed(shape, setup, args)
    if args.measure:
        from .memory.measure import measure_all

        small = TrainingSetup(batch=2, seq=128, rank=8, gradient_checkpointing=setup.gradient_checkpointing)
        print(f"\ncheck on a small LLaMA (hidden 256, 4 layers), one bf16 training step on {args.device}:")
        print(f"{'method':<8}{'measured MiB':>14}{'estimated MiB':>15}{'ratio':>8}")
        for row in measure_all(small, args.device):
            print(f"{row.method:<8}{row.measured_bytes / 2**20:>14.2f}{row.estimated_bytes / 2**20:>15.2f}"
                  f"{row.ratio:>8.2f}")
    return 0


def _memory_distributed(shape, setup, args: argparse.Namespace) -> None:
    """The per-GPU table for ``--gpus N`` (DDP) or ``--fsdp``, and the published 70B figures."""
    from .memory.estimate import (METHODS, PRESETS, PUBLISHED_70B_2GPU, cpu_offload_bytes, estimate_distributed,
                                  format_table)

    mode = (f"FSDP over {args.gpus} GPU(s){', CPU offload' if args.cpu_offload else ''}" if args.fsdp
            else f"DDP over {args.gpus} GPUs")
    print(f"per GPU, {mode}:")
    print(format_table([estimate_distributed(shape, setup, m, args.gpus, args.fsdp, args.cpu_offload)
                        for m in METHODS]))
    if args.cpu_offload:
        offloaded = cpu_offload_bytes(shape, setup, "qlora", args.gpus)
        print(f"CPU memory per process (the offloaded qlora shards): {offloaded / 2**30:.2f} GiB")
    if args.fsdp and shape == PRESETS["70b"]:
        pub = PUBLISHED_70B_2GPU
        same = pub["setup"]
        ours = [estimate_distributed(shape, same, "qlora", 2, True, off).total / 1e9 for off in (False, True)]
        print(f"\npublished FSDP-QLoRA, Llama-2-70B on 2 x 24 GB (batch {same.batch} x seq {same.seq} per GPU, "
              f"r={same.rank}, gradient checkpointing; nvidia-smi per GPU):")
        print(f"  without CPU offload: {pub['gpu_gb_no_offload']:.1f} GB measured, {ours[0]:.1f} GB estimated here")
        print(f"  with CPU offload:    {pub['gpu_gb_cpu_offload']:.1f} GB measured, {ours[1]:.1f} GB estimated here "
              f"(CPU RAM {pub['cpu_ram_gb_cpu_offload']:.0f} GB measured)")
        print(f"  source: {pub['source']}; differences: docs/distributed.md")


def forgetting(args: argparse.Namespace) -> int:
    """Run the forgetting benchmark (lora_triton/demos/forgetting.py)."""
    from .demos.forgetting import run_forgetting_benchmark

    writable_dir(args.out_dir, "forgetting")
    if args.smollm2:
        if args.seeds is not None or args.jobs is not None:
            raise SystemExit("lora-triton forgetting: --smollm2 runs one fixed check; --seeds and --jobs are for the "
                             "toy model's benchmark")
        from .demos.forgetting import run_smollm2_check
        from .demos.smollm2 import check_installed

        try:
            check_installed()
        except (ModuleNotFoundError, FileNotFoundError) as err:
            raise SystemExit(f"lora-triton forgetting: {err}") from None
        run_smollm2_check(args.out_dir)
        return 0
    run_forgetting_benchmark(args.quick, args.out_dir, args.seeds, args.jobs, args.full)
    return 0


def demo(args: argparse.Namespace) -> int:
    """Run the main job on SmolLM2-135M-Instruct (lora_triton/demos/smollm2_demo.py), or with
    ``--quick`` the toy model's smoke test (lora_triton/demos/end_to_end.py)."""
    device = usable_device(args.device, "demo")
    writable_dir(args.out_dir, "demo")
    set_threads(args.threads)
    if args.quick:
        if args.steps is not None:
            raise SystemExit("lora-triton demo: --steps sets the SmolLM2 demo's training steps; --quick runs the toy "
                             "model, whose budgets are fixed")
        from .demos.end_to_end import run_demo

        run_demo(args.out_dir, quick=True, device=device)
        return 0
    import logging
    import os

    # The demo needs nothing from the Hugging Face Hub; set before huggingface_hub is imported,
    # which reads it once. bitsandbytes otherwise asks the Hub about an optional CPU kernel.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # In offline mode the `kernels` package logs that it skipped that check; nothing is wrong.
    logging.getLogger("kernels").setLevel(logging.ERROR)
    from .demos.smollm2 import check_installed
    from .demos.smollm2_demo import run_smollm2_demo

    try:
        check_installed()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise SystemExit(f"lora-triton demo: {err}") from None
    cfg = MainJobConfig() if args.steps is None else MainJobConfig(steps=args.steps)
    run_smollm2_demo(args.out_dir, device, cfg=cfg)
    return 0


DESCRIPTION = ("lora-triton: QLoRA layers (a bitsandbytes NF4 base weight plus a PEFT LoRA adapter) with Triton "
               "kernels. Commands: demo, verify, memory, bench, forgetting; 'lora-triton COMMAND --help' for each.")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def usable_device(device: str | None, command: str) -> str | None:
    """``device`` (None: the command's default) if this torch can run on it; ``SystemExit`` saying why not."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise SystemExit(f"lora-triton {command}: --device {device!r} is not a torch device ({err})") from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise SystemExit(f"lora-triton {command}: --device {device} needs a CUDA build of torch; this one "
                             f"({torch.__version__}) is CPU-only. Leave --device out to run on the CPU.")
        if not torch.cuda.is_available():
            raise SystemExit(f"lora-triton {command}: --device {device}: torch sees no CUDA GPU here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SystemExit(f"lora-triton {command}: --device {device}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise SystemExit(f"lora-triton {command}: --device takes cpu or cuda[:N], got {device!r}")
    return device


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's CPU threads (default: torch's choice, one per core)."""
    if threads is not None:
        torch.set_num_threads(threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-triton", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="quantize SmolLM2-135M-Instruct to NF4, fine-tune two LoRA adapters, save them for "
                       "PEFT, serve both in one batch")
    d.add_argument("--out-dir", default=default_dir("demo"), metavar="DIR",
                   help="folder for the saved adapters (default: %(default)s)")
    d.add_argument("--quick", action="store_true",
                   help="a toy model pretrained from scratch instead, seconds: a smoke test (CI)")
    d.add_argument("--device", default=None, help="torch device to train on (default: cuda when available, else cpu)")
    d.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                   help=f"training steps of the SmolLM2 demo (default: {MainJobConfig.steps})")
    d.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads for torch (default: one per core; fewer on a loaded machine)")
    d.set_defaults(func=demo)
    v = sub.add_parser("verify", help="quantize a weight, check it against bitsandbytes and the reference")
    v.add_argument("--out-features", type=_positive_int, default=4096, metavar="N",
                   help="rows of the random weight (default: %(default)s)")
    v.add_argument("--in-features", type=_positive_int, default=4096, metavar="K",
                   help="columns of the random weight (default: %(default)s)")
    v.add_argument("--blocksize", type=int, default=64, choices=SUPPORTED_BLOCKSIZES, metavar="B",
                   help=f"NF4 block size, one of {', '.join(map(str, SUPPORTED_BLOCKSIZES))} (default: %(default)s)")
    v.add_argument("--no-double-quant", action="store_true", help="keep the block scales in float32")
    v.add_argument("--rank", type=_positive_int, default=16, metavar="R",
                   help="LoRA rank of the layer checked against float64 (default: %(default)s)")
    v.add_argument("--tokens", type=_positive_int, default=64, metavar="M",
                   help="rows of the input checked against float64 (default: %(default)s)")
    v.add_argument("--seed", type=int, default=0, help="random seed of the weight and inputs (default: %(default)s)")
    v.set_defaults(func=verify)
    m = sub.add_parser("memory", help="memory of full / LoRA / QLoRA fine-tuning for a model size or config")
    m.add_argument("model", nargs="?", default="7b",
                   help="7b, 13b or 70b (any case), or a transformers config.json or the folder holding it "
                        "(default: %(default)s)")
    m.add_argument("--batch", type=_positive_int, default=1, metavar="B",
                   help="sequences per step (default: %(default)s)")
    m.add_argument("--seq", type=_positive_int, default=512, metavar="S",
                   help="tokens per sequence (default: %(default)s)")
    m.add_argument("--rank", type=_positive_int, default=16, metavar="R",
                   help="LoRA rank on all projections (default: %(default)s)")
    m.add_argument("--no-checkpointing", action="store_true", help="model activations without gradient checkpointing")
    m.add_argument("--gpus", type=_positive_int, default=1, metavar="N",
                   help="GPUs training together (data parallel; --batch is per GPU) (default: %(default)s)")
    m.add_argument("--fsdp", action="store_true",
                   help="shard weights, adapters, gradients and optimizer over the GPUs (FSDP / FSDP2)")
    m.add_argument("--cpu-offload", action="store_true", help="with --fsdp: keep the shards in CPU memory")
    m.add_argument("--measure", action="store_true", help="also measure real steps of a small LLaMA and compare")
    m.add_argument("--device", default="cpu", help="torch device for --measure (default: %(default)s)")
    m.set_defaults(func=memory)
    add_bench_parser(sub)
    f = sub.add_parser("forgetting", help="sequential-domain forgetting benchmark over domain orders: naive LoRA vs "
                       "protected vs per-task adapters (oracle)")
    size = f.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny model and budgets, about a minute: a smoke test (CI)")
    size.add_argument("--full", action="store_true",
                      help="every one of the 6 domain orders on every seed, plus unconstrained stacked blocks "
                           "(default: one order per seed)")
    f.add_argument("--out-dir", default=default_dir("forgetting"), metavar="DIR",
                   help="folder for forgetting.csv, .md and .png (default: %(default)s)")
    f.add_argument("--seeds", type=_positive_int, default=None, metavar="N",
                   help="fresh seeds from 100 on, one domain order each (default: 6, every order once; with "
                        "--quick 2)")
    f.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                   help="worker processes for the runs (default: one per core, at most one per run); "
                        "the numbers do not depend on it")
    size.add_argument("--smollm2", action="store_true",
                      help="the real-model check instead: naive, projection and routed on SmolLM2-135M-Instruct with a "
                           "small budget (about 9 minutes on 2 CPU cores)")
    f.set_defaults(func=forgetting)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
