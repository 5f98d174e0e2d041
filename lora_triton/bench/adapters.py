"""Adapters table: a mixed batch (each sequence its own adapter) vs the number of distinct adapters in it.

One NF4 layer holds ``resident`` adapters (rank ``r``); a batch of ``B`` sequences of ``T`` tokens
uses ``distinct`` of them (sequence ``i`` takes adapter ``i % distinct``: an unsorted mix). Timed
side by side in one run, medians after warm-up:

``ours_mixed``       ``LoRALinear4bit(x, adapter_names=...)``: the base product once, then the
                     gathered LoRA term (``ops.multi_lora_add``)
``ours_single``      the same batch with one adapter for every row (the cost mixing must approach)
``ours_subbatches``  one call per adapter on its rows (``set_adapter`` + the fused layer), scattered
``peft_mixed``       PEFT's LoRA layer on a bitsandbytes ``Linear4bit`` with ``adapter_names``
                     (its loop over sub-batches); needs bitsandbytes and PEFT
``peft_single``      PEFT's layer with its one active adapter for every row

Passes: ``fwd`` (serving, ``no_grad``, eval) and ``fwd+bwd`` (several adapters trained in one pass:
every adapter trainable, ``dx`` too). Ratios: ``x_vs_peft_mixed`` = PEFT mixed ms / ours ms,
``x_vs_ours_single`` = ours single ms / ours mixed ms (the throughput fraction kept when mixing).
Targets: GPU, 16 distinct adapters: ``ours_mixed`` >= 0.8x ``ours_single`` and >= 4x
``peft_mixed``; CPU: ``ours_mixed`` not slower than ``peft_mixed`` at any count.
"""

from __future__ import annotations

import itertools
import sys
import warnings

import torch

from .contenders import _bnb_linear4bit
from .environment import META_FIELDS, import_bitsandbytes
from .report import Speedup, plot_speedups
from .timing import cpu_ms_interleaved, time_ms, within_budget

FULL_GPU = dict(shape=(4096, 4096), r=16, resident=64, batches=[(64, 1), (64, 16), (64, 128)],
                distinct=(1, 4, 16, 64), dtype=torch.bfloat16)
FULL_CPU = dict(shape=(1024, 1024), r=16, resident=64, batches=[(64, 1), (64, 8)], distinct=(1, 4, 16, 64),
                dtype=torch.float32)
QUICK = dict(shape=(128, 256), r=4, resident=8, batches=[(8, 1), (4, 4)], distinct=(1, 4), dtype=torch.float32)
PASSES = ("fwd", "fwd+bwd")
IMPLS = ("ours_mixed", "ours_single", "ours_subbatches", "peft_mixed", "peft_single")
FIELDS = META_FIELDS + ["pass", "dtype", "K", "N", "r", "resident", "B", "T", "M", "distinct", "impl", "ms", "timer",
                        "tokens_per_s", "x_vs_peft_mixed", "x_vs_ours_single", "rel_err_vs_peft", "note"]
PLOT_TITLE = "mixed-adapter batches"


def adapter_name(i: int) -> str:
    return f"task{i}"


