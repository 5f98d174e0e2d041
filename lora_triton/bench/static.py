"""Kernel-efficiency report on CPU: compile every kernel the dispatcher can choose for sm_90 and
read registers, spills, shared memory and PTX (and SASS) instructions per decoded weight element.

    lora-triton bench --what static [--quick] [--triton 3.6.0,installed] [--out DIR]

Each row is one (kernel, config, variant, triton version) compile (``static_analysis``):
``loop_ptx_per_weight_elem`` counts the PTX instructions of the main K loop per decoded
weight element per thread (the whole body for a kernel without a loop; the budgets are on it),
``loop_sass_per_weight_elem`` the same for the machine code ptxas made of it (register moves that
ptxas removes do not count there, expansions do), ``wgmma_serialized``
is ptxas' warning C7515, ``weight_operand_from_registers`` whether the loop's wgmma reads the
weight from registers, ``wgmma_waits_each_step`` whether the loop waits for all its wgmma
(``wgmma.wait_group 0``: no decode overlaps an MMA; reported, not budgeted), ``lut_global_gathers``
the code-table loads from global memory in the loop. ``dispatched`` says whether the dispatcher
(``ops.dispatch``: the shipped table and the rule) can choose the kernel with that code table (a GPU
runs ``shfl``; ``gather`` rows are the interpreter's variant, for comparison); a dispatched kernel
that misses its ``BUDGETS`` fails the report (exit 1). Versions other than the installed triton compile in a subprocess whose path starts
with that version's wheel, installed once (``pip --target``) under ``--triton-cache``.
``--quick`` (CI): the dispatched kernels plus the skinny candidate (its decode-size and medium-M
defaults), each on its default config, bf16, the installed triton only.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

FIELDS = ["kernel", "config", "variant", "triton", "regs", "spills", "smem_bytes", "loop_ptx_per_weight_elem", "loop_sass_per_weight_elem",
          "loop_shared_ops_per_weight_elem", "wgmma_serialized", "weight_operand_from_registers",
          "wgmma_waits_each_step", "lut_global_gathers", "has_loop", "dispatched", "budget", "within_budget", "top_opcodes", "error"]


@dataclass(frozen=True)
class Budget:
    """Limits a kernel's compile must stay within (None: not limited)."""

    loop_ptx_per_weight_elem: float | None = None
    spills: int | None = 0
    regs: int | None = None
    wgmma_serialized: bool = False

    def misses(self, row: dict) -> list[str]:
        out = []
        if self.loop_ptx_per_weight_elem is not None and row["loop_ptx_per_weight_elem"] > self.loop_ptx_per_weight_elem:
            out.append(f"ptx/elem {row['loop_ptx_per_weight_elem']} > {self.loop_ptx_per_weight_elem}")
        if self.spills is not None and row["spills"] > self.spills:
            out.append(f"spills {row['spills']} B")
        if self.regs is not None and (row["regs"] or 0) > self.regs:
            out.append(f"regs {row['regs']} > {self.regs}")
        if not self.wgmma_serialized and row["wgmma_serialized"]:
            out.append("wgmma serialized (C7515)")
        return out

    def text(self) -> str:
        parts = []
        if self.loop_ptx_per_weight_elem is not None:
            parts.append(f"ptx/elem<={self.loop_ptx_per_weight_elem}")
        if self.spills is not None:
            parts.append(f"spills<={self.spills}")
        if self.regs is not None:
            parts.append(f"regs<={self.regs}")
        if not self.wgmma_serialized:
            parts.append("no C7515")
        return " ".join(parts)


