"""Benchmark of the QLoRA forward: every lora-triton candidate against the usual baselines.

    python bench/bench_forward.py results.csv            # GPU: Llama-7B shapes, bf16 (< 8 min on an H200)
    python bench/bench_forward.py --quick results.csv    # CPU: tiny shapes through the interpreter (CI)

For each projection shape (K, N), rank r and token count M it times (median of
``triton.testing.do_bench``) the candidates of ``lora_forward.METHODS`` and three baselines:

``dense``          (a) ``F.linear`` on a dense bf16 weight + PEFT-style LoRA matmuls
``dequant_linear`` (b) dequantize NF4 (bitsandbytes' kernel when installed, else ours) +
                   ``F.linear`` + PEFT-style LoRA: what bitsandbytes + PEFT does
``bnb_matmul_4bit`` (c) ``bitsandbytes.matmul_4bit`` + LoRA, only when bitsandbytes imports

and writes one CSV row per (shape, method): relative error of ``y`` against an fp32 product
on the same dequantized weight (a fast but wrong kernel shows), time, TFLOP/s, GB/s, speed-up over each baseline,
the dispatcher's current choice and whether this method was the fastest candidate, so the
dispatch constants in ``lora_forward.choose_method`` can be set from the table. GB/s counts
the bytes an NF4 forward must move (packed W, absmax, x, y, A, B, S) for every row, so rows
compare on the same work. Every row carries the GPU name, versions and a UTC timestamp.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

LLAMA7B_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N): q/k/v/o, gate/up, down
FULL = dict(shapes=LLAMA7B_SHAPES, ranks=[16, 64], ms=[1, 16, 128, 1024, 4096, 8192], dtype=torch.bfloat16)
QUICK = dict(shapes=[(128, 96)], ranks=[8], ms=[1, 17], dtype=torch.bfloat16)
DECODE_BENCH_MAX_M = 128  # the decode kernel is timed up to here; beyond it is off its design point
BASELINES = ("dense", "dequant_linear", "bnb_matmul_4bit")
FIELDS = ["gpu", "torch", "triton", "bitsandbytes", "timestamp", "dtype", "K", "N", "r", "M", "method", "rel_err", "ms",
          "tflops", "gbps", "x_vs_dense", "x_vs_dequant_linear", "x_vs_bnb_matmul_4bit", "dispatch",
          "fastest_candidate", "note"]


@dataclass
class Problem:
    """One benchmark point and the operands every method reads."""

    m: int
    n: int
    k: int
    r: int
    x: torch.Tensor
    weight: object  # NF4Weight
    dense: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float

    def flops(self) -> float:
        return 2.0 * self.m * (self.n * self.k + self.k * self.r + self.r * self.n)

    def min_bytes(self) -> float:
        """Bytes an NF4 forward must move: packed W + stats, x, y, A, B, S."""
        itemsize = self.x.element_size()
        weight = self.weight.nbytes - self.weight.code.numel() * 4
        acts = itemsize * (self.m * self.k + self.m * self.n + self.m * self.r)
        return weight + acts + itemsize * self.r * (self.k + self.n)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="where to write the CSV table")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU interpreter when no GPU): CI smoke run")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="stop starting new shapes after this many seconds (rows left out are reported)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    from lora_triton.kernels.runtime import interpreter_enabled

    device = torch.device("cpu" if interpreter_enabled() or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not interpreter_enabled():
        print("no CUDA device: use --quick (interpreter) on CPU", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    rows = run_plan(plan, device, args.budget_s)
    write_csv(args.csv, rows)
    print_table(rows)
    print(f"wrote {len(rows)} rows to {args.csv}")
    return 0


def run_plan(plan: dict, device: torch.device, budget_s: float) -> list[dict]:
    start, rows = time.monotonic(), []
    meta = environment(device)
    for k, n in plan["shapes"]:
        for r in plan["ranks"]:
            for m in plan["ms"]:
                if time.monotonic() - start > budget_s:
                    print(f"budget of {budget_s:.0f}s spent: skipping K={k} N={n} r={r} M={m}", file=sys.stderr)
                    continue
                problem = make_problem(m, n, k, r, plan["dtype"], device)
                rows.extend(bench_problem(problem, meta, device))
                del problem
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def environment(device: torch.device) -> dict:
    import triton

    bnb = _bitsandbytes()
    return {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (triton interpreter)",
            "torch": torch.__version__, "triton": triton.__version__,
            "bitsandbytes": getattr(bnb, "__version__", "") if bnb else "",
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def make_problem(m: int, n: int, k: int, r: int, dtype: torch.dtype, device: torch.device) -> Problem:
    from lora_triton.format import NF4Weight

    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, std):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).mul_(std)

    weight = NF4Weight.quantize(randn(n, k, std=k ** -0.5).to(dtype), 64, True)
    return Problem(m, n, k, r, x=randn(m, k, std=1.0).to(dtype), weight=weight, dense=weight.dequantize(dtype),
                   lora_a=randn(r, k, std=k ** -0.5).to(dtype), lora_b=randn(n, r, std=r ** -0.5).to(dtype),
                   scale=2.0 / r)


# ---------------------------------------------------------------------- methods
def peft_lora(y: torch.Tensor, p: Problem) -> torch.Tensor:
    """PEFT's LoRA branch: ``y + lora_B(lora_A(x)) * s`` as separate matmuls."""
    return y + torch.nn.functional.linear(torch.nn.functional.linear(p.x, p.lora_a), p.lora_b) * p.scale


