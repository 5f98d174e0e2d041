"""lora-triton bench: run the benchmark tables, write CSV + PNG, print the tables.

    lora-triton bench                         # GPU: forward + layer tables; CPU: the CPU table
    lora-triton bench --what cpu --out DIR    # one table
    lora-triton bench --quick                 # tiny shapes, seconds (CI); on CPU the GPU tables
                                              # run through Triton's interpreter
    lora-triton bench --what static           # kernel-efficiency report: sm_90 compiles on CPU
    lora-triton bench --what model            # training steps of a whole Llama: ours vs PEFT (Q)LoRA
    lora-triton bench --what adapters         # mixed-adapter batches vs the number of adapters in them
    lora-triton bench --what model --model smollm2   # the model table on SmolLM2-135M's shapes
    lora-triton bench --what overhead         # host time of one layer call at tiny shapes: ours vs PEFT
    lora-triton bench --what forward --write-dispatch lora_triton/ops/dispatch_table.json
                                              # GPU: measure, then merge the fastest into a dispatch table
    lora-triton bench --what forward,layer --plan dispatch   # the points that decide the dispatch table
    python -m lora_triton.bench ...           # the same, without the lora-triton command

Tables: ``forward`` (``forward.py``), ``layer`` (``layer.py``), ``cpu`` (``cpu.py``), ``model``
(``model.py``: whole training steps, on the GPU when there is one, else the CPU), ``adapters``
(``adapters.py``: mixed-adapter batches, GPU when there is one, else CPU), ``overhead``
(``overhead.py``: host time of one layer call at tiny shapes, ours eager and compiled against
PEFT's LoRA on bitsandbytes and on a 16-bit layer, GPU when there is one, else CPU), ``static``
(``static.py``: no device needed, writes ``DIR/static.csv``, exits 1 when a dispatched kernel
misses its budget). Each of the others writes
``DIR/<table>.csv`` and ``DIR/<table>.png`` (speed-up vs M per shape); the forward and layer
tables append each point's rows to their CSV as soon as it is measured, so a stopped run keeps
them. ``--budget-s`` is the whole run's time budget: each table gets a share of what is left
(the forward table twice a share), points past it are skipped and named on stderr.
``--write-dispatch PATH`` merges each forward point's fastest candidate into the dispatch table
at PATH as soon as it is measured (a measured point replaces that point only; a missing file is
started); nothing is written into the installed package unless PATH names it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import adapters, cpu, forward, layer, model, overhead
from ..kernels.runtime import interpreting
from ..outputs import QUICK_NOTE, default_dir, writable_dir
from .environment import environment
from .report import CsvRows, plot_speedups, print_table, write_csv

TABLES = ("forward", "layer", "cpu", "model", "adapters", "overhead", "static")
#: Tables that run on the GPU when there is one, else on the CPU (our torch path, never the interpreter).
DEVICE_TABLES = ("model", "adapters", "overhead")
GPU_TABLES = ("forward", "layer")
DEFAULT_BUDGET_S = 420.0
#: Shares of the remaining budget: the forward table decides the dispatch, so it gets two.
BUDGET_SHARES = {"forward": 2.0}
PLANS = tuple(forward.PLANS)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the bench options to ``parser`` and make ``run_bench`` its handler."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, a few seconds per table (CI smoke run); without a GPU the forward and "
                             "layer tables run through Triton's CPU interpreter")
    parser.add_argument("--out", default=default_dir("bench"), metavar="DIR",
                        help="folder for <table>.csv and <table>.png (default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, metavar="S",
                        help="time budget of the whole run in seconds; points past it are skipped "
                             "(default: %(default)s)")
    parser.add_argument("--what", default=None, metavar="TABLES",
                        help="comma-separated tables out of forward,layer,cpu,model,adapters,overhead,static "
                             "(default: forward,layer on a CUDA GPU, cpu otherwise); static is the CPU-side "
                             "kernel-efficiency report (sm_90 compiles); model times whole training steps of a Llama "
                             "(--model); adapters times mixed-adapter batches (1 to 64 distinct adapters) against "
                             "PEFT's; overhead times the host cost of one layer call at tiny shapes (ours eager and "
                             "compiled, bitsandbytes + PEFT, 16-bit PEFT LoRA, a mixed batch of 4 adapters) with "
                             "aten op counts and, on a GPU, kernel launches")
    parser.add_argument("--model", default="llama", choices=model.MODELS,
                        help="model table: llama (the Llamas of model.PLANS) or smollm2 (SmolLM2-135M's shapes, "
                             "random weights) (default: %(default)s)")
    parser.add_argument("--write-dispatch", default=None, metavar="PATH",
                        help="merge the forward table's fastest candidate per (GPU, M bucket, N, K, r) into the "
                             "dispatch table at PATH as each point is measured (the repository's is "
                             "lora_triton/ops/dispatch_table.json; a missing file is started)")
    parser.add_argument("--plan", default=None, choices=PLANS,
                        help="points of the forward and layer tables: default; dispatch (M = 1, 16, 128, 1024, "
                             "8192 on the Llama-7B shapes, r = 16); crossover (forward only: M = 16..2048, "
                             f"r = 16 and 64, with dx rows). Default: ${forward.SWEEP_ENV}, else default")
    parser.add_argument("--triton", default=None, metavar="VERSIONS",
                        help="static table: comma-separated triton versions to compile with, 'installed' for the one "
                             "imported (default: 3.6.0,installed; --quick: installed)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads for the run (default: torch's, one per core); CPU timings with "
                             "as many threads as cores are distorted by any other busy process")
    parser.set_defaults(func=run_bench)
    return parser


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``bench`` subcommand on ``subparsers`` (from ``add_subparsers``)."""
    parser = subparsers.add_parser("bench", help="benchmark the kernels and the layer against the usual baselines",
                                   description=__doc__.splitlines()[0])
    return add_arguments(parser)


