"""Forward table: every lora-triton forward candidate against the usual baselines.

For each projection shape (K, N), rank r and token count M it times the kernel candidates of
``ops.candidates.FORWARD`` that support the point, the experimental fused kernel
(``kernels.experimental``, a row, never dispatched) and three baselines, all in the same run:

``dense``           ``F.linear`` on a dense bf16 weight + PEFT-style LoRA matmuls
``dequant_linear``  dequantize NF4 (bitsandbytes' kernel when installed, else ours) +
                    ``F.linear`` + PEFT-style LoRA: what bitsandbytes + PEFT does
``bnb_matmul_4bit`` ``bitsandbytes.matmul_4bit`` + LoRA, only when bitsandbytes imports

Plans (``--plan``, else ``LORA_TRITON_FORWARD_SWEEP``, else ``default``): ``default`` (``FULL``);
``dispatch`` the points that decide the dispatch table (M in 1, 16, 128, 1024, 8192 on the three
Llama-7B shapes at r = 16: the GPU check's table); ``crossover`` (crossovers measured, not guessed)
sweeps M in ``CROSSOVER_MS`` over the three Llama-7B shapes at r in {16, 64} and adds rows of
``op = dx`` for every way of computing ``dx`` (``ops.candidates.DX``); ``--write-dispatch`` then writes the ``dx`` points of the dispatch table as
well. It takes far longer than the default plan: give it its own budget (``bench/gpu_check.sh``
with ``GPU_SWEEP=crossover``). Every plan has a ``--quick`` twin at toy sizes.

One row per (shape, op, method, config): relative error of ``y`` against an fp32 product on the same
dequantized weight (a fast but wrong kernel shows), median time, TFLOP/s, GB/s, both as % of
the device peaks measured in the same run, speed-up over each baseline, the dispatcher's
choice and whether this method was the fastest candidate (``--write-dispatch`` turns the
fastest per point, with its ``config``, into ``ops/dispatch_table.json``). The skinny kernel
has a row per benchmark config of ``ops/kernel_configs.json`` on a GPU. GB/s counts the bytes an NF4 forward must move (packed W,
absmax, x, y, A, B, S) for every row, so rows compare on the same work. Small M is timed
from CUDA graphs (launch overhead would dominate), the rest with do_bench; L2 flushed in both.
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from ..ops import candidates, configs, dispatch
from .environment import META_FIELDS, import_bitsandbytes
from .report import Speedup
from .timing import time_ms, within_budget

LLAMA7B_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N): q/k/v/o, gate/up, down
FULL = dict(shapes=LLAMA7B_SHAPES, ranks=[16, 64], ms=[1, 2, 4, 8, 16, 128, 1024, 4096, 8192], dtype=torch.bfloat16)
QUICK = dict(shapes=[(128, 96)], ranks=[8], ms=[1, 17], dtype=torch.bfloat16)
#: The points the dispatch table is decided at (the GPU check's forward and layer tables).
DISPATCH_MS = [1, 16, 128, 1024, 8192]
DISPATCH = dict(shapes=LLAMA7B_SHAPES, ranks=[16], ms=DISPATCH_MS, dtype=torch.bfloat16)
#: The crossover sweep: forward and dx on the Llama-7B shapes, M from 16 to 2048.
CROSSOVER_MS = [16, 32, 64, 128, 256, 512, 1024, 2048]
CROSSOVER = dict(shapes=LLAMA7B_SHAPES, ranks=[16, 64], ms=CROSSOVER_MS, dtype=torch.bfloat16, dx=True)
QUICK_CROSSOVER = dict(shapes=[(128, 96)], ranks=[8], ms=[16, 33], dtype=torch.bfloat16, dx=True)
#: Environment variable that selects the plan when ``--plan`` names none.
SWEEP_ENV = "LORA_TRITON_FORWARD_SWEEP"
#: Plan name -> (plan, its ``--quick`` twin).
PLANS = {"default": (FULL, QUICK), "dispatch": (DISPATCH, QUICK), "crossover": (CROSSOVER, QUICK_CROSSOVER)}
CUDA_GRAPH_MAX_M = 128  # launch-bound below this: time from CUDA graphs
BASELINES = ("dense", "dequant_linear", "bnb_matmul_4bit")
#: Kernel-only rows (not layer candidates): each code-table variant of the dequant kernel alone, and
#: the skinny kernel over a CUDA graph of many layers whose weights exceed the L2 (the bandwidth a
#: decode step sees; a single 8 MB GEMV is near launch overhead). ``gbps`` there counts bytes read.
KERNEL_ONLY = ("dequant_only_shfl", "dequant_only_gather", "skinny_many_layers")
#: Rows that time a kernel outside dispatch: the single-pass fused kernel (``kernels.experimental``).
EXPERIMENTAL = ("fused",)
MANY_LAYERS_BYTES = 256 * 2**20  # > the H200's 60 MB L2 several times over
KERNEL_ONLY_MAX_M = 16  # the kernel-only rows: decode-size points only
FIELDS = META_FIELDS + ["dtype", "K", "N", "r", "M", "op", "method", "config",
                        "rel_err", "ms", "timer", "tflops", "gbps",
                        "pct_peak_tflops", "pct_peak_gbps", "x_vs_dense", "x_vs_dequant_linear",
                        "x_vs_bnb_matmul_4bit", "dispatch", "fastest_candidate", "note"]


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
    layers: int = 1  # weights of the many-layer row (set by ``many_layers``)

    def flops(self) -> float:
        return 2.0 * self.m * (self.n * self.k + self.k * self.r + self.r * self.n)

    def min_bytes(self) -> float:
        """Bytes an NF4 forward must move: packed W + stats, x, y, A, B, S."""
        itemsize = self.x.element_size()
        weight = self.weight.nbytes - self.weight.code.numel() * 4
        acts = itemsize * (self.m * self.k + self.m * self.n + self.m * self.r)
        return weight + acts + itemsize * self.r * (self.k + self.n)


def plan_name(name: str | None = None) -> str:
    """``name``, else the plan ``SWEEP_ENV`` names (read at run time), else ``default``; ValueError
    for a name ``PLANS`` lacks."""
    name = name or os.environ.get(SWEEP_ENV, "") or "default"
    if name not in PLANS:
        raise ValueError(f"the forward plan must be one of {sorted(PLANS)} (--plan or {SWEEP_ENV}), got {name!r}")
    return name


def plan_for(quick: bool, name: str | None = None) -> dict:
    """The plan ``plan_name(name)`` picks (``quick``: its tiny smoke-run twin)."""
    return PLANS[plan_name(name)][1 if quick else 0]


def run(device: torch.device, meta: dict, quick: bool, budget_s: float, plan: str | None = None,
        on_rows: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """All rows of the forward table for the plan named ``plan`` (``plan_name``); points past
    ``budget_s`` seconds are skipped and named. ``on_rows`` receives each point's rows as soon as
    they are measured (the CSV and the dispatch table grow with them)."""
    chosen = plan_for(quick, plan)
    # r=16 first (a spent budget cuts r=64 rows), then M ascending over every shape: small M is where
    # the candidates differ most, and a cut budget then drops the largest M, not a whole shape
    points = itertools.product(chosen["ranks"], chosen["ms"], chosen["shapes"])
    rows = []
    for r, m, (k, n) in within_budget(points, budget_s, "forward"):
        problem = make_problem(m, n, k, r, chosen["dtype"], device)
        point_rows = bench_problem(problem, meta, device, quick)
        if chosen.get("dx"):
            point_rows.extend(bench_dx(problem, meta, device, quick))
        rows.extend(point_rows)
        if on_rows is not None:
            on_rows(point_rows)
        del problem
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def make_problem(m: int, n: int, k: int, r: int, dtype: torch.dtype, device: torch.device) -> Problem:
    from ..format import NF4Weight

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


def _kernel_problem(p: Problem) -> candidates.Problem:
    return candidates.Problem(p.x.device, p.m, p.n, p.k, p.r, p.x.dtype, False, p.weight.blocksize)


def methods_for(p: Problem) -> dict[str, Callable[[], object]]:
    """Every method to time for ``p``: name -> zero-argument callable."""
    import torch.nn.functional as F

    fns = {"dense": lambda: peft_lora(F.linear(p.x, p.dense), p)}
    dequant = lambda: candidates.dequantize_kernel(p.weight, p.x.dtype)  # noqa: E731  (without bitsandbytes)
    quantized = _bnb_quantized(p)
    if quantized is not None:
        bnb, (packed, state) = quantized
        dequant = lambda: bnb.functional.dequantize_4bit(packed, state)  # noqa: E731
        fns["bnb_matmul_4bit"] = lambda: peft_lora(bnb.matmul_4bit(p.x, packed.t(), quant_state=state), p)
    fns["dequant_linear"] = lambda: peft_lora(F.linear(p.x, dequant()), p)
    problem = _kernel_problem(p)
    for name, candidate in candidates.FORWARD.items():
        if name == "torch" or not candidate.supports(problem):
            continue
        variants = skinny_configs(p.x.device) if name == "skinny" else NATIVE_ROWS if name == "native" else {name: None}
        for row, config in variants.items():
            fns[row] = (lambda name=name, config=config: candidates.run_forward(
                name, p.x, p.weight, p.lora_a, p.lora_b, p.scale, config=config))
    fns.update(experimental_methods(p))
    if p.m <= KERNEL_ONLY_MAX_M:
        for table in ("shfl", "gather") if p.x.is_cuda else ("gather",):  # shfl is inline PTX: GPU only
            fns[f"dequant_only_{table}"] = lambda table=table: candidates.dequantize_kernel(p.weight, p.x.dtype, table)
        if candidates.FORWARD["skinny"].supports(problem):
            fns["skinny_many_layers"] = many_layers(p, "skinny")
    return fns


def experimental_methods(p: Problem) -> dict[str, Callable[[], object]]:
    """The experimental fused kernel's row where it can run (``kernels.experimental.fused``)."""
    if candidates.kernels_refuse(_kernel_problem(p)) is not None or p.r > configs.max_rank("fused"):
        return {}
    return {"fused": lambda: candidates.run_experimental_fused(p.x, p.weight, p.lora_a, p.lora_b, p.scale)}