#: Per kernel: the issue's budgets for the decode-size kernel; about 5.5 instructions per
#: element all-in is what a memory-bound kernel may issue at 70% of an H200's bandwidth
#: (shared/KERNELS.md), the budget of the dequant kernel and the fused tile kernels.
BUDGETS = {
    "skinny": Budget(loop_ptx_per_weight_elem=3.0, spills=0, regs=128),
    # the skinny kernel's medium-M default (M > 16 tokens; issue 14's budget for the medium-M forward)
    "skinny_m": Budget(loop_ptx_per_weight_elem=5.0, spills=0, regs=168),
    "dequant": Budget(loop_ptx_per_weight_elem=5.5, spills=0),
    # W + s * B @ A (the merged candidate): it writes the dense weight, 2 bytes per element in bf16 on
    # top of the 0.5 it reads, so the 5.5 of a kernel that only reads the packed bytes scales by 5
    "merged": Budget(loop_ptx_per_weight_elem=5.5 * (0.5 + 2) / 0.5, spills=0),
    "fused": Budget(loop_ptx_per_weight_elem=5.0, spills=0, regs=168),
    "decode": Budget(loop_ptx_per_weight_elem=5.5, spills=0),
    "dx": Budget(loop_ptx_per_weight_elem=5.0, spills=0, regs=168),
}


@dataclass(frozen=True)
class Build:
    """One compile: kernel name, config label and launch options, variant constexprs."""

    kernel: str
    config: dict
    num_warps: int
    num_stages: int
    variant: dict = field(default_factory=dict)
    maxnreg: int | None = None  # ptxas' register cap (Triton's ``maxnreg`` launch option)

    def config_text(self) -> str:
        cap = f" maxnreg{self.maxnreg}" if self.maxnreg else ""
        return " ".join(f"{k}{v}" for k, v in self.config.items()) + f" w{self.num_warps} s{self.num_stages}{cap}"

    def variant_text(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.variant.items())


# ----------------------------------------------------------------------------- what to compile
def _skinny_build(config: dict, variant: dict) -> "Build":
    """The compile of one skinny config: kernel ``skinny`` for decode-size token tiles, ``skinny_m``
    (issue 14's medium-M budget) for tiles of more than ``SKINNY_DECODE_MAX_M`` tokens."""
    from ..kernels.lora_forward import SKINNY_DECODE_MAX_M

    c = config
    kernel = "skinny_m" if c["block_m"] > SKINNY_DECODE_MAX_M else "skinny"
    return Build(kernel, dict(BLOCK_M=c["block_m"], BLOCK_N=c["block_n"], BLOCK_K=c["block_k"],
                              **({"S_FIRST": True} if c.get("s_first") else {}),
                              **({"SCALE_WEIGHTS": True} if c.get("scale_weights") else {})),
                 c["num_warps"], c["num_stages"], variant, c["maxnreg"])


def shipped_skinny_configs() -> list[dict]:
    """The skinny configs a GPU launch can run: each skinny point of the shipped table (its config over
    the default for its rank and M bucket, as ``lora_forward._launch_skinny`` merges them), and the
    defaults at ranks 16 and 64 when the rule itself is skinny."""
    from ..kernels.lora_forward import SKINNY_DECODE_MAX_M, padded_rank, skinny_default
    from ..ops import dispatch

    out = []
    for ops in dispatch.load_table()["gpus"].values():
        for p in ops.get("forward", []):
            if p["candidate"] == "skinny":
                out.append(dict(skinny_default(padded_rank(p["r"]), p["m_bucket"]), **(p.get("config") or {})))
    if dispatch.RULE["forward"] == "skinny":
        out += [skinny_default(r_pad, m) for r_pad in (16, 64) for m in (1, SKINNY_DECODE_MAX_M + 1)]
    return out


def _skinny_builds(quick: bool, variant: dict) -> list["Build"]:
    """The skinny configs to compile: the decode-size and medium-M defaults for the variant's rank, the
    shipped table's, then (unless ``quick``) every other config the GPU benchmark times."""
    from ..kernels.lora_forward import SKINNY_CONFIGS, SKINNY_DECODE_MAX_M, padded_rank, skinny_default

    r_pad = padded_rank(variant["r"])
    candidates = [skinny_default(r_pad), skinny_default(r_pad, SKINNY_DECODE_MAX_M + 1), *shipped_skinny_configs()]
    if not quick:
        candidates += SKINNY_CONFIGS
    out = []
    for config in candidates:
        build = _skinny_build(config, variant)
        # a config compiled twice hits the cache the second time (no ptxas log): once each
        if all((b.config, b.num_warps, b.num_stages, b.maxnreg) != (build.config, build.num_warps, build.num_stages,
                                                                      build.maxnreg) for b in out):
            out.append(build)
    return out