def selected_tables(what: str | None, cuda: bool) -> list[str]:
    """The tables ``--what`` names, in run order (default by device)."""
    if what is None:
        return list(GPU_TABLES) if cuda else ["cpu"]
    names = [name.strip() for name in what.split(",") if name.strip()]
    unknown = sorted(set(names) - set(TABLES))
    if unknown or not names:
        raise SystemExit(f"--what takes a comma-separated subset of {','.join(TABLES)}; got {what!r}")
    return [name for name in TABLES if name in names]


def _kernel_device(quick: bool) -> torch.device | None:
    """Where the forward and layer tables run: CUDA, or with ``quick`` the CPU through Triton's
    interpreter (switched on here when no kernel module is imported yet); None if neither."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not quick:
        return None
    if not interpreting():
        jit_free = ("lora_triton.kernels", "lora_triton.kernels.runtime", "lora_triton.kernels.native")
        if any(name.startswith("lora_triton.kernels") and name not in jit_free for name in sys.modules):
            return None  # kernels were imported for a GPU; the interpreter can no longer be switched on
        os.environ["TRITON_INTERPRET"] = "1"  # read by triton.jit when the kernel modules are imported
    return torch.device("cpu")


def budget_share(tables: list[str], left_s: float) -> float:
    """The first of ``tables``' share of ``left_s`` seconds (``BUDGET_SHARES``, 1 for the others)."""
    shares = [BUDGET_SHARES.get(table, 1.0) for table in tables]
    return max(0.0, left_s) * shares[0] / sum(shares)


def check_plan(plan: str | None, tables: list[str]) -> None:
    """SystemExit when ``--plan`` names a plan one of the selected tables lacks."""
    if plan is None:
        return
    lacking = [t for t in tables if (t == "forward" and plan not in forward.PLANS)
               or (t == "layer" and plan not in layer.PLANS)]
    if lacking:
        raise SystemExit(f"--plan {plan}: no such plan for the {' and '.join(lacking)} table "
                         f"(forward: {', '.join(forward.PLANS)}; layer: {', '.join(layer.PLANS)})")


