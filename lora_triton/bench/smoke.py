"""Correctness smoke test of what production launches, against the float64 reference.

The first stage of the GPU check (``bench/gpu_check.sh``): one shape per kernel, each check a CSV
row written as soon as it finishes, so a run stopped by its budget keeps the rows done. On a GPU
the checks run there; without one (the dry run) through Triton's interpreter at toy sizes.

The rule is flash-attention's: plain torch at the kernel's dtype is the yardstick. For every output
``o`` of a check, ``error = ||o - o64|| / ||o64||`` against the float64 reference
(``lora_triton.reference``), ``torch_error`` the same for plain torch at the kernel's dtype on the
same (rounded) inputs, and the check passes when ``error <= TORCH_FACTOR * torch_error + TORCH_SLACK``
(``lora_triton.testing``) for every
output; the row shows the output nearest its bound. The dequant kernel must match
``NF4Weight.dequantize`` bit for bit; the dropout mask has no torch twin: its values, its kept
fraction (within 5 binomial standard deviations of ``1 - p``) and its dependence on the seed are
checked instead.

Checks, in order of value (``checks``): the default forward (dequantize + cuBLAS) without and with
dropout (the ``S`` kernel: ranks 16 and 128, bf16, fp16, fp32), the dropout mask, the dequant kernel
per dtype and code table, the backward per ``dx`` method, the layer through the dispatcher with
autograd, the mixed-adapter batch with autograd, then one shape per other forward candidate and the experimental fused kernel. The
native kernels (``--part native``) are checked when their library is built.

    python -m lora_triton.bench.smoke --csv smoke.csv [--environment env.txt] [--toy] [--part native]

Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from .report import CsvRows

FIELDS = ["device", "check", "shape", "dtype", "error", "torch_error", "bound", "ok", "seconds", "note"]
SEED = 1234  # dropout seed of every check: the mask kernel regenerates the kernels' mask from it
DROPOUT_P = 0.1


@dataclass(frozen=True)
class Sizes:
    """The shapes of the checks: ``x [m, k]``, ``W [n, k]``, rank ``r`` (``wide_r``: the S kernel's
    widest rank tile), the dropout mask's ``[mask_m, mask_k]``, adapters in the mixed batch."""

    m: int
    n: int
    k: int
    r: int
    wide_r: int
    mask_m: int
    mask_k: int
    adapters: int


#: On a GPU: Llama's K, an N and an M that leave partial tiles, the rank the dispatch table is measured at.
GPU_SIZES = Sizes(m=37, n=1100, k=4096, r=16, wide_r=128, mask_m=1024, mask_k=4096, adapters=4)
#: Through the interpreter (about 1.6 ms per program and K step): toy sizes, the same partial tiles.
TOY_SIZES = Sizes(m=5, n=72, k=128, r=8, wide_r=128, mask_m=64, mask_k=256, adapters=3)


@dataclass(frozen=True)
class Outcome:
    """What one check found: the worst output's error, plain torch's, the bound, pass or fail."""

    error: float
    torch_error: float
    bound: float
    ok: bool
    note: str = ""


@dataclass(frozen=True)
class Check:
    """A named check of one kernel at one shape and dtype; ``run()`` computes its ``Outcome``."""

    name: str
    shape: str
    dtype: torch.dtype
    run: Callable[[], Outcome]


# ----------------------------------------------------------------------------- comparing
def compare(got: dict[str, torch.Tensor], plain: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
            note: str = "") -> Outcome:
    """Each output of ``got`` (kernel) against ``ref`` (float64), bounded by ``plain`` (torch at the
    kernel's dtype) as the module docstring says; the row reports the output nearest its bound."""
    from ..testing import relative_error, torch_error_bound

    measured, fails = [], []
    for name, out in got.items():
        finite = bool(torch.isfinite(out).all())
        same_shape = out.shape == ref[name].shape
        error = relative_error(out, ref[name]) if finite and same_shape else float("inf")
        torch_error, bound = torch_error_bound(plain[name], ref[name])
        if not same_shape:
            fails.append(f"{name}: shape {list(out.shape)}, expected {list(ref[name].shape)}")
        elif not error <= bound:
            fails.append(f"{name}: {error:.2e} > {bound:.2e}" + ("" if finite else " (non-finite values)"))
        measured.append((error / bound, name, error, torch_error, bound))
    _, name, error, torch_error, bound = max(measured)
    notes = [f"worst output {name} of {', '.join(got)}"] + fails + ([note] if note else [])
    return Outcome(error, torch_error, bound, not fails, "; ".join(notes))


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float64)