def _autotune_configs(kernel: str, quick: bool) -> list[tuple[dict, int, int]]:
    from ..kernels import lora_dx, lora_forward as lf

    if kernel == "dx":
        configs = lora_dx._gpu_configs()
    else:
        configs = lf._fused_configs() if kernel == "fused" else lf._decode_configs()
        fixed = lf.FIXED_GPU_CONFIGS[kernel]
        if quick:
            configs = [fixed]
    out = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in configs]
    if kernel == "decode":
        out = [({**cfg, "BLOCK_M": 16}, w, s) for cfg, w, s in out]
    return out[:1] if quick else out


def dispatched_kernels() -> set[str]:
    """Kernels the dispatcher can choose: the shipped table's winners and the rule's choice."""
    from ..ops import dispatch

    dx_kernel = {"fused": "dx", "dequant": "dequant", "merged": "merged"}  # dx candidates -> the kernel they run
    from ..kernels.lora_forward import SKINNY_DECODE_MAX_M

    names = {dispatch.RULE["forward"], dx_kernel[dispatch.RULE["dx"]]}
    for ops in dispatch.load_table()["gpus"].values():
        for p in ops.get("forward", []):  # skinny beyond 16 tokens runs the medium-M tile
            names.add("skinny_m" if p["candidate"] == "skinny" and p["m_bucket"] > SKINNY_DECODE_MAX_M
                      else p["candidate"])
        names.update(dx_kernel[p["candidate"]] for p in ops.get("dx", []))
    return names


def is_dispatched(build: Build, dispatched: set[str]) -> bool:
    """True when a GPU launch can run this build: a dispatched kernel with the code table a GPU uses;
    for the skinny kernel, one of the configs the dispatcher can launch (``shipped_skinny_configs``)."""
    import torch

    from ..kernels.runtime import default_table

    if build.variant.get("table") != default_table(torch.device("cuda")):
        return False
    if build.kernel in ("skinny", "skinny_m"):
        return any(_skinny_build(c, build.variant) == build for c in shipped_skinny_configs())
    return build.kernel in dispatched


def builds(quick: bool) -> list[Build]:
    """Every compile of the report (``quick``: dispatched kernels and skinny, default configs, bf16)."""
    dispatched = dispatched_kernels()
    kernels = ["skinny", "dequant", "merged", "fused", "decode", "dx"]  # "skinny" builds the skinny_m rows too
    if quick:
        kernels = [k for k in kernels if k in dispatched or k == "skinny"]
    variants = [dict(dtype="bf16", r=16)] if quick else [dict(dtype="bf16", r=16), dict(dtype="fp16", r=64)]
    out = []
    for kernel in kernels:
        for table in (("shfl",) if quick else ("shfl", "gather")):
            for variant in variants:
                variant = {**variant, "table": table}
                if kernel == "skinny":
                    out.extend(_skinny_builds(quick, variant))
                    continue
                configs = [({}, 4, 3)] if kernel in ("dequant", "merged") else _autotune_configs(kernel, quick)
                out.extend(Build(kernel, cfg, warps, stages, variant) for cfg, warps, stages in configs)
    return out