def run_bench(args: argparse.Namespace) -> int:
    """Run the selected tables; returns 0 when every one of them wrote rows."""
    tables = selected_tables(args.what, torch.cuda.is_available())
    check_plan(args.plan, tables)
    writable_dir(args.out, "bench", "--out")
    if args.threads:
        torch.set_num_threads(args.threads)
    start, ok = time.monotonic(), True
    if "static" in tables:
        from .static import run_static

        versions = args.triton.split(",") if args.triton else None
        ok = run_static(args.out, args.quick, versions) == 0
        tables = [t for t in tables if t != "static"]
    for i, table in enumerate(tables):
        budget = budget_share(tables[i:], args.budget_s - (time.monotonic() - start))
        if table in DEVICE_TABLES:
            ok = _run_device_table(args, budget, table) and ok
            continue
        device = torch.device("cpu") if table == "cpu" else _kernel_device(args.quick)
        if device is None:
            print(f"{table}: needs a CUDA GPU (or --quick, which runs the kernels through Triton's CPU "
                  "interpreter); try --what cpu", file=sys.stderr)
            ok = False
            continue
        meta = environment(device, args.quick, interpreted=table != "cpu" and device.type == "cpu")
        module = {"forward": forward, "layer": layer, "cpu": cpu}[table]
        csv_path = os.path.join(args.out, f"{table}.csv")
        if table == "cpu":
            rows = cpu.run(device, meta, args.quick, budget)
            write_csv(csv_path, rows, module.FIELDS)
        else:
            merge = dispatch_writer(args.write_dispatch, device) if table == "forward" and args.write_dispatch else None
            with CsvRows(csv_path, module.FIELDS) as out:
                def on_rows(point_rows: list[dict]) -> None:
                    out.append(point_rows)
                    if merge is not None:
                        merge(point_rows)

                rows = module.run(device, meta, args.quick, budget, plan=args.plan, on_rows=on_rows)
        if table == "forward":
            print_table(rows, ["dtype", "K", "N", "r", "M"], "method", "ms", "forward table (ms)")
            if args.write_dispatch:
                print(f"forward: dispatch table at {args.write_dispatch} has this run's points")
        else:
            print_table(rows, ["dtype", "K", "N", "r", "M", "pass"], "impl", "ms", f"{table} table (ms)")
            layer.print_ratios(rows, f"{table} table")
        smoke = f"\n{QUICK_NOTE}" if args.quick else ""
        png = plot_speedups(module.speedups(rows), os.path.join(args.out, f"{table}.png"),
                            f"lora-triton {table}: speed-up vs M ({meta['device']}){smoke}")
        print(f"{table}: wrote {len(rows)} rows to {csv_path}" + (f" and {png}" if png else ""))
        ok = ok and bool(rows)
    if args.quick:
        print(QUICK_NOTE)
    return 0 if ok else 1


def dispatch_writer(path: str, device: torch.device):
    """``on_rows`` callback: merges each point's fastest candidates into the dispatch table at ``path``
    (``ops.dispatch.merge_tables``: a measured point replaces that point only) and writes it at once.
    Refuses interpreter timings for the package's own table; a malformed table at ``path`` is an
    error, never replaced."""
    from ..ops import dispatch

    if device.type != "cuda" and os.path.realpath(path) == os.path.realpath(dispatch.TABLE_PATH):
        raise SystemExit(f"--write-dispatch {path}: the package's dispatch table takes GPU timings only, "
                         f"and this run times {device}; name another file")

    def current() -> dict:
        if not os.path.exists(path):
            return {"format": dispatch.TABLE_FORMAT, "gpus": {}}
        with open(path, encoding="utf-8") as f:
            return dispatch.parse_table(f.read())

    try:
        current()
    except (OSError, ValueError) as err:
        raise SystemExit(f"--write-dispatch {path}: not a dispatch table ({type(err).__name__}: {err}); "
                         "fix or remove it first") from err

    def merge(rows: list[dict]) -> None:
        measured = dispatch.table_from_rows(rows)
        if measured["gpus"]:
            dispatch.write_table(dispatch.merge_tables(current(), measured), path)
    return merge


def _run_device_table(args: argparse.Namespace, budget_s: float, table: str) -> bool:
    """A table that runs on the GPU when there is one, else on the CPU (our layers' torch path,
    never the interpreter): one of ``DEVICE_TABLES``. Writes ``DIR/<table>.csv`` and ``.png``;
    True when it wrote rows."""
    module = {"model": model, "adapters": adapters, "overhead": overhead}[table]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = environment(device, args.quick)
    options = {"model": getattr(args, "model", "llama")} if table == "model" else {}
    rows = module.run(device, meta, args.quick, budget_s, **options)
    csv_path = os.path.join(args.out, f"{table}.csv")
    write_csv(csv_path, rows, module.FIELDS)
    module.print_summary(rows)
    smoke = f"\n{QUICK_NOTE}" if args.quick else ""
    png = module.plot(rows, os.path.join(args.out, f"{table}.png"), f"lora-triton {table}: {module.PLOT_TITLE} "
                      f"({meta['device']}){smoke}")
    print(f"{table}: wrote {len(rows)} rows to {csv_path}" + (f" and {png}" if png else ""))
    return bool(rows)


def main(argv: list[str] | None = None) -> int:
    """``python -m lora_triton.bench [options]``."""
    parser = argparse.ArgumentParser(prog="python -m lora_triton.bench", description=__doc__.splitlines()[0])
    args = add_arguments(parser).parse_args(argv)
    return args.func(args)