def build_layers(n: int, k: int, r: int, resident: int, dtype: torch.dtype, device: torch.device, backend: str):
    """``(ours, peft_layer or None)``: one NF4 weight (bitsandbytes' bytes when it is installed),
    ``resident`` adapters with the same random weights in both."""
    from ..modules import LoRALinear4bit
    from ..format import NF4Weight

    gen = torch.Generator().manual_seed(0)
    dense = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype)
    bnb = import_bitsandbytes()
    try:
        import peft
    except ImportError:
        peft = None
    bnb_layer = _bnb_linear4bit(bnb, dense, device) if bnb is not None and peft is not None else None
    if bnb_layer is not None:
        bnb_layer.support_avx512bf16_for_cpu = False  # keep bitsandbytes' bytes the NF4 format we share
    kwargs = dict(r=r, lora_alpha=2.0 * r, init_lora_weights=False, adapter_name=adapter_name(0), backend=backend)
    if bnb_layer is not None:
        ours = LoRALinear4bit.from_bnb(bnb_layer, **kwargs)
    else:
        ours = LoRALinear4bit.from_nf4(NF4Weight.quantize(dense.to(device), 64, True), None, **kwargs)
    for i in range(1, resident):
        ours.add_adapter(adapter_name(i), r=r, lora_alpha=2.0 * r, init_lora_weights=False)
    ours.set_adapter(adapter_name(0))
    ours = ours.to(device=device, dtype=dtype).eval()
    if bnb_layer is None:
        return ours, None
    from .contenders import _Wrapper

    wrapped = _Wrapper(bnb_layer)
    with warnings.catch_warnings():  # PEFT warns that a second adapter makes "multiple adapters": it does
        warnings.simplefilter("ignore", UserWarning)
        for i in range(resident):
            config = peft.LoraConfig(r=r, lora_alpha=2.0 * r, target_modules=["proj"], bias="none")
            wrapped = peft.inject_adapter_in_model(config, wrapped, adapter_name=adapter_name(i))
    theirs = wrapped.proj
    theirs.set_adapter(adapter_name(0))
    for i in range(resident):
        name = adapter_name(i)
        for table, source in ((theirs.lora_A, ours.lora_A), (theirs.lora_B, ours.lora_B)):
            table[name].to(device=device, dtype=dtype)
            with torch.no_grad():
                table[name].weight.copy_(source[name].weight)
    return ours, theirs.eval()