#: ``native`` is the dispatch candidate (shared-memory code table, the library's per-shape plan);
#: ``native_register`` the same kernels with the code table in registers (a variant, not a candidate).
NATIVE_ROWS = {"native": None, "native_register": {"table": "register"}}


def print_native_ratios(p: Problem, timings: dict[str, float]) -> None:
    """One line per point: each native row's speed-up over the Triton skinny kernel (and dense)."""
    for name in NATIVE_ROWS:
        if name in timings and "skinny" in timings:
            dense = f", {timings['dense'] / timings[name]:.2f}x dense" if "dense" in timings else ""
            print(f"K={p.k} N={p.n} r={p.r} M={p.m} {name}: {timings[name]:.4g} ms, "
                  f"{timings['skinny'] / timings[name]:.2f}x the Triton skinny kernel{dense}")


def skinny_configs(device: torch.device) -> dict[str, dict | None]:
    """The skinny kernel's configs timed at each point, by row name: ``skinny`` its default (None),
    and on a GPU ``skinny#i`` for every benchmark config of ``ops/kernel_configs.json``, so the dispatch
    table can keep the fastest."""
    others = configs.skinny_bench_configs() if device.type == "cuda" else ()
    return {"skinny": None, **{f"skinny#{i}": dict(config) for i, config in enumerate(others, 1)}}