def _kernel_args(build: Build) -> tuple:
    """``(JITFunction, every argument by name, weight elements per main-loop iteration, options)``."""
    import torch
    from ..kernels import lora_dx, lora_forward as lf, nf4_dequant, nf4_skinny

    v = build.variant
    act_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[v["dtype"]]
    act = lambda: torch.empty(16, dtype=act_dtype)  # noqa: E731
    f32 = lambda: torch.empty(16, dtype=torch.float32)  # noqa: E731
    weight = dict(packed_ptr=torch.empty(16, dtype=torch.uint8), code_ptr=f32(),
                  absmax_ptr=torch.empty(16, dtype=torch.uint8), nested_absmax_ptr=f32(), nested_code_ptr=f32(),
                  offset=0.0123, BLOCKSIZE=64, DOUBLE_QUANT=True, TABLE=v["table"])
    r_pad = max(16, v["r"])
    precision = "ieee" if v["dtype"] == "fp32" else "tf32"
    sizes = dict(M=7, N=4096, K=4096, R=v["r"] - 3)
    cfg = build.config
    options = {"enable_fp_fusion": False, **({"maxnreg": build.maxnreg} if build.maxnreg else {})}
    if build.kernel in ("skinny", "skinny_m"):
        args = dict(x_ptr=act(), **weight, a_ptr=act(), b_ptr=act(), bias_ptr=act(), s_ptr=act(), y_ptr=act(),
                    partial_y_ptr=f32(), partial_s_ptr=f32(), counter_ptr=torch.empty(16, dtype=torch.int32),
                    **sizes, scale=2.0, seed=1234, p=0.1, HAS_BIAS=True, HAS_DROPOUT=False, R_PAD=r_pad,
                    DOT_PRECISION=precision, SPLIT_K=4, S_FIRST=False, SCALE_WEIGHTS=False,
                    LORA_CHUNKS=nf4_skinny.lora_chunks(cfg["BLOCK_K"], r_pad), EVEN_N=True, EVEN_K=True)
        args.update(cfg)
        return nf4_skinny._skinny_kernel, args, cfg["BLOCK_N"] * cfg["BLOCK_K"], options
    if build.kernel == "dequant":
        per_program = nf4_dequant.blocks_per_program(64)
        words = dict(weight, words_ptr=torch.empty(16, dtype=torch.int32))
        del words["packed_ptr"]
        args = dict(**words, out_ptr=act(), n_blocks=4096 * 64, BLOCKS_PER_PROGRAM=per_program)
        return nf4_dequant._dequant_kernel, args, per_program * 64, options
    if build.kernel == "merged":
        words = dict(weight, words_ptr=torch.empty(16, dtype=torch.int32))
        del words["packed_ptr"]
        block_k = nf4_dequant.merged_block_k(64)
        args = dict(**words, a_ptr=act(), b_ptr=act(), out_ptr=act(), N=4096, K=4096, R=v["r"] - 3, scale=2.0,
                    BLOCK_N=nf4_dequant.MERGED_BLOCK_N, BLOCK_K=block_k,
                    ROWS_PER_PROGRAM=nf4_dequant.MERGED_ROWS_PER_PROGRAM, R_PAD=r_pad, DOT_PRECISION=precision)
        return nf4_dequant._dequant_merged_kernel, args, nf4_dequant.MERGED_BLOCK_N * block_k, options
    if build.kernel == "fused":
        args = dict(x_ptr=act(), **weight, a_ptr=act(), b_ptr=act(), bias_ptr=act(), s_ptr=act(), y_ptr=act(),
                    **sizes, M_BUCKET=512, scale=2.0, seed=1234, p=0.1, SINGLE_PASS=True, HAS_BIAS=False,
                    HAS_DROPOUT=False, R_PAD=r_pad, DOT_PRECISION=precision, **cfg)
        return lf._fused_forward_kernel, args, cfg["BLOCK_N"] * cfg["BLOCK_K"], options
    if build.kernel == "decode":
        args = dict(x_ptr=act(), **weight, a_ptr=act(), y32_ptr=f32(), s32_ptr=f32(), **sizes, M_BUCKET=8,
                    seed=1234, p=0.1, HAS_DROPOUT=False, R_PAD=r_pad, DOT_PRECISION=precision, **cfg)
        return lf._decode_partial_kernel, args, cfg["BLOCK_N"] * cfg["BLOCK_K"], options
    if build.kernel == "dx":
        args = dict(dy_ptr=act(), g_ptr=act(), a_ptr=act(), dx_ptr=act(), **weight, scale=2.0, seed=1234,
                    dropout_p=0.1, M=333, N=4096, K=4096, R=v["r"] - 3, M_BUCKET=512, R_PAD=r_pad,
                    HAS_DROPOUT=False, EVEN_M=333 % cfg["BLOCK_M"] == 0, EVEN_N=4096 % cfg["BLOCK_N"] == 0,
                    EVEN_K=4096 % cfg["BLOCK_K"] == 0, **cfg)
        return lora_dx._lora_dx_kernel, args, cfg["BLOCK_N"] * cfg["BLOCK_K"], options
    raise KeyError(build.kernel)


