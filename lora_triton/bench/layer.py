"""Layer table: forward, backward and forward+backward of one QLoRA layer, ours against
bitsandbytes + PEFT and dequantize + ``F.linear`` + LoRA (``contenders.py``), same run.

Passes (each a median after warm-up):

``fwd``      inference forward, ``torch.no_grad()``
``bwd``      backward alone, replayed on a retained graph (``retain_graph=True``)
``fwd+bwd``  one training step of the layer: forward with autograd, ``y.backward(dy)``,
             gradients of x, A and B

Per row: time, TFLOP/s (useful FLOPs of the pass) and % of the measured dense-matmul peak,
speed-up over each baseline, and on a GPU the peak memory of ``fwd+bwd`` above what was
allocated before it (``torch.cuda.max_memory_allocated``) and its ratio to bitsandbytes +
PEFT's. ``rel_err`` is the largest relative error of y, dx, dA, dB against an fp32 reference
on the same NF4 weight. Targets: ``fwd+bwd`` >= 1.3x faster than
bitsandbytes + PEFT at M >= 1024 with peak memory no higher.
"""

from __future__ import annotations

import itertools
import sys
from typing import Callable

import torch

from . import contenders as cs
from .environment import META_FIELDS
from .forward import DISPATCH_MS, LLAMA7B_SHAPES
from .report import Speedup
from .timing import cpu_ms_interleaved, time_ms, within_budget

PASSES = ("fwd", "bwd", "fwd+bwd")
BASELINES = ("bnb_peft", "dequant_linear")
# r=16 over every shape first, so a spent budget cuts the r=64 rows, not the target's.
FULL = dict(shapes=LLAMA7B_SHAPES, ranks=[16, 64], ms=[16, 128, 1024, 4096, 8192], dtypes=[torch.bfloat16])
QUICK = dict(shapes=[(128, 96)], ranks=[8], ms=[17], dtypes=[torch.bfloat16])
#: The forward table's ``dispatch`` points: the layer as dispatched there.
DISPATCH = dict(shapes=LLAMA7B_SHAPES, ranks=[16], ms=DISPATCH_MS, dtypes=[torch.bfloat16])
#: Plan name (as ``--plan`` says it) -> (plan, its ``--quick`` twin).
PLANS = {"default": (FULL, QUICK), "dispatch": (DISPATCH, QUICK)}
FIELDS = META_FIELDS + ["dtype", "K", "N", "r", "M", "pass", "impl", "ms", "timer", "tflops", "pct_peak_tflops",
                        "peak_mib", "x_vs_bnb_peft", "x_vs_dequant_linear", "mem_vs_bnb_peft", "rel_err", "note"]


def plan_for(quick: bool, name: str | None = None) -> dict:
    """The plan ``PLANS`` names (None: ``default``; ``quick``: its tiny twin); ValueError for another name."""
    name = name or "default"
    if name not in PLANS:
        raise ValueError(f"the layer table's plan must be one of {sorted(PLANS)}, got {name!r}")
    return PLANS[name][1 if quick else 0]