def method_and_config(name: str, device: torch.device) -> tuple[str, str]:
    """``(candidate, config JSON or "")`` of a row name (``skinny#2`` -> ``skinny`` and its config)."""
    import json

    method = name.split("#")[0]
    config = (skinny_configs(device).get(name) if method == "skinny" else
              NATIVE_ROWS.get(name) if method.startswith("native") else None)
    return method, json.dumps(config, sort_keys=True) if config else ""


def many_layers(p: Problem, method: str) -> Callable[[], object]:
    """One call runs ``method`` on ``layers`` distinct copies of the weight back to back, enough
    of them to exceed the L2 (``MANY_LAYERS_BYTES``); returns the first layer's output."""
    layers = max(1, MANY_LAYERS_BYTES // p.weight.nbytes) if p.x.is_cuda else 2  # 2: the interpreter's smoke run
    weights = [p.weight] + [replace_packed(p.weight) for _ in range(layers - 1)]
    p.layers = layers

    def run():
        outs = [candidates.run_forward(method, p.x, w, p.lora_a, p.lora_b, p.scale) for w in weights]
        return outs[0]
    return run


def replace_packed(weight):
    """A copy of ``weight`` with its own packed bytes (same values, another address)."""
    import dataclasses

    return dataclasses.replace(weight, packed=weight.packed.clone())


def _bnb_quantized(p: Problem):
    bnb = import_bitsandbytes()
    if bnb is None:
        return None
    try:
        return bnb, bnb.functional.quantize_4bit(p.dense, blocksize=64, compress_statistics=True, quant_type="nf4")
    except Exception as err:  # no kernels for this device in this build
        print(f"bitsandbytes unusable here ({err}); skipping its rows", file=sys.stderr)
        return None


def reference_output(p: Problem) -> torch.Tensor:
    """``y`` in fp32 from the dequantized weight: every method's output is checked against it."""
    x, a, b = p.x.float(), p.lora_a.float(), p.lora_b.float()
    return x @ p.dense.float().t() + p.scale * (x @ a.t()) @ b.t()


def output_error(out, expected: torch.Tensor) -> float:
    """Relative error of a method's ``y`` (methods return ``y`` or ``(y, S)``)."""
    from ..testing import relative_error

    return relative_error(out[0] if isinstance(out, tuple) else out, expected)


def bench_problem(p: Problem, meta: dict, device: torch.device, quick: bool) -> list[dict]:
    expected = reference_output(p)
    timings, timers, errors = _time_methods(p, methods_for(p), expected, device, quick)
    ranked = {name: t for name, t in timings.items() if method_and_config(name, device)[0] in candidates.FORWARD}
    fastest = min(ranked, key=ranked.get) if ranked else ""
    print_native_ratios(p, timings)
    chosen = dispatch.choose("forward", _kernel_problem(p))[0].name
    peak_tflops, peak_gbps = float(meta["peak_matmul_tflops"]), float(meta["peak_copy_gbps"])
    rows = []
    for name, ms in timings.items():
        ratio = lambda base: f"{timings[base] / ms:.4g}" if base in timings else ""  # noqa: E731
        tflops, gbps = p.flops() / ms / 1e9, p.min_bytes() / ms / 1e6
        if name in KERNEL_ONLY:  # bytes read by the kernel alone: packed W + stats (dequant also writes W)
            weight_bytes = p.weight.nbytes
            if name == "skinny_many_layers":
                ms, gbps = ms / p.layers, weight_bytes / (ms / p.layers) / 1e6
            else:
                gbps = (weight_bytes + p.n * p.k * p.x.element_size()) / ms / 1e6  # reads W, writes dense W
        method, config = method_and_config(name, device)
        rows.append({**meta, "dtype": str(p.x.dtype).removeprefix("torch."), "K": p.k, "N": p.n, "r": p.r,
                     "M": p.m, "op": "forward", "method": method, "config": config,
                     "rel_err": f"{errors[name]:.2e}", "ms": f"{ms:.4g}",
                     "timer": timers[name], "tflops": f"{tflops:.4g}", "gbps": f"{gbps:.4g}",
                     "pct_peak_tflops": f"{100 * tflops / peak_tflops:.3g}",
                     "pct_peak_gbps": f"{100 * gbps / peak_gbps:.3g}", "x_vs_dense": ratio("dense"),
                     "x_vs_dequant_linear": ratio("dequant_linear"), "x_vs_bnb_matmul_4bit": ratio("bnb_matmul_4bit"),
                     "dispatch": chosen, "fastest_candidate": int(name == fastest),
                     "note": "baseline" if name in BASELINES else "kernel only" if name in KERNEL_ONLY else
                     "experimental" if name in EXPERIMENTAL else ""})
    return rows


def _time_methods(p: Problem, fns: dict[str, Callable[[], object]], expected: torch.Tensor, device: torch.device,
                  quick: bool) -> tuple[dict, dict, dict]:
    """``(ms, timer, relative error)`` by method name; a method that raises is named on stderr and left out."""
    timings, timers, errors = {}, {}, {}
    for name, fn in fns.items():
        try:
            out = fn()
            errors[name] = float("nan") if name.startswith("dequant_only") else output_error(out, expected)
            timings[name], timers[name] = time_ms(fn, device, use_cuda_graph=p.m <= CUDA_GRAPH_MAX_M, quick=quick)
        except Exception as err:  # one broken candidate must not hide the others' numbers
            print(f"K={p.k} N={p.n} r={p.r} M={p.m} {name}: failed ({type(err).__name__}: {err})", file=sys.stderr)
    return timings, timers, errors


# ---------------------------------------------------------------------- dx (the crossover sweep)
def dx_methods(p: Problem, dy: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """Every dx candidate of ``ops.candidates.DX`` that supports ``p``, by name: ``dx = dy @ dequant(W) +
    s * (dy @ B) @ A`` (``G = dy @ B`` included)."""
    problem = _kernel_problem(p)
    return {name: (lambda name=name: candidates.run_dx(name, dy, p.x, p.weight, p.lora_a, p.lora_b, p.scale))
            for name, candidate in candidates.DX.items() if candidate.supports(problem)}


def bench_dx(p: Problem, meta: dict, device: torch.device, quick: bool) -> list[dict]:
    """Rows of ``op = dx`` for ``p``, method ``dx:<candidate>`` (its own column in the printed table):
    each dx candidate's error against an fp32 ``dx`` on the same dequantized weight, its median time
    and, in ``x_vs_dequant_linear``, its speed-up over the ``dequant`` dx (dequantize + cuBLAS)."""
    gen = torch.Generator(device=device).manual_seed(1)
    dy = torch.randn(p.m, p.n, generator=gen, device=device, dtype=torch.float32).to(p.x.dtype)
    expected = dy.float() @ p.dense.float() + p.scale * ((dy.float() @ p.lora_b.float()) @ p.lora_a.float())
    timings, timers, errors = _time_methods(p, dx_methods(p, dy), expected, device, quick)
    fastest = min(timings, key=timings.get) if timings else ""
    chosen = f"dx:{dispatch.choose('dx', _kernel_problem(p))[0].name}"
    peak_tflops, peak_gbps = float(meta["peak_matmul_tflops"]), float(meta["peak_copy_gbps"])
    rows = []
    for name, ms in timings.items():
        tflops, gbps = 2.0 * p.m * (p.n * p.k + p.r * p.k) / ms / 1e9, p.min_bytes() / ms / 1e6
        rows.append({**meta, "dtype": str(p.x.dtype).removeprefix("torch."), "K": p.k, "N": p.n, "r": p.r,
                     "M": p.m, "op": "dx", "method": f"dx:{name}", "config": "", "rel_err": f"{errors[name]:.2e}",
                     "ms": f"{ms:.4g}", "timer": timers[name], "tflops": f"{tflops:.4g}", "gbps": f"{gbps:.4g}",
                     "pct_peak_tflops": f"{100 * tflops / peak_tflops:.3g}",
                     "pct_peak_gbps": f"{100 * gbps / peak_gbps:.3g}", "x_vs_dense": "",
                     "x_vs_dequant_linear": f"{timings['dequant'] / ms:.4g}" if "dequant" in timings else "",
                     "x_vs_bnb_matmul_4bit": "", "dispatch": chosen, "fastest_candidate": int(name == fastest),
                     "note": ""})
    return rows


def speedups(rows: list[dict]) -> list[Speedup]:
    """Plot points: the dispatched method's speed-up over each baseline, per shape and rank."""
    points, seen = [], set()
    for row in rows:
        key = (row["K"], row["N"], row["r"], row["M"])
        # forward rows only; the first (default-config) row of the dispatched candidate
        if row.get("op", "forward") != "forward" or row["method"] != row["dispatch"] or key in seen:
            continue
        seen.add(key)
        for base in BASELINES:
            if row[f"x_vs_{base}"]:
                points.append(Speedup(f"K={row['K']} N={row['N']}", f"vs {base}, r={row['r']}", int(row["M"]),
                                      float(row[f"x_vs_{base}"])))
    return points
