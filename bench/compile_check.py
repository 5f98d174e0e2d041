"""Ahead-of-time compile check of every Triton kernel, without a GPU.

Compiles each kernel for a CUDA target (default sm_90, the H200) with every autotune config
and the constexpr combinations the launchers produce, the same way ``JITFunction.run`` would
(argument types, 16-byte alignment / ``== 1`` specialization, ``do_not_specialize``), then
prints one row per compile: status, registers, spills and shared memory. Exits 1 when any
compile fails or a kernel needs more shared memory than the target allows per block.

Needs only the triton wheel (it ships ptxas) and torch (CPU is enough)::

    .venv/bin/python bench/compile_check.py                 # sm_90, quick matrix, ~3-5 min on 2 cores
    .venv/bin/python bench/compile_check.py --arch 90,89,80 --level full --jobs 16

``--level quick`` compiles every config x every activation dtype for the heaviest and the
lightest flag combination of each kernel plus a one-flag-at-a-time sweep on the fixed configs;
``--level full`` compiles the complete cross product (thousands of compiles: a big machine).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

# The kernel modules read TRITON_INTERPRET at import (one config, no autotuning); compiling
# needs the GPU code paths, so it must be unset before anything imports them.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 = its default
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: Largest dynamic shared memory a block may opt in to, per compute capability (CUDA guide).
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
DTYPES = ("fp16", "bf16", "fp32")
R_PADS = (16, 32, 64, 128)


# ====================================================================== the matrix
def _cfg_name(c: dict, warps: int, stages: int) -> str:
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K", "GROUP_M": "G", "SPLIT_K": "SK", "BLOCK": "B"}
    return " ".join(f"{short.get(k, k)}{v}" for k, v in c.items()) + f" w{warps} s{stages}"


def _configs(kernel: str) -> list[tuple[str, dict, int, int]]:
    """``(label, block constexprs, num_warps, num_stages)`` of every config a GPU run can use."""
    from lora_triton.kernels import lora_dx, lora_forward as lf

    def from_triton(tag, configs):
        return [(tag, dict(c.kwargs), c.num_warps, c.num_stages) for c in configs]

    def fixed_config(fn):  # the config used with LORA_TRITON_AUTOTUNE=0 (the GPU test run)
        old = os.environ.get("LORA_TRITON_AUTOTUNE")
        os.environ["LORA_TRITON_AUTOTUNE"] = "0"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["LORA_TRITON_AUTOTUNE"]
            else:
                os.environ["LORA_TRITON_AUTOTUNE"] = old

    if kernel == "fused":
        return from_triton("tune", lf._fused_configs()) + from_triton("fixed", fixed_config(lf._fused_configs))
    if kernel == "decode_partial":
        return [(t, {**c, "BLOCK_M": 16}, w, s) for t, c, w, s in
                from_triton("tune", lf._decode_configs()) + from_triton("fixed", fixed_config(lf._decode_configs))]
    if kernel == "dx":
        return from_triton("tune", lora_dx._gpu_configs())
    # Plain @triton.jit kernels launched with Triton's defaults (4 warps, 3 stages).
    if kernel == "lora_s":
        return [("fixed", {"BLOCK_M": lf._S_BLOCK_M, "BLOCK_K": lf._S_BLOCK_K}, 4, 3)]
    if kernel == "decode_epilogue":
        return [("fixed", {"BLOCK_M": 16, "BLOCK_N": lf._EPILOGUE_BLOCK_N}, 4, 3)]
    if kernel == "dequant":
        return [("fixed", {}, 4, 3)]  # BLOCKS_PER_PROGRAM follows BLOCKSIZE: set with the arguments
    if kernel == "dropout_mask":
        return [("fixed", {"BLOCK_M": 16, "BLOCK_K": 64}, 4, 3)]
    raise KeyError(kernel)


#: Flag axes per kernel: name -> (heaviest value, every value). dtype, BLOCKSIZE, DOUBLE_QUANT
#: and R_PAD are shared names; the rest are the kernel's own constexprs.
_AXES = {
    "fused": {"dtype": ("fp32", DTYPES), "BLOCKSIZE": (64, (64, 128)), "DOUBLE_QUANT": (True, (True, False)),
              "SINGLE_PASS": (True, (True, False)), "HAS_BIAS": (True, (True, False)),
              "HAS_DROPOUT": (True, (True, False)), "R_PAD": (128, R_PADS)},
    "decode_partial": {"dtype": ("fp32", DTYPES), "BLOCKSIZE": (64, (64, 128)), "DOUBLE_QUANT": (True, (True, False)),
                       "HAS_DROPOUT": (True, (True, False)), "R_PAD": (128, R_PADS)},
    "dx": {"dtype": ("fp32", DTYPES), "BLOCKSIZE": (64, (64, 128)), "DOUBLE_QUANT": (True, (True, False)),
           "HAS_DROPOUT": (True, (True, False)), "R_PAD": (128, R_PADS), "M": (333, (333, 1))},
    "lora_s": {"dtype": ("fp32", DTYPES), "HAS_DROPOUT": (True, (True, False)), "R_PAD": (128, R_PADS)},
    "decode_epilogue": {"dtype": ("fp32", DTYPES), "HAS_BIAS": (True, (True, False)), "R_PAD": (128, R_PADS),
                        "M": (7, (7, 1))},
    "dequant": {"dtype": ("fp32", DTYPES), "BLOCKSIZE": (64, (64, 128)), "DOUBLE_QUANT": (True, (True, False))},
    "dropout_mask": {"dtype": ("fp32", ("fp32",)), "M": (333, (333, 1))},
}
#: The lightest combination differs from the heaviest in every flag (quick level).
_LIGHT = {"BLOCKSIZE": 128, "DOUBLE_QUANT": False, "SINGLE_PASS": False, "HAS_BIAS": False, "HAS_DROPOUT": False,
          "R_PAD": 16, "M": 1}


def _variants(kernel: str, level: str, fixed: bool) -> list[dict]:
    axes = _AXES[kernel]
    if level == "full":
        names = list(axes)
        return [dict(zip(names, values)) for values in itertools.product(*(axes[n][1] for n in names))]
    heavy = {n: v[0] for n, v in axes.items()}
    out = []
    # fp16 lowers like bf16 (same MMA path): the quick level compiles it on the fixed configs only.
    for dtype in [d for d in axes["dtype"][1] if fixed or d != "fp16" or len(_configs(kernel)) == 1]:
        out.append({**heavy, "dtype": dtype})
        out.append({**heavy, "dtype": dtype, **{n: v for n, v in _LIGHT.items() if n in axes}})
        if kernel == "fused":  # the split path at full rank: S read in the epilogue, no S in the loop
            out.append({**heavy, "dtype": dtype, "SINGLE_PASS": False})
    if fixed:  # one flag at a time from the heaviest, on the config every launch of this kernel may use
        for name, (_, values) in axes.items():
            for value in values:
                for dtype in [d for d in ("bf16", "fp32") if d in axes["dtype"][1]]:
                    out.append({**heavy, "dtype": dtype, name: value})
    unique = []
    for v in out:
        if v not in unique:
            unique.append(v)
    return unique


def build_jobs(kernels: list[str], level: str, archs: list[int]) -> list[tuple]:
    jobs = []
    for kernel in kernels:
        configs = _configs(kernel)
        for label, cfg, warps, stages in configs:
            fixed = label == "fixed" or (kernel == "dx" and (label, cfg, warps, stages) == configs[0])
            for variant in _variants(kernel, level, fixed):
                for arch in archs:
                    jobs.append((kernel, _cfg_name(cfg, warps, stages), cfg, warps, stages, variant, arch))
    return jobs


# ====================================================================== one compile
def _kernel_and_args(kernel: str, v: dict):
    """The JITFunction and a dict of representative argument values (CPU tensors stand in for
    device pointers: only their dtype and alignment matter) for variant ``v``."""
    import torch
    from lora_triton.kernels import dropout, lora_dx, lora_forward as lf

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[v["dtype"]]
    act = lambda: torch.empty(16, dtype=torch_dtype)  # noqa: E731
    f32 = lambda: torch.empty(16, dtype=torch.float32)  # noqa: E731
    u8 = torch.empty(16, dtype=torch.uint8)
    dq = v.get("DOUBLE_QUANT", False)
    # nf4_kernel_args: (packed, code, absmax, nested_absmax, nested_code, offset); without double
    # quant absmax is float32 and the nested pointers alias code.
    weight = dict(packed_ptr=u8, code_ptr=f32(), absmax_ptr=u8 if dq else f32(), nested_absmax_ptr=f32(),
                  nested_code_ptr=f32(), offset=0.0123 if dq else 0.0)
    wmeta = dict(BLOCKSIZE=v.get("BLOCKSIZE", 64), DOUBLE_QUANT=dq)
    precision = "ieee" if v["dtype"] == "fp32" else "tf32"  # _Operands.meta()
    m = v.get("M", 333)
    # Sizes: N, K multiples of 16 (real layers); M, R generic unless the variant says 1.
    sizes = dict(M=m, N=4096, K=4096, R=v.get("R_PAD", 16) - 3 if m != 1 else 1, M_BUCKET=512 if m != 1 else 1)
    if kernel == "fused":
        args = dict(x_ptr=act(), **weight, a_ptr=act(), b_ptr=act(), bias_ptr=act(), s_ptr=act(), y_ptr=act(),
                    **sizes, scale=2.0, seed=1234, p=0.1, **wmeta, SINGLE_PASS=v["SINGLE_PASS"],
                    HAS_BIAS=v["HAS_BIAS"], HAS_DROPOUT=v["HAS_DROPOUT"], R_PAD=v["R_PAD"], DOT_PRECISION=precision)
        return lf._fused_forward_kernel.fn, args
    if kernel == "decode_partial":
        s = {k: sizes[k] for k in ("M", "N", "K", "R", "M_BUCKET")}
        args = dict(x_ptr=act(), **weight, a_ptr=act(), y32_ptr=f32(), s32_ptr=f32(), **s, seed=1234, p=0.1,
                    **wmeta, HAS_DROPOUT=v["HAS_DROPOUT"], R_PAD=v["R_PAD"], DOT_PRECISION=precision)
        return lf._decode_partial_kernel.fn, args
    if kernel == "lora_s":
        args = dict(x_ptr=act(), a_ptr=act(), s_ptr=act(), M=sizes["M"], K=sizes["K"], R=sizes["R"], seed=1234,
                    p=0.1, HAS_DROPOUT=v["HAS_DROPOUT"], R_PAD=v["R_PAD"], DOT_PRECISION=precision)
        return lf._lora_s_kernel, args
    if kernel == "decode_epilogue":
        r = v["R_PAD"] - 3 if m != 1 else 1
        args = dict(y32_ptr=f32(), s32_ptr=f32(), b_ptr=act(), bias_ptr=act(), s_ptr=act(), y_ptr=act(),
                    M=m, N=sizes["N"], R=r, scale=2.0, HAS_BIAS=v["HAS_BIAS"], R_PAD=v["R_PAD"],
                    DOT_PRECISION=precision)
        return lf._decode_epilogue_kernel, args
    if kernel == "dequant":
        per_program = max(1, lf._DEQUANT_BYTES // (wmeta["BLOCKSIZE"] // 2))
        args = dict(**weight, out_ptr=act(), n_bytes=4096 * 4096 // 2, n_blocks=4096 * 4096 // wmeta["BLOCKSIZE"],
                    **wmeta, BLOCKS_PER_PROGRAM=per_program)
        return lf._dequant_kernel, args
    if kernel == "dx":
        args = dict(dy_ptr=act(), g_ptr=act(), a_ptr=act(), dx_ptr=act(), **weight, scale=2.0, seed=1234,
                    dropout_p=0.1, **sizes, **wmeta, R_PAD=v["R_PAD"], HAS_DROPOUT=v["HAS_DROPOUT"])
        return lora_dx._lora_dx_kernel, args
    if kernel == "dropout_mask":
        return dropout._dropout_mask_kernel, dict(out_ptr=f32(), seed=1234, p=0.1, M=m, K=4096)
    raise KeyError(kernel)


def _source(fn, args: dict):
    """``ASTSource`` built as ``JITFunction.run`` builds it for these argument values."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    signature, constexprs, attrs = {}, {}, {}
    for i, kp in enumerate(fn.params):
        value = args[kp.name]
        if kp.is_constexpr:
            signature[kp.name], constexprs[kp.name] = "constexpr", value
            continue
        ty, key = native_specialize_impl(CUDABackend, value, kp.is_const, not kp.do_not_specialize,
                                         not kp.do_not_specialize_on_alignment)
        signature[kp.name] = ty
        if ty == "constexpr":  # an int equal to 1
            constexprs[kp.name] = key
        elif isinstance(key, str):
            attrs[(i,)] = CUDABackend.parse_attr(key)
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _pruned(kernel, cfg, warps, stages, variant) -> bool:
    """True when the autotune pruner drops this config for this variant at every M (forward only)."""
    if kernel not in ("fused", "decode_partial"):
        return False
    import torch
    from lora_triton.kernels import lora_forward as lf

    configs = lf._fused_configs() if kernel == "fused" else lf._decode_configs()
    x = torch.empty(1, dtype={"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[variant["dtype"]])
    for m in (1, 24, 48, 100, 4096):
        kept = lf._prune_to_legal(configs, dict(M=m, N=4096, K=4096, x_ptr=x), R_PAD=variant["R_PAD"])
        if any(c.num_warps == warps and c.num_stages == stages and all(cfg.get(k) == v for k, v in c.kwargs.items())
               for c in kept):
            return False
    return True


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(job: tuple) -> dict:
    kernel, cfg_name, cfg, warps, stages, variant, arch = job
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    row = dict(kernel=kernel, config=cfg_name, variant=variant, arch=arch, ok=False, error="", regs=None,
               spill_st=None, spill_ld=None, stack=None, shared=None, seconds=0.0)
    start = time.perf_counter()
    try:
        fn, args = _kernel_and_args(kernel, variant)
        src = _source(fn, {**args, **cfg})
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v output (registers, spills) is printed to stdout
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": warps, "num_stages": stages})
        row["ok"] = True
        row["shared"] = compiled.metadata.shared
        text = log.getvalue()
        if regs := _PTXAS.findall(text):
            row["regs"] = max(map(int, regs))
        if m := _SPILL.search(text):
            row["stack"], row["spill_st"], row["spill_ld"] = map(int, m.groups())
        if row["shared"] > MAX_SHARED.get(arch, 232448) and _pruned(kernel, cfg, warps, stages, variant):
            row["pruned"] = True  # the launcher's autotune pruner never offers this config here
        elif row["shared"] > MAX_SHARED.get(arch, 232448):
            row["ok"] = False
            row["error"] = f"needs {row['shared']} B shared memory > {MAX_SHARED.get(arch)} B per block on sm_{arch}"
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the table
        lines = [line for line in f"{type(exc).__name__}: {exc}".splitlines() if line.strip()]
        row["error"] = " | ".join(lines[:1] + lines[-3:]) if len(lines) > 4 else " | ".join(lines)
    row["seconds"] = time.perf_counter() - start
    return row


def _init_worker(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    from triton import knobs
    knobs.cache.dir = cache_dir


# ====================================================================== main
def _variant_text(kernel: str, v: dict) -> str:
    abbrev = {"BLOCKSIZE": "bs", "DOUBLE_QUANT": "dq", "SINGLE_PASS": "single", "HAS_BIAS": "bias",
              "HAS_DROPOUT": "drop", "R_PAD": "r", "M": "M"}
    parts = [v["dtype"]]
    for name, value in v.items():
        if name == "dtype":
            continue
        parts.append(f"{abbrev[name]}{int(value) if isinstance(value, bool) else value}")
    return " ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90", help="comma-separated compute capabilities (default 90)")
    parser.add_argument("--level", choices=("quick", "full"), default="quick")
    parser.add_argument("--kernels", default="fused,lora_s,decode_partial,decode_epilogue,dequant,dx,dropout_mask")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--errors", action="store_true", help="print each error message in full")
    args = parser.parse_args(argv)

    import triton
    archs = [int(a) for a in args.arch.split(",")]
    jobs = build_jobs(args.kernels.split(","), args.level, archs)
    print(f"triton {triton.__version__}, python {sys.version.split()[0]}, targets {['sm_%d' % a for a in archs]}, "
          f"{len(jobs)} compiles on {args.jobs} processes", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora_triton_cc_") as cache, \
            ProcessPoolExecutor(args.jobs, initializer=_init_worker, initargs=(cache,)) as pool:
        rows = list(pool.map(compile_one, jobs, chunksize=1))

    header = f"{'kernel':<16} {'config':<28} {'constexprs':<48} {'sm':>3} {'status':<6} " \
             f"{'regs':>4} {'spill st/ld':>11} {'smem KB':>7} {'s':>5}"
    print(header)
    print("-" * len(header))
    for r in rows:
        spill = "" if r["spill_st"] is None else f"{r['spill_st']}/{r['spill_ld']}"
        smem = "" if r["shared"] is None else f"{r['shared'] / 1024:.1f}"
        status = ("pruned" if r.get("pruned") else "ok") if r["ok"] else "FAIL"
        print(f"{r['kernel']:<16} {r['config']:<28} {_variant_text(r['kernel'], r['variant']):<48} {r['arch']:>3} "
              f"{status:<6} {r['regs'] or '':>4} {spill:>11} {smem:>7} {r['seconds']:5.1f}")
    failures = [r for r in rows if not r["ok"]]
    spills = [r for r in rows if r["ok"] and r["spill_st"]]
    print(f"\n{len(rows) - len(failures)}/{len(rows)} compiled within limits in {time.perf_counter() - start:.0f} s; "
          f"{len(spills)} spill registers; {len(failures)} failed")
    for r in failures:
        msg = r["error"] if args.errors else r["error"][:400]
        print(f"FAIL {r['kernel']} [{r['config']}] [{_variant_text(r['kernel'], r['variant'])}] sm_{r['arch']}: {msg}")
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        ok = [r for r in rows if r["kernel"] == kernel and r["ok"]]
        if ok:
            big = max(ok, key=lambda r: r["shared"])
            print(f"  {kernel:<16} max smem {big['shared'] / 1024:.1f} KB [{big['config']}], "
                  f"max regs {max(r['regs'] or 0 for r in ok)}, max spill stores {max(r['spill_st'] or 0 for r in ok)} B")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