def run(device: torch.device, meta: dict, quick: bool, budget_s: float, plan: dict | str | None = None,
        backend: str = "triton", passes: tuple[str, ...] = PASSES, table: str = "layer",
        on_rows: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """All rows of a layer table for ``plan`` (a plan dict, or a name for ``plan_for``); points past
    ``budget_s`` seconds are skipped and named on stderr. ``on_rows`` receives each point's rows as
    soon as they are measured."""
    plan = plan if isinstance(plan, dict) else plan_for(quick, plan)
    points = itertools.product(plan["dtypes"], plan["ranks"], plan["shapes"], plan["ms"])
    rows = []
    for dtype, r, (k, n), m in within_budget(points, budget_s, table):
        point_rows = bench_point(m, n, k, r, dtype, device, backend, meta, quick, passes)
        rows.extend(point_rows)
        if on_rows is not None:
            on_rows(point_rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def pass_flops(m: int, n: int, k: int, r: int, name: str) -> float:
    """Useful FLOPs: forward ``x W^T``, ``x A^T``, ``S B^T``; backward ``dy W``, ``dy B``,
    ``G A``, ``G^T x``, ``dy^T S``."""
    fwd = 2.0 * m * (n * k + k * r + r * n)
    bwd = 2.0 * m * (n * k + 2 * n * r + 2 * r * k)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[name]


def _clear_grads(x: torch.Tensor, c: cs.Contender) -> None:
    x.grad = c.lora_a.grad = c.lora_b.grad = None


def _timed_fn(name: str, c: cs.Contender, x: torch.Tensor, dy: torch.Tensor):
    """Zero-argument callable running pass ``name`` of contender ``c``."""
    if name == "fwd":
        def fwd():
            with torch.no_grad():
                return c.module(x)
        return fwd
    if name == "bwd":
        y = c.module(x)  # the graph every timed backward replays

        def bwd():
            _clear_grads(x, c)
            y.backward(dy, retain_graph=True)
        return bwd

    def step():
        _clear_grads(x, c)
        c.module(x).backward(dy)
    return step


def _peak_mib(fn, x: torch.Tensor, c: cs.Contender) -> float:
    """Peak CUDA memory of ``fn`` above what was allocated before it, MiB."""
    _clear_grads(x, c)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _max_error(c: cs.Contender, x: torch.Tensor, dy: torch.Tensor, expected: tuple) -> float:
    from ..testing import relative_error

    _clear_grads(x, c)
    y = c.module(x)
    y.backward(dy)
    got = (y, x.grad, c.lora_a.grad, c.lora_b.grad)
    return max(relative_error(g, e) for g, e in zip(got, expected))


def _reference(x, dy, weight, a, b, scale) -> tuple:
    """``(y, dx, dA, dB)`` in fp32 on the same NF4 weight."""
    from ..reference import lora_backward, lora_forward

    x32, a32, b32 = x.detach().float(), a.detach().float(), b.detach().float()
    y, s = lora_forward(x32, weight, a32, b32, scale)
    grads = lora_backward(dy.float(), x32, weight, a32, b32, scale, s)
    return y, grads.dx, grads.dA, grads.dB


def bench_point(m: int, n: int, k: int, r: int, dtype: torch.dtype, device: torch.device, backend: str,
                meta: dict, quick: bool, passes: tuple[str, ...]) -> list[dict]:
    """Rows of one (shape, rank, M, dtype): every pass of every contender."""
    contenders, weight, scale = cs.build(n, k, r, dtype, device, backend)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(m, k, generator=gen, device=device).to(dtype).requires_grad_(True)
    dy = torch.randn(m, n, generator=gen, device=device).to(dtype)
    ours = contenders[0]
    expected = _reference(x, dy, weight, ours.lora_a, ours.lora_b, scale)
    label = f"{dtype} K={k} N={n} r={r} M={m}"
    if device.type == "cpu" and not quick:
        measured = _bench_interleaved(contenders, x, dy, expected, passes, label)
    else:
        measured = _bench_one_by_one(contenders, x, dy, expected, passes, device, quick, label)
    return _rows(measured, meta, m, n, k, r, dtype)


def _failed(label: str, c: cs.Contender, err: Exception) -> None:
    """One broken contender must not hide the others' numbers: name it on stderr."""
    print(f"{label} {c.name}: failed ({type(err).__name__}: {err})", file=sys.stderr)


def _bench_one_by_one(contenders: list, x: torch.Tensor, dy: torch.Tensor, expected: tuple,
                      passes: tuple[str, ...], device: torch.device, quick: bool,
                      label: str) -> tuple[dict, dict, dict, dict]:
    """GPU (and CPU quick mode): each contender's passes timed in turn, peak memory on CUDA.
    Returns ``(results, errors, peaks, notes)``."""
    results, errors, peaks, notes = {}, {}, {}, {}
    for c in contenders:
        try:
            errors[c.name] = _max_error(c, x, dy, expected)
            for name in passes:
                fn = _timed_fn(name, c, x, dy)
                results[(c.name, name)] = time_ms(fn, device, quick=quick)
                if name == "fwd+bwd" and device.type == "cuda":
                    peaks[c.name] = _peak_mib(fn, x, c)
                del fn  # frees the graph a backward-only closure retains
            notes[c.name] = c.note
        except Exception as err:
            _failed(label, c, err)
    return results, errors, peaks, notes


def _bench_interleaved(contenders: list, x: torch.Tensor, dy: torch.Tensor, expected: tuple,
                       passes: tuple[str, ...], label: str) -> tuple[dict, dict, dict, dict]:
    """CPU: all contenders' pass timed in alternating rounds (``timing.cpu_ms_interleaved``), so a
    slow spell of a shared machine hits every contender alike. Returns ``(results, errors, {}, notes)``."""
    results, errors, notes = {}, {}, {}
    working = []
    for c in contenders:
        try:
            errors[c.name] = _max_error(c, x, dy, expected)
            notes[c.name] = c.note
            working.append(c)
        except Exception as err:
            _failed(label, c, err)
    for name in passes:
        fns = {c.name: _timed_fn(name, c, x, dy) for c in working}
        for impl, ms in cpu_ms_interleaved(fns).items():
            results[(impl, name)] = (ms, "cpu_wall_interleaved")
        del fns  # frees the graphs backward-only closures retain
    return results, errors, {}, notes


def _rows(measured: tuple[dict, dict, dict, dict], meta: dict, m: int, n: int, k: int, r: int,
          dtype: torch.dtype) -> list[dict]:
    """Table rows from ``(results, errors, peaks, notes)`` of one point."""
    results, errors, peaks, notes = measured
    peak_tflops = float(meta["peak_matmul_tflops"])
    rows = []
    for (impl, name), (ms, timer) in results.items():
        ratio = lambda base: (f"{results[(base, name)][0] / ms:.4g}"  # noqa: E731
                              if (base, name) in results else "")
        tflops = pass_flops(m, n, k, r, name) / ms / 1e9
        peak = peaks.get(impl) if name == "fwd+bwd" else None
        mem_ratio = f"{peak / peaks['bnb_peft']:.3f}" if peak is not None and peaks.get("bnb_peft") else ""
        rows.append({**meta, "dtype": str(dtype).removeprefix("torch."), "K": k, "N": n, "r": r, "M": m,
                     "pass": name, "impl": impl, "ms": f"{ms:.4g}", "timer": timer, "tflops": f"{tflops:.4g}",
                     "pct_peak_tflops": f"{100 * tflops / peak_tflops:.3g}",
                     "peak_mib": "" if peak is None else f"{peak:.2f}", "x_vs_bnb_peft": ratio("bnb_peft"),
                     "x_vs_dequant_linear": ratio("dequant_linear"), "mem_vs_bnb_peft": mem_ratio,
                     "rel_err": f"{errors[impl]:.2e}", "note": notes.get(impl, "")})
    return rows


def print_ratios(rows: list[dict], title: str) -> None:
    """Ours per point and pass: ms and the speed-up (and memory ratio) over each baseline."""
    ours = [row for row in rows if row["impl"] == "ours"]
    if not ours:
        return
    print(f"\n{title}: ours vs baselines (x = baseline ms / ours ms; > 1 means ours is faster)")
    print(f"{'dtype':>9} {'K':>6} {'N':>6} {'r':>3} {'M':>5} {'pass':>8} {'ours ms':>10} {'x_vs_bnb_peft':>14} "
          f"{'x_vs_dequant':>13} {'peak MiB':>9} {'mem_vs_bnb':>10}")
    for row in ours:
        print(f"{row['dtype']:>9} {row['K']:>6} {row['N']:>6} {row['r']:>3} {row['M']:>5} {row['pass']:>8} "
              f"{row['ms']:>10} {row['x_vs_bnb_peft'] or '-':>14} {row['x_vs_dequant_linear'] or '-':>13} "
              f"{row['peak_mib'] or '-':>9} {row['mem_vs_bnb_peft'] or '-':>10}")


def speedups(rows: list[dict], passes: tuple[str, ...] = ("fwd+bwd",)) -> list[Speedup]:
    """Plot points: ours' speed-up over each baseline for ``passes``, per shape (and dtype, rank)."""
    dtypes = {row["dtype"] for row in rows}
    points = []
    for row in rows:
        if row["impl"] != "ours" or row["pass"] not in passes:
            continue
        for base in BASELINES:
            if row[f"x_vs_{base}"]:
                dtype = f"{row['dtype']}, " if len(dtypes) > 1 else ""
                points.append(Speedup(f"K={row['K']} N={row['N']}",
                                      f"{row['pass']} vs {base} ({dtype}r={row['r']})", int(row["M"]),
                                      float(row[f"x_vs_{base}"])))
    return points
