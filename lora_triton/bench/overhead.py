"""Overhead table: the host time of one layer call at tiny shapes, where compute is negligible and
what is left is Python, argument handling, dispatch, validation and autograd bookkeeping.

One layer ``[out, in]`` of rank ``r``, ``x [B=4, M/4, in]`` requiring grad, modules in training mode,
timed on the device present (the CPU, or CUDA when there is one) in alternating rounds (one call of
each contender per round, so a slow spell of a shared machine hits all alike), medians after warm-up:

``ours``           ``LoRALinear4bit.from_linear`` (NF4 base, ``lora_dropout`` as the row says)
``ours_compiled``  ``torch.compile`` of that same layer (``--quick``: ``backend="aot_eager"``, which
                   traces the layer through Dynamo and AOTAutograd without inductor's code generation,
                   so the smoke run stays short; left out, with a line on stderr, if it fails)
``bnb_peft``       a bitsandbytes NF4 ``Linear4bit`` wrapped by PEFT's LoRA layer (the usual QLoRA
                   stack, ``peft.tuners.lora.bnb.Linear4bit``); needs bitsandbytes and PEFT
``peft_lora16``    a plain ``nn.Linear`` (fp32 on CPU, bf16 on a GPU) wrapped by PEFT's LoRA layer
``ours_mixed4``    ours holding 4 adapters, called with ``adapter_names`` naming a different adapter
                   for each of the 4 rows of ``x`` (all four trainable; dropout off)

Cases: ``forward`` (the training forward alone: autograd records, the graph is dropped) and
``forward_backward`` (forward, ``y.backward(dy)``: gradients of x and the adapters; the gradients are
reset before each timed call, outside the timed region). On CUDA the device is synchronized before
and after each timed call (so a call's time also holds its kernels' run and one synchronization:
both small at these shapes). Per row: median, 25th and 75th
percentile of the per-call time in microseconds, and from one ``torch.profiler`` run of one call after
warm-up: ``aten_ops`` (every ``aten::`` op the dispatcher ran, nested ones and those inside custom
ops included), ``host_reads`` (``aten::_local_scalar_dense``: ``.item()``, ``int()``, ``float()``,
``bool()`` of a tensor; ``.tolist()`` dispatches none, on a GPU it shows as a copy) and on CUDA
``launches`` (kernels that ran on the GPU) and ``memcpy`` (copies between host and GPU: a
device-to-host one waits for the GPU, a host-to-device one from pageable memory cannot be captured
in a CUDA graph).

Ratios (lower is better, the targets in brackets): ``x_vs_peft_lora16`` = us / us of
``peft_lora16`` at the same shape, case and dropout [ours <= 1.0], ``x_vs_bnb_peft`` = us / us of
``bnb_peft`` [ours <= 0.5], ``x_vs_ours_single`` (``ours_mixed4`` rows) = us / us of ``ours`` with
one adapter, same shape and case, dropout off [<= 1.5]. Rows of the mixed batch compare with the
baselines' dropout-off rows.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .environment import META_FIELDS, import_bitsandbytes
from .timing import within_budget

IMPLS = ("ours", "ours_compiled", "bnb_peft", "peft_lora16", "ours_mixed4")
CASES = ("forward", "forward_backward")
BASELINES = ("peft_lora16", "bnb_peft")
#: Rows of the batch (each its own adapter in the mixed rows): ``x`` is ``[BATCH, M // BATCH, in]``.
BATCH = 4
MIXED_ADAPTERS = ("default", "task1", "task2", "task3")
#: Points ``(in_features, out_features, M)``, the rank, dropout settings, warm-up rounds, the least and
#: most timed rounds, the least timed seconds per point, the backend of ``ours_compiled``.
FULL = dict(points=[(64, 64, 4), (256, 256, 16)], r=8, dropouts=(0.0, 0.1), warmup=20, min_rounds=100,
            max_rounds=2000, min_time_s=6.0, compile_backend="inductor")
QUICK = dict(points=[(64, 64, 4)], r=8, dropouts=(0.0, 0.1), warmup=3, min_rounds=15, max_rounds=15,
             min_time_s=0.0, compile_backend="aot_eager")
FIELDS = META_FIELDS + ["impl", "case", "dropout", "adapters", "dtype", "M", "in", "out", "r", "us_median", "us_p25",
                        "us_p75", "us_iqr", "samples", "timer", "aten_ops", "host_reads", "launches", "memcpy",
                        "x_vs_peft_lora16", "x_vs_bnb_peft", "x_vs_ours_single", "note"]
PLOT_TITLE = "host time of one layer call"


@dataclass
class Contender:
    """One row's callable: ``call()`` runs the case once; ``reset()`` (untimed) clears gradients."""

    impl: str
    case: str
    dropout: float
    adapters: int
    call: Callable[[], object]
    reset: Callable[[], None]
    note: str = ""


