"""lora-triton bench: run the benchmark tables, write CSV + PNG, print the tables.

    lora-triton bench                         # GPU: forward + layer tables; CPU: the CPU table
    lora-triton bench --what cpu --out DIR    # one table
    lora-triton bench --quick                 # tiny shapes, seconds (CI); on CPU the GPU tables
                                              # run through Triton's interpreter
    lora-triton bench --what static           # kernel-efficiency report: sm_90 compiles on CPU
    lora-triton bench --what model            # training steps of a whole Llama: ours vs PEFT (Q)LoRA
    lora-triton bench --what adapters         # mixed-adapter batches vs the number of adapters in them
    lora-triton bench --what forward --write-dispatch   # GPU: measure, then dispatch from it
    python -m lora_triton.bench ...           # the same, without the lora-triton command

Tables: ``forward`` (``forward.py``), ``layer`` (``layer.py``), ``cpu`` (``cpu.py``), ``model``
(``model.py``: whole training steps, on the GPU when there is one, else the CPU), ``adapters``
(``adapters.py``: mixed-adapter batches, GPU when there is one, else CPU), ``static``
(``static.py``: no device needed, writes ``DIR/static.csv``, exits 1 when a dispatched kernel
misses its budget). Each of the others writes
``DIR/<table>.csv`` and ``DIR/<table>.png`` (speed-up vs M per shape). ``--budget-s`` is the
whole run's time budget: each table gets a share of what is left, points past it are
skipped and named on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import adapters, cpu, forward, layer, model
from ..kernels.runtime import interpreting
from ..outputs import QUICK_NOTE, default_dir
from .environment import environment
from .report import plot_speedups, print_table, write_csv

TABLES = ("forward", "layer", "cpu", "model", "adapters", "static")
GPU_TABLES = ("forward", "layer")
DEFAULT_BUDGET_S = 420.0


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
                        help="comma-separated tables out of forward,layer,cpu,model,adapters,static (default: "
                             "forward,layer on a CUDA GPU, cpu otherwise); static is the CPU-side kernel-efficiency "
                             "report (sm_90 compiles); model times whole training steps of a Llama; adapters times "
                             "mixed-adapter batches (1 to 64 distinct adapters) against PEFT's")
    parser.add_argument("--write-dispatch", action="store_true",
                        help="after the forward table, write its fastest candidates per (GPU, M bucket, N, K, r) "
                             "into the package's dispatch table (lora_triton/ops/dispatch_table.json)")
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
        if any(name in sys.modules for name in ("lora_triton.kernels.lora_forward", "lora_triton.kernels.lora_dx")):
            return None  # kernels were imported for a GPU; the interpreter can no longer be switched on
        os.environ["TRITON_INTERPRET"] = "1"  # read by triton.jit when the kernel modules are imported
    return torch.device("cpu")


def run_bench(args: argparse.Namespace) -> int:
    """Run the selected tables; returns 0 when every one of them wrote rows."""
    tables = selected_tables(args.what, torch.cuda.is_available())
    if args.threads:
        torch.set_num_threads(args.threads)
    start, ok = time.monotonic(), True
    if "static" in tables:
        from .static import run_static

        versions = args.triton.split(",") if args.triton else None
        ok = run_static(args.out, args.quick, versions) == 0
        tables = [t for t in tables if t != "static"]
    for i, table in enumerate(tables):
        budget = max(0.0, args.budget_s - (time.monotonic() - start)) / (len(tables) - i)
        if table in ("model", "adapters"):
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
        rows = module.run(device, meta, args.quick, budget)
        csv_path = os.path.join(args.out, f"{table}.csv")
        write_csv(csv_path, rows, module.FIELDS)
        if table == "forward":
            print_table(rows, ["dtype", "K", "N", "r", "M"], "method", "ms", "forward table (ms)")
            if args.write_dispatch and device.type == "cuda":
                from ..ops import dispatch

                dispatch.write_table(dispatch.merge_tables(dispatch.load_table(), dispatch.table_from_rows(rows)))
                print(f"forward: dispatch table written to {dispatch.TABLE_PATH}")
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


def _run_device_table(args: argparse.Namespace, budget_s: float, table: str) -> bool:
    """A table that runs on the GPU when there is one, else on the CPU (our layers' torch path,
    never the interpreter): ``model`` or ``adapters``. Writes ``DIR/<table>.csv`` and ``.png``;
    True when it wrote rows."""
    module = {"model": model, "adapters": adapters}[table]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = environment(device, args.quick)
    rows = module.run(device, meta, args.quick, budget_s)
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