def methods_for(p: Problem, device: torch.device) -> dict[str, Callable[[], object]]:
    """Every method to time for ``p``: name -> zero-argument callable."""
    import torch.nn.functional as F

    from lora_triton.kernels import lora_forward as lf

    fns = {"dense": lambda: peft_lora(F.linear(p.x, p.dense), p)}
    dequant = lambda: lf.dequantize_nf4(p.weight, p.x.dtype)  # noqa: E731  (stand-in when bitsandbytes is absent)
    quantized = _bnb_quantized(p)
    if quantized is not None:
        bnb, (packed, state) = quantized
        dequant = lambda: bnb.functional.dequantize_4bit(packed, state)  # noqa: E731
        fns["bnb_matmul_4bit"] = lambda: peft_lora(bnb.matmul_4bit(p.x, packed.t(), quant_state=state), p)
    fns["dequant_linear"] = lambda: peft_lora(F.linear(p.x, dequant()), p)
    for method in lf.METHODS:
        if method == "decode" and p.m > DECODE_BENCH_MAX_M:
            continue
        fns[method] = (lambda method=method: lf.lora_forward_triton(p.x, p.weight, p.lora_a, p.lora_b, p.scale,
                                                                    method=method))
    return fns


def _bitsandbytes():
    try:
        import bitsandbytes
    except Exception:  # not installed, or a broken CUDA library: (c) is skipped either way
        return None
    return bitsandbytes


def _bnb_quantized(p: Problem):
    bnb = _bitsandbytes()
    if bnb is None:
        return None
    try:
        return bnb, bnb.functional.quantize_4bit(p.dense, blocksize=64, compress_statistics=True, quant_type="nf4")
    except Exception as err:  # no kernels for this device in this build
        print(f"bitsandbytes unusable here ({err}); skipping its rows", file=sys.stderr)
        return None


# ---------------------------------------------------------------------- timing
def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of ``fn``: do_bench (L2 flushed) on a GPU, a few wall-clock runs on CPU."""
    if device.type == "cuda":
        import triton

        fn()  # compile / autotune outside the timed region
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=[0.5]))
    fn()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def reference_output(p: Problem) -> torch.Tensor:
    """``y`` in fp32 from the dequantized weight: every method's output is checked against it."""
    x, a, b = p.x.float(), p.lora_a.float(), p.lora_b.float()
    return x @ p.dense.float().t() + p.scale * (x @ a.t()) @ b.t()


def output_error(out, expected: torch.Tensor) -> float:
    """Relative error of a method's ``y`` (methods return ``y`` or ``(y, S)``)."""
    from lora_triton.testing import relative_error

    return relative_error(out[0] if isinstance(out, tuple) else out, expected)


def bench_problem(p: Problem, meta: dict, device: torch.device) -> list[dict]:
    from lora_triton.kernels import lora_forward as lf

    timings, errors = {}, {}
    expected = reference_output(p)
    for name, fn in methods_for(p, device).items():
        try:
            errors[name] = output_error(fn(), expected)
            timings[name] = time_ms(fn, device)
        except Exception as err:  # one broken candidate must not hide the others' numbers
            print(f"K={p.k} N={p.n} r={p.r} M={p.m} {name}: failed ({type(err).__name__}: {err})", file=sys.stderr)
    candidates = {name: t for name, t in timings.items() if name in lf.METHODS}
    fastest = min(candidates, key=candidates.get) if candidates else ""
    dispatch = lf.choose_method(device, p.m, p.n, p.k, p.r)
    rows = []
    for name, ms in timings.items():
        ratio = lambda base: f"{timings[base] / ms:.3f}" if base in timings else ""  # noqa: E731
        rows.append({**meta, "dtype": str(p.x.dtype).removeprefix("torch."), "K": p.k, "N": p.n, "r": p.r,
                     "M": p.m, "method": name, "rel_err": f"{errors[name]:.2e}", "ms": f"{ms:.5f}",
                     "tflops": f"{p.flops() / ms / 1e9:.4g}",
                     "gbps": f"{p.min_bytes() / ms / 1e6:.4g}", "x_vs_dense": ratio("dense"),
                     "x_vs_dequant_linear": ratio("dequant_linear"), "x_vs_bnb_matmul_4bit": ratio("bnb_matmul_4bit"),
                     "dispatch": dispatch, "fastest_candidate": int(name == fastest),
                     "note": "baseline" if name in BASELINES else ""})
    return rows


# ---------------------------------------------------------------------- output
def write_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def print_table(rows: list[dict]) -> None:
    """One line per (K, N, r, M): ms of every method, the fastest candidate and the dispatch."""
    if not rows:
        return
    print(f"{rows[0]['gpu']} | torch {rows[0]['torch']} | triton {rows[0]['triton']} | {rows[0]['dtype']}")
    methods = list(dict.fromkeys(row["method"] for row in rows))
    print(f"{'K':>6} {'N':>6} {'r':>3} {'M':>5} " + " ".join(f"{m:>15}" for m in methods) + "  fastest / dispatch")
    points = dict.fromkeys((row["K"], row["N"], row["r"], row["M"]) for row in rows)
    for point in points:
        here = {row["method"]: row for row in rows if (row["K"], row["N"], row["r"], row["M"]) == point}
        cells = " ".join(f"{here[m]['ms'] if m in here else '-':>15}" for m in methods)
        fastest = next((m for m, row in here.items() if row["fastest_candidate"]), "-")
        dispatch = next(iter(here.values()))["dispatch"]
        print(f"{point[0]:>6} {point[1]:>6} {point[2]:>3} {point[3]:>5} {cells}  {fastest} / {dispatch}")


if __name__ == "__main__":
    sys.exit(main())