def _problem(sizes: Sizes, dtype: torch.dtype, device: torch.device, m: int | None = None, r: int | None = None,
             seed: int = 0) -> dict:
    from ..testing import random_lora_problem

    return random_lora_problem(m or sizes.m, sizes.n, sizes.k, r or sizes.r, dtype, 64, True, True, device, seed)


def _mask(p: float, m: int, k: int, device: torch.device) -> torch.Tensor | None:
    from ..ops.dropout import dropout_mask

    return dropout_mask(SEED, p, m, k, device) if p > 0 else None


def _forward_refs(p: dict, mask: torch.Tensor | None) -> tuple[dict, dict]:
    """``(plain torch at x's dtype, float64)`` of ``{"y", "S"}`` for problem ``p``."""
    from ..reference import lora_forward

    plain = lora_forward(p["x"], p["weight"], p["lora_a"], p["lora_b"], p["scale"], p["bias"], mask)
    ref = lora_forward(_f64(p["x"]), p["weight"], _f64(p["lora_a"]), _f64(p["lora_b"]), p["scale"], _f64(p["bias"]),
                       mask)
    return dict(zip(("y", "S"), plain)), dict(zip(("y", "S"), ref))


def shape_label(m: int, n: int, k: int, r: int) -> str:
    """``MxNxK rR``: the row label of a problem ``x [M, K]``, ``W [N, K]``, rank ``r``."""
    return f"{m}x{n}x{k} r{r}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- the checks
def forward_check(p: dict, method: str, dropout_p: float = 0.0) -> Outcome:
    """The forward candidate ``method``'s ``(y, S)`` for problem ``p`` (its default config), dropout from
    ``SEED``; ``method`` ``"fused"``: the experimental single-pass kernel (no dropout)."""
    from ..ops import candidates

    x = p["x"]
    mask = _mask(dropout_p, *x.shape, x.device)
    if method == "fused":
        y, s = candidates.run_experimental_fused(x, p["weight"], p["lora_a"], p["lora_b"], p["scale"], p["bias"])
    else:
        y, s = candidates.run_forward(method, x, p["weight"], p["lora_a"], p["lora_b"], p["scale"], p["bias"],
                                      dropout_p, SEED)
    plain, ref = _forward_refs(p, mask)
    return compare({"y": y, "S": s}, plain, ref)


def native_check(p: dict) -> Outcome:
    """The native kernels' ``(y, S)`` for problem ``p`` (no dropout: they have none)."""
    from ..ops import candidates

    y, s = candidates.run_forward("native", p["x"], p["weight"], p["lora_a"], p["lora_b"], p["scale"], p["bias"])
    plain, ref = _forward_refs(p, None)
    return compare({"y": y, "S": s}, plain, ref)


GRADS = ("dx", "dA", "dB", "dbias")


def _layer_refs(p: dict, dy: torch.Tensor, mask: torch.Tensor | None) -> tuple[dict, dict]:
    """``(plain torch at x's dtype, float64)`` of ``{"y", "S", "dx", "dA", "dB", "dbias"}``: each
    backward reads its own forward's ``S``."""
    from ..reference import lora_backward

    plain, ref = _forward_refs(p, mask)
    grads = lora_backward(dy, p["x"], p["weight"], p["lora_a"], p["lora_b"], p["scale"], plain["S"], mask)
    grads64 = lora_backward(_f64(dy), _f64(p["x"]), p["weight"], _f64(p["lora_a"]), _f64(p["lora_b"]), p["scale"],
                            ref["S"], mask)
    return ({**plain, **{n: getattr(grads, n) for n in GRADS}}, {**ref, **{n: getattr(grads64, n) for n in GRADS}})


def _output_grad(p: dict, seed: int = 7) -> torch.Tensor:
    x = p["x"]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape[0], p["weight"].shape[0], generator=gen).to(x.dtype).to(x.device)