def _sub_batches(ours, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """One fused call per adapter on its rows, scattered back (the loop a user writes by hand)."""
    out = x.new_empty(*x.shape[:-1], ours.out_features)
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        ours.set_adapter(name)
        out[rows] = ours(x[rows])
    return out


def _impls(ours, theirs, x: torch.Tensor, names: list[str]):
    """``{impl: zero-argument callable}`` for one point (``x`` may require grad: then each call
    also runs the backward of a fixed upstream gradient)."""
    fns = {"ours_mixed": lambda: ours(x, adapter_names=names),
           "ours_single": lambda: ours(x),
           "ours_subbatches": lambda: _sub_batches(ours, x, names)}
    if theirs is not None:
        fns["peft_mixed"] = lambda: theirs(x, adapter_names=names)
        fns["peft_single"] = lambda: theirs(x)
    if not x.requires_grad:
        return fns
    dy = torch.randn(*x.shape[:-1], ours.out_features, dtype=x.dtype, device=x.device)
    params = [p for module in (ours, theirs) if module is not None for p in module.parameters() if p.requires_grad]

    def with_backward(fn):
        def step():
            for p in (x, *params):
                p.grad = None
            fn().backward(dy)
        return step
    return {name: with_backward(fn) for name, fn in fns.items()}


def _set_training(ours, theirs, training: bool, names: list[str]) -> None:
    ours.train(training)
    ours.set_trainable_adapters(list(ours.lora_A) if training else [])
    if theirs is not None:
        theirs.train(training)
        for table in (theirs.lora_A, theirs.lora_B):
            for module in table.values():
                module.weight.requires_grad_(training)


def _rel_err(ours, theirs, x, names) -> float | str:
    if theirs is None:
        return ""
    with torch.no_grad():
        got, want = ours(x, adapter_names=names).double(), theirs(x, adapter_names=names).double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def run(device: torch.device, meta: dict, quick: bool, budget_s: float, plan: dict | None = None) -> list[dict]:
    """All rows of the adapters table (``plan``: ``QUICK``, else ``FULL_GPU`` / ``FULL_CPU`` by device)."""
    plan = plan or (QUICK if quick else FULL_GPU if device.type == "cuda" else FULL_CPU)
    n, k = plan["shape"]
    dtype = plan["dtype"]
    backend = "triton" if device.type == "cuda" else "torch"
    ours, theirs = build_layers(n, k, plan["r"], plan["resident"], dtype, device, backend)
    if theirs is None:
        print("adapters: bitsandbytes or PEFT missing, the peft_* columns are left out", file=sys.stderr)
    rows = []
    points = [(p, b, t, d) for p, (b, t), d in itertools.product(PASSES, plan["batches"], plan["distinct"])
              if d <= min(b, plan["resident"])]
    for pass_, batch, seq, distinct in within_budget(points, budget_s, "adapters"):
        names = [adapter_name(i % distinct) for i in range(batch)]
        gen = torch.Generator().manual_seed(batch * 1000 + seq)
        x = torch.randn(batch, seq, k, generator=gen).to(device=device, dtype=dtype)
        training = pass_ == "fwd+bwd"
        _set_training(ours, theirs, training, names)
        err = _rel_err(ours, theirs, x, names)
        x.requires_grad_(training)
        fns = _impls(ours, theirs, x, names)
        with torch.enable_grad() if training else torch.no_grad():
            if device.type == "cuda":
                times = {name: time_ms(fn, device)[0] for name, fn in fns.items()}
                timer = "do_bench"
            elif quick:
                times = cpu_ms_interleaved(fns, warmup=1, min_rounds=2, max_rounds=3, min_time_s=0.0)
                timer = "cpu_wall_interleaved"
            else:
                times = cpu_ms_interleaved(fns)
                timer = "cpu_wall_interleaved"
        ours.set_adapter(adapter_name(0))
        for impl, ms in times.items():
            rows.append({**meta, "pass": pass_, "dtype": str(dtype).replace("torch.", ""), "K": k, "N": n,
                         "r": plan["r"], "resident": plan["resident"], "B": batch, "T": seq, "M": batch * seq,
                         "distinct": distinct, "impl": impl, "ms": round(ms, 4), "timer": timer,
                         "tokens_per_s": round(batch * seq / ms * 1e3, 1),
                         "x_vs_peft_mixed": round(times["peft_mixed"] / ms, 3) if "peft_mixed" in times else "",
                         "x_vs_ours_single": round(times["ours_single"] / ms, 3) if impl == "ours_mixed" else "",
                         "rel_err_vs_peft": err if impl == "ours_mixed" else "",
                         "note": f"backend={backend}" if impl.startswith("ours") else "bitsandbytes + peft"})
    return rows


def speedups(rows: list[dict]) -> list[Speedup]:
    """Plot points: ours mixed over PEFT mixed, over the sub-batch loop, and the fraction of the
    single-adapter batch's throughput kept, vs the number of distinct adapters."""
    by_point: dict[tuple, dict[str, float]] = {}
    for row in rows:
        by_point.setdefault((row["pass"], row["B"], row["T"], row["distinct"]), {})[row["impl"]] = row["ms"]
    points = []
    for (pass_, batch, seq, distinct), ms in by_point.items():
        panel = f"{pass_}, B={batch} x T={seq}"
        for other, label in (("peft_mixed", "ours mixed vs PEFT mixed"),
                             ("ours_subbatches", "ours mixed vs one call per adapter"),
                             ("ours_single", "ours mixed vs a single-adapter batch")):
            if other in ms and "ours_mixed" in ms:
                points.append(Speedup(panel, label, distinct, ms[other] / ms["ours_mixed"]))
    return points


def plot(rows: list[dict], path: str, title: str) -> str | None:
    """The ``speedups`` vs the number of distinct adapters, one panel per pass and batch shape."""
    return plot_speedups(speedups(rows), path, title, xlabel="distinct adapters in the batch")


def print_summary(rows: list[dict]) -> None:
    """One line per point: ours mixed ms, tokens/s and its ratios."""
    mixed = [row for row in rows if row["impl"] == "ours_mixed"]
    if not mixed:
        print("adapters: no rows")
        return
    print(f"\nadapters table ({mixed[0]['device']}): x = other ms / ours mixed ms (> 1: ours mixed is faster)")
    print(f"{'pass':>8} {'B':>4} {'T':>4} {'distinct':>8} {'ours ms':>9} {'tok/s':>10} {'x PEFT mixed':>13} "
          f"{'x single':>9}")
    for row in mixed:
        print(f"{row['pass']:>8} {row['B']:>4} {row['T']:>4} {row['distinct']:>8} {row['ms']:>9} "
              f"{row['tokens_per_s']:>10} {str(row['x_vs_peft_mixed']):>13} {str(row['x_vs_ours_single']):>9}")