# ----------------------------------------------------------------------------- compiling
def compile_row(build: Build, dispatched: bool, arch: int = 90) -> dict:
    """One row of the report (errors become a row with ``error`` set)."""
    import triton

    from .static_analysis import analyze, compile_kernel

    budget = BUDGETS.get(build.kernel, Budget())
    row = dict(kernel=build.kernel, config=build.config_text(), variant=build.variant_text(),
               triton=triton.__version__, dispatched=dispatched, budget=budget.text(), error="")
    try:
        fn, args, elems, options = _kernel_args(build)
        compiled, log = compile_kernel(fn, args, build.num_warps, build.num_stages, arch, options)
        result = analyze(compiled, log, elems, build.num_warps, fn)
        row.update(regs=result.regs, spills=result.spill_bytes, smem_bytes=result.smem_bytes,
                   loop_ptx_per_weight_elem=result.loop_ptx_per_weight_elem,
                   loop_sass_per_weight_elem=result.loop_sass_per_weight_elem,
                   loop_shared_ops_per_weight_elem=result.loop_shared_ops_per_weight_elem,
                   wgmma_serialized=result.wgmma_serialized,
                   weight_operand_from_registers=result.weight_operand_from_registers,
                   wgmma_waits_each_step=result.wgmma_waits_each_step,
                   lut_global_gathers=result.lut_global_gathers, has_loop=result.has_loop,
                   top_opcodes=result.top_opcodes)
        row["within_budget"] = not budget.misses(row)
        if not row["within_budget"]:
            row["error"] = "over budget: " + "; ".join(budget.misses(row))
    except Exception as exc:  # noqa: BLE001 - a failed compile is a row of the report
        row.update(within_budget=False, error=f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    return row


def _init_worker(cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # fresh: a cached kernel prints no ptxas log
    from triton import knobs

    knobs.cache.dir = cache_dir
    knobs.runtime.interpret = False


def _compile_all(jobs: list[tuple[Build, bool]], workers: int) -> list[dict]:
    # Fresh interpreters (spawn): a process that imported the kernels under TRITON_INTERPRET=1
    # (the test run) holds interpreter functions, which cannot be compiled for a GPU.
    with tempfile.TemporaryDirectory(prefix="lora_triton_static_") as cache, \
            ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                initargs=(cache,)) as pool:
        return list(pool.map(_compile_job, jobs, chunksize=1))


def _compile_job(job: tuple[Build, bool]) -> dict:
    return compile_row(*job)


def installed_triton_version() -> str:
    import triton

    return triton.__version__


def triton_path(version: str, cache: str) -> str:
    """A folder holding triton ``version`` (installed there with pip the first time)."""
    target = os.path.join(cache, f"triton-{version}")
    if not os.path.isdir(os.path.join(target, "triton")):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target,
                        f"triton=={version}"], check=True)
    return target