def _peft():
    try:
        import peft
    except ImportError:
        return None
    return peft


class _Wrapper(nn.Module):
    """A one-layer model PEFT can inject into (its target is the module named ``proj``)."""

    def __init__(self, layer: nn.Module, loaded_in_4bit: bool = False):
        super().__init__()
        self.proj = layer
        if loaded_in_4bit:
            self.is_loaded_in_4bit = True  # what PEFT reads to use its bitsandbytes LoRA layer


def _peft_layer(peft, base: nn.Module, r: int, alpha: float, dropout: float, loaded_in_4bit: bool) -> nn.Module:
    """PEFT's LoRA layer around ``base`` (the layer itself, not a wrapper: no extra module call is timed)."""
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"], bias="none")
    return peft.inject_adapter_in_model(config, _Wrapper(base, loaded_in_4bit)).proj.train()


def build_layers(n: int, k: int, r: int, dropout: float, dtype: torch.dtype, device: torch.device,
                 seed: int = 0) -> tuple[dict[str, nn.Module], list[str]]:
    """``({impl: layer}, notes)`` for one dropout setting: ``ours``, ``bnb_peft`` and ``peft_lora16``
    (the latter two only when their libraries import), all on the same ``nn.Linear`` weights, all in
    training mode. ``ours`` keeps PEFT's layout: fp32 adapters, cast to the activation dtype per call."""
    from ..modules import LoRALinear4bit

    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * k ** -0.5)
    alpha = 2.0 * r
    notes = []
    layers = {"ours": LoRALinear4bit.from_linear(linear, r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                 init_lora_weights=False).to(device).train()}
    peft = _peft()
    if peft is None:
        notes.append("PEFT not installed: no bnb_peft or peft_lora16 rows")
        return layers, notes
    bnb = import_bitsandbytes()
    if bnb is None:
        notes.append("bitsandbytes not importable: no bnb_peft rows")
    else:
        try:
            from ..integration.bnb_base import bnb_linear4bit

            quantized = bnb_linear4bit(linear.to(device), compute_dtype=dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layers["bnb_peft"] = _peft_layer(peft, quantized, r, alpha, dropout, loaded_in_4bit=True)
        except Exception as err:  # no native library for this device in this build
            notes.append(f"bnb_peft unusable on {device} ({type(err).__name__}: {err})")
    dense = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(linear.weight)
    dense.weight.requires_grad_(False)
    layers["peft_lora16"] = _peft_layer(peft, dense, r, alpha, dropout, loaded_in_4bit=False)
    return layers, notes


def build_mixed(n: int, k: int, r: int, device: torch.device, seed: int = 0) -> nn.Module:
    """Ours with the ``MIXED_ADAPTERS`` (dropout off), every one of them trainable."""
    from ..modules import LoRALinear4bit

    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * k ** -0.5)
    layer = LoRALinear4bit.from_linear(linear, r=r, lora_alpha=2.0 * r, init_lora_weights=False,
                                       adapter_name=MIXED_ADAPTERS[0])
    for name in MIXED_ADAPTERS[1:]:
        layer.add_adapter(name, r=r, lora_alpha=2.0 * r, init_lora_weights=False)
    layer.set_adapter(MIXED_ADAPTERS[0])
    layer.set_trainable_adapters(list(MIXED_ADAPTERS))
    return layer.to(device).train()