def backward_check(p: dict, dx_method: str, dropout_p: float) -> Outcome:
    """The four gradients: ``dx`` from the dx candidate ``dx_method``, the rest from the layer's backward,
    ``S`` from the default forward."""
    from ..ops import candidates
    from ..ops.dropout import as_seed
    from ..ops.lora_nf4 import layer_backward

    x, dy = p["x"], _output_grad(p)
    mask = _mask(dropout_p, *x.shape, x.device)
    args = (x, p["weight"], p["lora_a"], p["lora_b"], p["scale"])
    _, s = candidates.run_forward("dequant", *args, p["bias"], dropout_p, SEED)
    seed = as_seed(SEED, x.device) if dropout_p > 0 else None
    op = candidates.Operands(*args[:4], p["bias"], args[4], dropout_p, seed)
    grads = layer_backward(op, dy, s, "triton", (False, True, True, True))
    got = {"dx": candidates.run_dx(dx_method, dy, *args, dropout_p, SEED), "dA": grads.dA, "dB": grads.dB,
           "dbias": grads.dbias}
    plain, ref = _layer_refs(p, dy, mask)
    return compare(got, plain, ref)


def layer_check(p: dict) -> Outcome:
    """``ops.lora_nf4_linear`` with autograd, as a model runs it: the dispatcher picks forward and dx."""
    from ..ops import candidates, dispatch
    from ..ops.lora_nf4 import lora_nf4_linear

    x, dy = p["x"], _output_grad(p)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, p["lora_a"], p["lora_b"], p["bias"])]
    y = lora_nf4_linear(leaves[0], p["weight"], leaves[1], leaves[2], p["scale"], leaves[3], backend="triton")
    grads = torch.autograd.grad(y, leaves, dy)
    plain, ref = _layer_refs(p, dy, None)
    m, (n, k), r = x.shape[0], p["weight"].shape, p["lora_a"].shape[0]
    problem = candidates.Problem(x.device, m, n, k, r, x.dtype)
    chosen = (f"dispatched: forward {dispatch.choose('forward', problem)[0].name}, "
              f"dx {dispatch.choose('dx', problem)[0].name}")
    return compare({"y": y, **dict(zip(GRADS, grads))}, plain, ref, chosen)


