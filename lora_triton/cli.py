"""The ``lora-triton`` command.

    lora-triton demo [--quick] [--out-dir DIR] [--device cuda|cpu]
    lora-triton verify [--out-features N] [--in-features K] [--blocksize B] [--no-double-quant]
    lora-triton memory [7b|13b|70b|config.json] [--batch B] [--seq S] [--measure]
    lora-triton bench [--quick] [--out DIR] [--what forward,layer,cpu] [--budget-s S]
    lora-triton forgetting [--quick] [--out-dir DIR] [--seeds N] [--jobs N]

``verify`` quantizes a random weight, checks the bytes against bitsandbytes (when installed),
checks the reference layer against float64, and prints the memory the packed format saves.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from .bench.cli import add_bench_parser
from .format import NF4Weight
from .reference import lora_forward
from .testing import relative_error


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:8.2f} MiB"


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
    print(f"  memory:      fp16/bf16 {_mib(dense16)} -> NF4 {_mib(ours.nbytes)} "
          f"({ours.bits_per_weight:.3f} bits/weight, {100 * (1 - ours.nbytes / dense16):.1f}% saved)")
    ok = "MISMATCH" not in bnb_status and layer_err < 1e-5 and quant_err < 0.15
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def memory(args: argparse.Namespace) -> int:
    """Print the memory estimate of full / LoRA / QLoRA fine-tuning, optionally checked
    against measured training steps of a small LLaMA."""
    import json

    from .memory_estimate import METHODS, PRESETS, ModelShape, TrainingSetup, estimate, format_table

    if args.model in PRESETS:
        shape = PRESETS[args.model]
    else:
        with open(args.model) as f:
            shape = ModelShape.from_config(json.load(f))
    setup = TrainingSetup(batch=args.batch, seq=args.seq, rank=args.rank,
                          gradient_checkpointing=not args.no_checkpointing)
    print(f"model {args.model}: {shape.params / 1e9:.2f} B parameters; batch {setup.batch} x seq {setup.seq}, "
          f"r={setup.rank}, gradient checkpointing {setup.gradient_checkpointing}")
    print(format_table([estimate(shape, setup, m) for m in METHODS]))
    if args.measure:
        from .memory_measure import measure_all

        small = TrainingSetup(batch=2, seq=128, rank=8, gradient_checkpointing=setup.gradient_checkpointing)
        print(f"\ncheck on a small LLaMA (hidden 256, 4 layers), one bf16 training step on {args.device}:")
        print(f"{'method':<8}{'measured MiB':>14}{'estimated MiB':>15}{'ratio':>8}")
        for row in measure_all(small, args.device):
            print(f"{row.method:<8}{row.measured_bytes / 2**20:>14.2f}{row.estimated_bytes / 2**20:>15.2f}"
                  f"{row.ratio:>8.2f}")
    return 0


def forgetting(args: argparse.Namespace) -> int:
    """Run the forgetting benchmark (lora_triton/bench/forgetting.py)."""
    from .bench.forgetting import run_forgetting_benchmark

    run_forgetting_benchmark(args.quick, args.out_dir, args.seeds, args.jobs)
    return 0


def demo(args: argparse.Namespace) -> int:
    """Run the end-to-end demo (lora_triton/demo.py)."""
    from .demo import run_demo

    run_demo(args.out_dir, args.quick, args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-triton", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="quantize a small LM, fine-tune it on two domains with forgetting protection")
    d.add_argument("--out-dir", default="lora_triton_demo")
    d.add_argument("--quick", action="store_true", help="tiny model and budgets (seconds; CI)")
    d.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    d.set_defaults(func=demo)
    v = sub.add_parser("verify", help="quantize a weight, check it against bitsandbytes and the reference")
    v.add_argument("--out-features", type=int, default=4096)
    v.add_argument("--in-features", type=int, default=4096)
    v.add_argument("--blocksize", type=int, default=64)
    v.add_argument("--no-double-quant", action="store_true")
    v.add_argument("--rank", type=int, default=16)
    v.add_argument("--tokens", type=int, default=64)
    v.add_argument("--seed", type=int, default=0)
    v.set_defaults(func=verify)
    m = sub.add_parser("memory", help="memory of full / LoRA / QLoRA fine-tuning for a model size or config")
    m.add_argument("model", nargs="?", default="7b", help="7b, 13b, 70b, or a path to a transformers config.json")
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--seq", type=int, default=512)
    m.add_argument("--rank", type=int, default=16)
    m.add_argument("--no-checkpointing", action="store_true", help="model activations without gradient checkpointing")
    m.add_argument("--measure", action="store_true", help="also measure real steps of a small LLaMA and compare")
    m.add_argument("--device", default="cpu")
    m.set_defaults(func=memory)
    add_bench_parser(sub)
    f = sub.add_parser("forgetting", help="sequential-domain forgetting benchmark: naive LoRA vs stacked vs protected")
    f.add_argument("--quick", action="store_true", help="tiny model and budgets (about a minute; CI)")
    f.add_argument("--out-dir", default="forgetting_results")
    f.add_argument("--seeds", type=int, default=None)
    f.add_argument("--jobs", type=int, default=None,
                   help="worker processes for the (method, seed) runs (default: one per core, at most one per run); "
                        "the numbers do not depend on it")
    f.set_defaults(func=forgetting)
    return parser


def main(argv: list[str] | None = None) -> int:
    # bitsandbytes warns at import on AVX512-BF16 CPUs that the optional Hugging Face `kernels`
    # package is missing; none of our commands uses what it would fetch.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