def _contender(impl: str, module: Callable, x: torch.Tensor, dy: torch.Tensor, params: list[torch.Tensor],
               case: str, dropout: float, adapters: int = 1, note: str = "", **kwargs) -> Contender:
    def reset() -> None:
        for t in (x, *params):
            t.grad = None

    if case == "forward":
        def call():
            return module(x, **kwargs)
    else:
        def call():
            module(x, **kwargs).backward(dy)
    return Contender(impl, case, dropout, adapters, call, reset, note)


def _trainable(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def _note(impl: str, layer: nn.Module) -> str:
    if impl == "ours":
        return f"LoRALinear4bit backend={layer.backend or 'auto'}"
    return f"{type(layer).__module__}.{type(layer).__name__} on {type(layer.base_layer).__name__}"


def contenders_for_point(n: int, k: int, m: int, plan: dict, dtype: torch.dtype, device: torch.device,
                         label: str) -> tuple[list[Contender], list[str]]:
    """Every row's ``Contender`` of one point, both cases, and the notes on what was left out. Each
    contender is called once here (a failure leaves it out, named on stderr); the compiled one is
    compiled here, outside any timing."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, m // BATCH, k, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(BATCH, m // BATCH, n, generator=gen).to(device=device, dtype=dtype)
    r, notes, out = plan["r"], [], []
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()  # each point compiles afresh: no recompile limit is reached over the run
    for dropout in plan["dropouts"]:
        layers, why = build_layers(n, k, r, dropout, dtype, device)
        notes.extend(w for w in why if w not in notes)
        candidates = [(impl, layer, _note(impl, layer)) for impl, layer in layers.items()]
        ours = layers["ours"]
        backend = plan["compile_backend"]
        candidates.insert(1, ("ours_compiled", torch.compile(ours, backend=backend),
                              f"torch.compile(backend={backend!r}) of the ours layer"))
        for impl, module, note in candidates:
            params = _trainable(ours if impl == "ours_compiled" else module)
            for case in CASES:
                out.append(_contender(impl, module, x, dy, params, case, dropout, note=note))
    mixed = build_mixed(n, k, r, device)
    names = [MIXED_ADAPTERS[i % len(MIXED_ADAPTERS)] for i in range(BATCH)]
    for case in CASES:
        out.append(_contender("ours_mixed4", mixed, x, dy, _trainable(mixed), case, 0.0, len(MIXED_ADAPTERS),
                              note="adapter_names, one adapter per row", adapter_names=names))
    working = []
    for c in out:
        try:
            c.reset()
            c.call()
            c.call()
            working.append(c)
        except Exception as err:  # one broken contender must not hide the others' numbers
            what = f"{c.impl} {c.case} (dropout {c.dropout})"
            print(f"overhead {label} {what}: failed ({type(err).__name__}: {str(err).splitlines()[0][:300]})",
                  file=sys.stderr)
            if c.impl == "ours_compiled":
                note = f"ours_compiled skipped: torch.compile failed ({type(err).__name__})"
                if note not in notes:
                    notes.append(note)
    return working, notes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_us(contenders: list[Contender], device: torch.device, plan: dict) -> list[list[float]]:
    """Per contender, the microseconds of each timed call: ``warmup`` untimed rounds, then at least
    ``min_rounds`` rounds, more (up to ``max_rounds``) until ``min_time_s`` has passed; one call of each
    contender per round, in turn (on CUDA between two synchronizations)."""
    for _ in range(plan["warmup"]):
        for c in contenders:
            c.reset()
            c.call()
    _sync(device)
    times: list[list[float]] = [[] for _ in contenders]
    gc.collect()
    start, rounds = time.perf_counter(), 0
    clock = time.perf_counter_ns
    while rounds < plan["min_rounds"] or (rounds < plan["max_rounds"]
                                          and time.perf_counter() - start < plan["min_time_s"]):
        for c, values in zip(contenders, times):
            c.reset()
            _sync(device)
            t0 = clock()
            c.call()
            _sync(device)
            values.append((clock() - t0) / 1e3)
        rounds += 1
    return times


def count_ops(c: Contender, device: torch.device) -> dict[str, int | str]:
    """``aten_ops``, ``host_reads`` and on CUDA ``launches`` and ``memcpy`` ("" on CPU) of one call, from
    ``torch.profiler`` (module docstring)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    # Kineto logs two lines per profiler session at its default level; 6 silences it (read when the
    # profiler first starts in this process; a value already set is kept)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    c.reset()
    _sync(device)
    with profile(activities=activities) as prof:
        c.call()
        _sync(device)
    events = prof.events()
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    counts: dict[str, int | str] = {"aten_ops": sum(1 for e in cpu if e.name.startswith("aten::")),
                                    "host_reads": sum(1 for e in cpu if e.name == "aten::_local_scalar_dense"),
                                    "launches": "", "memcpy": ""}
    if device.type == "cuda":
        on_gpu = [e.name.lower() for e in events if e.device_type == DeviceType.CUDA]
        counts["memcpy"] = sum(1 for name in on_gpu if name.startswith("memcpy"))
        counts["launches"] = sum(1 for name in on_gpu if not name.startswith(("memcpy", "memset")))
    return counts


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _us(value: float) -> str:
    return f"{value:.1f}"


def ratio(us: str, base: str) -> str:
    """``us / base`` of two of the table's ``us_median`` strings, rounded as the table writes it."""
    return f"{float(us) / float(base):.4f}"


def bench_point(n: int, k: int, m: int, plan: dict, dtype: torch.dtype, device: torch.device, meta: dict) -> list[dict]:
    """Rows of one point ``(in=k, out=n, M=m)``: every contender, both cases, with the ratios."""
    label = f"in={k} out={n} M={m}"
    contenders, notes = contenders_for_point(n, k, m, plan, dtype, device, label)
    for note in notes:
        print(f"overhead {label}: {note}", file=sys.stderr)
    samples = sample_us(contenders, device, plan)
    timer = "cuda_synchronized_per_call_interleaved" if device.type == "cuda" else "cpu_wall_per_call_interleaved"
    rows = []
    for c, values in zip(contenders, samples):
        rows.append({**meta, "impl": c.impl, "case": c.case, "dropout": c.dropout, "adapters": c.adapters,
                     "dtype": str(dtype).removeprefix("torch."), "M": m, "in": k, "out": n, "r": plan["r"],
                     "us_median": _us(statistics.median(values)), "us_p25": _us(_percentile(values, 0.25)),
                     "us_p75": _us(_percentile(values, 0.75)),
                     "us_iqr": _us(_percentile(values, 0.75) - _percentile(values, 0.25)), "samples": len(values),
                     "timer": timer, **count_ops(c, device), "x_vs_peft_lora16": "", "x_vs_bnb_peft": "",
                     "x_vs_ours_single": "", "note": c.note})
    add_ratios(rows)
    return rows


def _key(row: dict) -> tuple:
    return row["M"], row["in"], row["out"], row["case"], float(row["dropout"])


def add_ratios(rows: list[dict]) -> None:
    """Fill each row's ratio columns (module docstring) in place, from the rows' own ``us_median``."""
    medians = {(row["impl"], *_key(row)): row["us_median"] for row in rows}
    for row in rows:
        for base in BASELINES:
            other = medians.get((base, *_key(row)))
            row[f"x_vs_{base}"] = ratio(row["us_median"], other) if other else ""
        single = medians.get(("ours", *_key(row))) if row["impl"] == "ours_mixed4" else None
        row["x_vs_ours_single"] = ratio(row["us_median"], single) if single else ""


def run(device: torch.device, meta: dict, quick: bool, budget_s: float, plan: dict | None = None) -> list[dict]:
    """All rows of the overhead table (``plan``: ``QUICK`` or ``FULL``; points past ``budget_s`` seconds
    are skipped and named on stderr). fp32 on CPU, bf16 on CUDA."""
    plan = plan or (QUICK if quick else FULL)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for n_in, n_out, m in within_budget(plan["points"], budget_s, "overhead"):
        rows.extend(bench_point(n_out, n_in, m, plan, dtype, device, meta))
    return rows


def print_summary(rows: list[dict]) -> None:
    """One line per row: median us, IQR, op counts and the ratios (lower is better)."""
    if not rows:
        print("overhead table: no rows")
        return
    first = rows[0]
    print(f"\noverhead table: host time of one layer call | {first['device']} | threads {first['threads']} | "
          f"torch {first['torch']} | {first['dtype']} | r={first['r']}, x [{BATCH}, M/{BATCH}, in]")
    print("x_vs_* = us / baseline us at the same point, case and dropout (< 1: faster than the baseline)")
    print(f"{'in':>4} {'out':>4} {'M':>3} {'case':>16} {'impl':>13} {'drop':>4} {'us_med':>8} {'p25-p75':>15} "
          f"{'aten':>5} {'reads':>5} {'launch':>6} {'memcpy':>6} {'x_peft16':>8} {'x_bnb':>7} {'x_single':>8}")
    for point in dict.fromkeys((row["in"], row["out"], row["M"]) for row in rows):
        for case in CASES:
            for row in rows:
                if (row["in"], row["out"], row["M"]) != point or row["case"] != case:
                    continue
                spread = f"{row['us_p25']}-{row['us_p75']}"
                print(f"{row['in']:>4} {row['out']:>4} {row['M']:>3} {case:>16} {row['impl']:>13} "
                      f"{row['dropout']:>4} {row['us_median']:>8} {spread:>15} {row['aten_ops']:>5} "
                      f"{row['host_reads']:>5} {str(row['launches']) or '-':>6} {str(row['memcpy']) or '-':>6} "
                      f"{row['x_vs_peft_lora16'] or '-':>8} "
                      f"{row['x_vs_bnb_peft'] or '-':>7} {row['x_vs_ours_single'] or '-':>8}")
    print_targets(rows)


#: The host-overhead targets: (impl, ratio column, largest ratio met), read from the rows, never asserted.
TARGETS = (("ours", "x_vs_peft_lora16", 1.0), ("ours", "x_vs_bnb_peft", 0.5), ("ours_mixed4", "x_vs_ours_single", 1.5))


def print_targets(rows: list[dict]) -> None:
    """One line per target and row it applies to (eager, dropout off): the ratio and met / missed."""
    lines = []
    for impl, column, bound in TARGETS:
        for row in rows:
            if row["impl"] == impl and not float(row["dropout"]) and row[column]:
                verdict = "met" if float(row[column]) <= bound else "missed"
                lines.append(f"  {impl} {row['case']} in={row['in']} out={row['out']} M={row['M']}: {column} "
                             f"{row[column]} (target <= {bound}): {verdict}")
    if lines:
        print("targets (eager, dropout off):")
        print("\n".join(lines))


def _label(row: dict) -> str:
    drop = float(row["dropout"])
    return f"{row['impl']}{f' p={drop:g}' if drop else ''}"


def plot(rows: list[dict], path: str, title: str) -> str | None:
    """Bars of the median us (whiskers: 25th to 75th percentile) per contender, one panel per point and
    case; returns the PNG's path, or None when matplotlib is missing or there are no rows."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: {path} not written (pip install 'lora-triton[bench]')")
        return None
    if not rows:
        return None
    panels = list(dict.fromkeys((row["in"], row["out"], row["M"], row["case"]) for row in rows))
    labels = list(dict.fromkeys(_label(row) for row in rows))
    colours = {impl: f"C{i}" for i, impl in enumerate(IMPLS)}
    cols = min(2, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 3.8 * nrows), squeeze=False, layout="constrained")
    for ax, (k, n, m, case) in zip(axes.flat, panels):
        mine = {_label(row): row for row in rows if (row["in"], row["out"], row["M"], row["case"]) == (k, n, m, case)}
        shown = [label for label in labels if label in mine]
        med = [float(mine[label]["us_median"]) for label in shown]
        low = [med[i] - float(mine[label]["us_p25"]) for i, label in enumerate(shown)]
        high = [float(mine[label]["us_p75"]) - med[i] for i, label in enumerate(shown)]
        ax.bar(range(len(shown)), med, yerr=[low, high], capsize=3,
               color=[colours.get(mine[label]["impl"], "grey") for label in shown],
               hatch=None, alpha=0.9)
        for i, label in enumerate(shown):
            if float(mine[label]["dropout"]):
                ax.patches[i].set_hatch("//")
        ax.set_xticks(range(len(shown)), shown, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("us per call (median)")
        ax.set_title(f"{case}, in={k} out={n} M={m}", fontsize=10)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}\nhatched: dropout on; whiskers: 25th-75th percentile", fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