def mixed_batch_check(sizes: Sizes, dtype: torch.dtype, device: torch.device) -> Outcome:
    """``ops.multi_lora.multi_lora_add`` (the mixed-batch kernels) with autograd: each row its own
    adapter or none (-1)."""
    from ..ops.multi_lora import multi_lora_add

    gen = torch.Generator().manual_seed(3)
    m, n, k, r, count = sizes.m, sizes.n, sizes.k, sizes.r, sizes.adapters
    inputs = {"base": torch.randn(m, n, generator=gen), "x": torch.randn(m, k, generator=gen),
              "bank_a": torch.randn(count, r, k, generator=gen) * k ** -0.5,
              "bank_b": torch.randn(count, n, r, generator=gen) * r ** -0.5}
    scales = (0.5 + torch.arange(count, dtype=torch.float32)).to(device)
    ids = (torch.arange(m) % (count + 1) - 1).to(device)  # every adapter and rows with none
    dy = torch.randn(m, n, generator=gen)
    rounded = {name: t.to(dtype) for name, t in inputs.items()}  # every path starts from the same values

    def run(backend: str, as_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        leaves = {name: t.to(device=device, dtype=as_dtype).requires_grad_(True) for name, t in rounded.items()}
        y = multi_lora_add(leaves["base"], leaves["x"], leaves["bank_a"], leaves["bank_b"], scales, ids,
                           backend=backend)
        grads = torch.autograd.grad(y, list(leaves.values()), dy.to(device=device, dtype=as_dtype))
        return {"y": y, **{f"d_{name}": g for name, g in zip(leaves, grads)}}

    return compare(run("triton", dtype), run("torch", dtype), run("torch", torch.float64))


def dropout_mask_check(sizes: Sizes, device: torch.device) -> Outcome:
    """The dropout mask (the uniform kernel on a GPU): entries 0 or ``1/(1-p)``, the kept fraction near
    ``1 - p``, the same mask for the same seed and another for another seed. ``error``: |kept fraction -
    (1 - p)|."""
    from ..ops.dropout import dropout_mask

    m, k, p = sizes.mask_m, sizes.mask_k, DROPOUT_P
    mask = dropout_mask(SEED, p, m, k, device)
    kept = mask != 0
    fraction = float(kept.double().mean())
    error, bound = abs(fraction - (1 - p)), 5 * (p * (1 - p) / mask.numel()) ** 0.5
    fails = []
    if not torch.equal(mask[kept], torch.full_like(mask[kept], 1 / (1 - p))):
        fails.append("kept entries are not 1/(1-p)")
    if not error <= bound:
        fails.append(f"kept fraction {fraction:.4f}, expected {1 - p:.4f}")
    if not torch.equal(dropout_mask(SEED, p, m, k, device), mask):
        fails.append("the same seed gave another mask")
    if torch.equal(dropout_mask(SEED + 1, p, m, k, device), mask):
        fails.append("another seed gave the same mask")
    return Outcome(error, float("nan"), bound, not fails, "; ".join(fails) or f"kept fraction {fraction:.4f}")


def dequant_check(sizes: Sizes, dtype: torch.dtype, table: str, device: torch.device) -> Outcome:
    """The dequant kernel with code table ``table`` against ``NF4Weight.dequantize``, bit for bit."""
    from ..ops.candidates import dequantize_kernel

    weight = _problem(sizes, dtype, device)["weight"]
    got, expected = dequantize_kernel(weight, dtype, table), weight.dequantize(dtype)
    error = float((got.double() - expected.double()).abs().max())
    same = torch.equal(got, expected)
    return Outcome(error, 0.0, 0.0, same, "bit-exact vs NF4Weight.dequantize" + ("" if same else ": differs"))


def checks(device: torch.device, sizes: Sizes, part: str) -> list[Check]:
    """The checks of ``part`` (``"triton"``: everything but the native kernels; ``"native"``) in
    order of value; each builds its problem when it runs."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    label = lambda m=sizes.m, r=sizes.r: shape_label(m, sizes.n, sizes.k, r)  # noqa: E731
    if part == "native":
        return [Check(f"forward/native M={m}", label(m), bf16,
                      lambda m=m: native_check(_problem(sizes, bf16, device, m=m, seed=m))) for m in (1, 16)]
    from ..kernels.nf4_decode import TABLES
    from ..kernels.runtime import default_table

    def forward(method: str, dtype: torch.dtype, dropout_p: float = 0.0, m: int | None = None,
                r: int | None = None) -> Check:
        name = f"forward/{method}" + (f" dropout={dropout_p}" if dropout_p else "")
        return Check(name, label(m or sizes.m, r or sizes.r), dtype,
                     lambda: forward_check(_problem(sizes, dtype, device, m=m, r=r), method, dropout_p))

    def backward(dx_method: str, dropout_p: float) -> Check:
        name = f"backward/dx={dx_method}" + (f" dropout={dropout_p}" if dropout_p else "")
        return Check(name, label(), bf16, lambda: backward_check(_problem(sizes, bf16, device), dx_method, dropout_p))

    default = default_table(device)
    others = [t for t in TABLES if t != default] if device.type == "cuda" else []  # shfl is inline PTX: GPU only
    return [
        forward("dequant", bf16),
        forward("dequant", bf16, DROPOUT_P),
        Check("dropout_mask", f"{sizes.mask_m}x{sizes.mask_k}", fp32, lambda: dropout_mask_check(sizes, device)),
        *[Check(f"dequant_kernel/{table}", f"{sizes.n}x{sizes.k}", dtype,
                lambda dtype=dtype, table=table: dequant_check(sizes, dtype, table, device))
          for table, dtypes in [(default, (bf16, fp16, fp32))] + [(t, (bf16,)) for t in others] for dtype in dtypes],
        backward("dequant", DROPOUT_P),
        Check("layer/autograd", label(), bf16, lambda: layer_check(_problem(sizes, bf16, device))),
        Check("mixed_batch/autograd", f"{label()} x{sizes.adapters} adapters", bf16,
              lambda: mixed_batch_check(sizes, bf16, device)),
        forward("dequant", bf16, DROPOUT_P, r=sizes.wide_r),
        forward("dequant", fp16, DROPOUT_P),
        forward("dequant", fp32, DROPOUT_P),
        backward("fused", DROPOUT_P),
        backward("merged", 0.0),
        forward("skinny", bf16, m=1),
        forward("skinny", bf16),
        forward("merged", bf16),
        forward("fused", bf16),
    ]


# ----------------------------------------------------------------------------- running
def run_checks(todo: list[Check], device: torch.device, device_name: str, out: CsvRows) -> int:
    """Run ``todo`` in order, one CSV row and one printed line per check as it finishes; a check that
    raises is a failed row naming the error. Returns the number of failed checks."""
    failed = 0
    for check in todo:
        start = time.perf_counter()
        try:
            outcome = check.run()
            if device.type == "cuda":
                torch.cuda.synchronize()  # an asynchronous launch error belongs to this check
        except Exception as err:  # one broken kernel must not hide the others' rows
            where = traceback.extract_tb(err.__traceback__)[-1]
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            outcome = Outcome(float("nan"), float("nan"), float("nan"), False,
                              f"{type(err).__name__}: {message} ({os.path.basename(where.filename)}:{where.lineno})")
        seconds = time.perf_counter() - start
        failed += not outcome.ok
        out.append([{"device": device_name, "check": check.name, "shape": check.shape,
                     "dtype": _dtype_name(check.dtype), "error": f"{outcome.error:.3e}",
                     "torch_error": f"{outcome.torch_error:.3e}", "bound": f"{outcome.bound:.3e}",
                     "ok": int(outcome.ok), "seconds": f"{seconds:.2f}", "note": outcome.note}])
        print(f"{'ok  ' if outcome.ok else 'FAIL'} {check.name:<32} {check.shape:<24} {_dtype_name(check.dtype):<9} "
              f"error {outcome.error:.2e} (torch {outcome.torch_error:.2e}, bound {outcome.bound:.2e}) "
              f"{seconds:6.2f} s  {outcome.note}", flush=True)
    return failed


def environment_lines(device: torch.device) -> list[str]:
    """What ran the checks: versions, the device and its limits, the switches that change kernels."""
    import triton

    from ..kernels import native
    from .environment import device_name, import_bitsandbytes

    bnb = import_bitsandbytes()
    lines = [f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
             f"triton {triton.__version__}, bitsandbytes {getattr(bnb, '__version__', 'absent') if bnb else 'absent'}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smem = getattr(props, "shared_memory_per_block_optin", None)
        lines.append(f"device: {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                     f"{props.total_memory / 2**30:.1f} GiB" + (f", {smem} B shared memory per block" if smem else ""))
    else:
        lines.append(f"device: {device_name(device, interpreted=True)}")
    found = [str(path) for path in native.search_paths() if path.is_file()]
    lines.append(f"native library: {found[0] if found and native.library() else 'absent'}")
    lines.append("switches: " + ", ".join(f"{name}={os.environ.get(name, '')}" for name in
                                          ("LORA_TRITON_AUTOTUNE", "TRITON_INTERPRET", native.ENV_VAR)))
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m lora_triton.bench.smoke``: run the checks, write the CSV; 0 when all passed."""
    parser = argparse.ArgumentParser(prog="python -m lora_triton.bench.smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--csv", required=True, metavar="PATH", help="the rows, one per check as it finishes")
    parser.add_argument("--environment", metavar="PATH", help="also write the environment lines here")
    parser.add_argument("--toy", action="store_true", help="toy sizes (the interpreter's)")
    parser.add_argument("--part", choices=("triton", "native"), default="triton",
                        help="triton: every check but the native kernels' (default); native: those")
    args = parser.parse_args(argv)
    from ..kernels.runtime import interpreting

    if interpreting():
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:  # triton reads the switch when it is imported, so it cannot be turned on from here
        parser.error("no CUDA device: set TRITON_INTERPRET=1 to run the checks through Triton's interpreter")
    lines = environment_lines(device)
    print("\n".join(lines), flush=True)
    if args.environment:
        with open(args.environment, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    from .environment import device_name

    todo = checks(device, TOY_SIZES if args.toy else GPU_SIZES, args.part)
    print(f"{len(todo)} checks: {', '.join(c.name for c in todo)}", flush=True)
    with CsvRows(args.csv, FIELDS) as out:
        failed = run_checks(todo, device, device_name(device, interpreted=device.type == "cpu"), out)
    print(f"{len(todo) - failed} of {len(todo)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