def _rows_with_other_triton(version: str, quick: bool, workers: int, cache: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([triton_path(version, cache)] + sys.path))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "lora_triton.bench.static", "--json", "--jobs", str(workers)] + (["--quick"] if quick
                                                                                                  else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1) or not done.stdout.strip():
        raise RuntimeError(f"static report with triton {version} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report_rows(quick: bool, versions: list[str], workers: int, cache: str) -> list[dict]:
    """Rows for every build and every triton version in ``versions`` (``installed`` = this one)."""
    rows = []
    for version in versions:
        if version in ("installed", installed_triton_version()):
            dispatched = dispatched_kernels()
            rows += _compile_all([(b, is_dispatched(b, dispatched)) for b in builds(quick)], workers)
        else:
            rows += _rows_with_other_triton(version, quick, workers, cache)
    return rows


def failures(rows: list[dict]) -> list[dict]:
    """Rows of dispatched kernels that failed to compile or missed their budget."""
    return [r for r in rows if r["dispatched"] and not r["within_budget"]]


def print_report(rows: list[dict]) -> None:
    header = (f"{'kernel':<8} {'config':<36} {'variant':<30} {'triton':<6} {'regs':>4} {'spill':>5} {'smem KB':>7} "
              f"{'ptx/el':>6} {'sass/el':>7} {'shm/el':>6} {'C7515':>5} {'A reg':>5} {'wait0':>5} {'gath':>4} {'disp':>4}  "
              "budget")
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.get("regs") is None and r["error"].startswith("compile failed"):
            print(f"{r['kernel']:<8} {r['config']:<36} {r['variant']:<30} {r['triton']:<6} {r['error']}")
            continue
        mark = "ok" if r["within_budget"] else ("MISS" if r["dispatched"] else "miss")
        sass = r["loop_sass_per_weight_elem"]
        print(f"{r['kernel']:<8} {r['config']:<36} {r['variant']:<30} {r['triton']:<6} {r['regs'] or '':>4} "
              f"{r['spills']:>5} {r['smem_bytes'] / 1024:>7.1f} {r['loop_ptx_per_weight_elem']:>6.2f} "
              f"{sass if sass is not None else '':>7} "
              f"{r['loop_shared_ops_per_weight_elem']:>6.2f} {'yes' if r['wgmma_serialized'] else 'no':>5} "
              f"{str(r['weight_operand_from_registers'])[:5]:>5} {str(r['wgmma_waits_each_step'])[:5]:>5} "
              f"{r['lut_global_gathers']:>4} "
              f"{'yes' if r['dispatched'] else 'no':>4}  {mark} {r['error'].removeprefix('over budget: ')}")


def run_static(out_dir: str, quick: bool, versions: list[str] | None = None, workers: int | None = None,
               cache: str | None = None) -> int:
    """Write ``out_dir/static.csv``, print the report; 1 when a dispatched kernel misses its budget."""
    from .report import write_csv

    versions = versions or (["installed"] if quick else ["3.6.0", "installed"])
    workers = workers or os.cpu_count() or 1
    cache = cache or os.path.join(os.path.expanduser("~"), ".cache", "lora-triton")
    rows = report_rows(quick, versions, workers, cache)
    write_csv(os.path.join(out_dir, "static.csv"), rows, FIELDS)
    print_report(rows)
    bad = failures(rows)
    print(f"\nstatic: {len(rows)} compiles for sm_90, wrote {os.path.join(out_dir, 'static.csv')}; "
          f"{len(bad)} dispatched kernel compile(s) over budget or failed")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lora_triton.bench.static --json``: rows as one JSON line (the subprocess of
    another triton version); without ``--json`` the same as ``lora-triton bench --what static``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lora_triton.bench.static")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    if args.json:
        dispatched = dispatched_kernels()
        rows = _compile_all([(b, is_dispatched(b, dispatched)) for b in builds(args.quick)],
                            args.jobs or os.cpu_count())
        print(json.dumps(rows))
        return 0
    return run_static(args.out, args.quick, workers=args.jobs)


if __name__ == "__main__":
    sys.exit(main())
