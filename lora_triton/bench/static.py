"""Kernel report on CPU: compile every kernel config the package can launch for each GPU it is
built for (sm_80, sm_86, sm_89, sm_90) and read what the compiler made of it.

    lora-triton bench --what static [--quick] [--triton 3.6.0,installed] [--out DIR]

Each row is one (kernel, config, variant, arch, triton version) compile (``static_analysis``):
``smem_bytes``, ``regs`` and ``spills`` come from the compiled kernel and ptxas; ``smem_estimate`` is
the kernel module's own bound, the one ``ops.configs`` uses to choose configs per GPU; ``offered``
says whether the package would launch that config on that arch (the autotune lists pruned for the
GPU, the fixed tiles chosen per arch, the skinny configs that fit); ``fits`` whether it can launch
there at all (``ops.configs.named_archs``: shared memory per block, registers per block).

The report fails (exit 1) when

* an offered row does not fit its arch, or compiles to more shared memory than its estimate (the
  estimate is what keeps the configs of an unlisted GPU safe);
* an offered bf16/fp16 row of a dispatched kernel spills registers;
* a dispatched kernel's sm_90 bf16/fp16 compile misses its ``BUDGETS`` (PTX instructions of the main
  loop per decoded weight element per thread, registers, spills, ptxas' wgmma serialization C7515).

"Dispatched" kernels are those production launches: the kernels of the candidates
(``ops.candidates``) that the shipped dispatch table and the rule name, for the forward, dx and
mixed-batch operations, and the dropout uniforms every mask is made from. The experimental fused
forward kernel (``kernels.experimental.fused``) is compiled, never dispatched. The sm_90 columns
``loop_ptx_per_weight_elem``, ``loop_sass_per_weight_elem``, ``wgmma_serialized``,
``weight_operand_from_registers``, ``wgmma_waits_each_step`` and ``lut_global_gathers`` are as
``static_analysis`` describes them.

``--quick`` (CI): the dispatched kernels plus the skinny defaults, the configs the package offers on
each of the four arches, three variants (bf16 rank 16, fp16 rank 128, fp32 rank 128: the most shared
memory), the installed triton only. The full report adds every config of every kernel, two more
variants and triton 3.6 (the GPU machine's), compiled in a subprocess whose path starts with that
version's wheel, installed once (``pip --target``) under ``--triton-cache``.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

FIELDS = ["kernel", "config", "variant", "arch", "triton", "regs", "spills", "smem_bytes", "smem_estimate",
          "smem_limit", "fits", "offered", "dispatched", "loop_ptx_per_weight_elem", "loop_sass_per_weight_elem",
          "loop_shared_ops_per_weight_elem", "wgmma_serialized", "weight_operand_from_registers",
          "wgmma_waits_each_step", "lut_global_gathers", "has_loop", "budget", "within_budget", "top_opcodes",
          "error"]

#: The arch whose compiles the instruction budgets apply to (they were set for Hopper's wgmma code).
BUDGET_ARCH = 90
QUICK_VARIANTS = (dict(dtype="bf16", r=16), dict(dtype="fp16", r=128), dict(dtype="fp32", r=128))
#: The variants the instruction budgets were set on (and the full report compiles the ``gather`` table for).
BUDGET_VARIANTS = (dict(dtype="bf16", r=16), dict(dtype="fp16", r=64))
FULL_VARIANTS = QUICK_VARIANTS + (dict(dtype="fp16", r=64), dict(dtype="fp32", r=16))


@dataclass(frozen=True)
class Budget:
    """Limits a kernel's sm_90 compile must stay within (None: not limited)."""

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


#: Per kernel, on sm_90: the decode-size kernel's budgets; about 5.5 instructions per element all-in
#: is what a memory-bound kernel may issue at 70% of an H200's bandwidth, the
#: budget of the dequant kernel and the tile kernels.
BUDGETS = {
    "skinny": Budget(loop_ptx_per_weight_elem=3.0, spills=0, regs=128),
    # the skinny kernel's medium-M tiles (more than ``decode_max_m`` tokens)
    "skinny_m": Budget(loop_ptx_per_weight_elem=5.0, spills=0, regs=168),
    "dequant": Budget(loop_ptx_per_weight_elem=5.5, spills=0),
    # W + s * B @ A: it writes the dense weight, 2 bytes per element in bf16 on top of the 0.5 it
    # reads, so the 5.5 of a kernel that only reads the packed bytes scales by 5
    "merged": Budget(loop_ptx_per_weight_elem=5.5 * (0.5 + 2) / 0.5, spills=0),
    "fused": Budget(loop_ptx_per_weight_elem=5.0, spills=0, regs=168),
    "dx": Budget(loop_ptx_per_weight_elem=5.0, spills=0, regs=168),
}

#: Kernels that read no adapter: one compile per dtype covers every rank.
RANKLESS = {"dequant", "uniform"}
#: Kernels whose operands do not depend on the activation dtype (fp32 uniforms).
DTYPELESS = {"uniform"}


@dataclass(frozen=True)
class Build:
    """One compile: kernel name, config (constexprs), launch options, variant (dtype, rank, table)."""

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

    @property
    def elem_bytes(self) -> int:
        return {"fp16": 2, "bf16": 2, "fp32": 4}[self.variant["dtype"]]

    @property
    def r_pad(self) -> int:
        from ..kernels.runtime import padded_rank

        return padded_rank(self.variant["r"])


# ----------------------------------------------------------------------------- the package's choices
def _decode_max_m() -> int:
    """The most tokens the skinny kernel's decode-size default takes (``kernel_configs.json``)."""
    from ..ops import configs

    return configs.configs().skinny["decode_max_m"]


def _skinny_build(config: dict, variant: dict) -> Build:
    """The compile of one skinny config: kernel ``skinny`` for decode-size token tiles, ``skinny_m``
    for tiles of more than ``_decode_max_m()`` tokens."""
    c = config
    kernel = "skinny_m" if c["block_m"] > _decode_max_m() else "skinny"
    return Build(kernel, dict(BLOCK_M=c["block_m"], BLOCK_N=c["block_n"], BLOCK_K=c["block_k"],
                              **({"S_FIRST": True} if c.get("s_first") else {}),
                              **({"SCALE_WEIGHTS": True} if c.get("scale_weights") else {})),
                 c["num_warps"], c["num_stages"], variant, c["maxnreg"])


def _skinny_config_of(build: Build) -> dict:
    """The skinny launch config a build compiles (the inverse of ``_skinny_build``)."""
    c = build.config
    return dict(block_m=c["BLOCK_M"], block_n=c["BLOCK_N"], block_k=c["BLOCK_K"], num_warps=build.num_warps,
                num_stages=build.num_stages, maxnreg=build.maxnreg, s_first=c.get("S_FIRST", False),
                scale_weights=c.get("SCALE_WEIGHTS", False))


def shipped_skinny_configs(limits=None, elem_bytes: int = 2) -> list[dict]:
    """The skinny configs a GPU launch can run: each skinny point of the shipped table (its config over
    the default for its rank and M bucket, as the skinny candidate merges them), and the defaults at
    ranks 16 and 64 when the rule names the skinny candidate."""
    from ..kernels.runtime import padded_rank
    from ..ops import candidates, configs, dispatch

    out = []
    for ops in dispatch.load_table()["gpus"].values():
        for p in ops.get("forward", []):
            if p["candidate"] == "skinny":
                default = configs.skinny_default(padded_rank(p["r"]), p["m_bucket"], elem_bytes, limits)
                out.append(dict(default, **(p.get("config") or {})))
    if "skinny" in candidates.RULE["forward"]:
        out += [configs.skinny_default(r_pad, m, elem_bytes, limits) for r_pad in (16, 64)
                for m in (1, _decode_max_m() + 1)]
    return out


def _skinny_builds(quick: bool, variant: dict, limits) -> list[Build]:
    """The skinny configs to compile: the decode-size and medium-M defaults the package offers for the
    variant on this arch, the shipped table's, then (unless ``quick``) every config the GPU benchmark
    times (``configs.skinny_bench_configs``)."""
    from ..ops import configs

    b = Build("skinny", {}, 4, 1, variant)
    chosen = [configs.skinny_default(b.r_pad, 1, b.elem_bytes, limits),
              configs.skinny_default(b.r_pad, _decode_max_m() + 1, b.elem_bytes, limits),
              *shipped_skinny_configs(limits, b.elem_bytes)]
    if not quick:
        chosen += configs.skinny_bench_configs()
    return _unique([_skinny_build(config, variant) for config in chosen])


def _unique(builds: list[Build]) -> list[Build]:
    out = []
    for b in builds:
        if b not in out:  # a config compiled twice hits the cache the second time (no ptxas log)
            out.append(b)
    return out


def launched_tiles(kernel: str, elem_bytes: int, r_pad: int, limits) -> tuple:
    """The ``TileConfig`` s of ``kernel`` (``"dx"`` or ``"fused"``) a GPU with ``limits`` launches, as
    ``ops.candidates`` chooses them: the autotune tiles that fit (the last autotune tile when none does)
    and, without autotuning (``LORA_TRITON_AUTOTUNE=0``), the first fixed tile that fits."""
    from ..ops import configs

    autotune = configs.offered_tiles(kernel, elem_bytes, r_pad, limits) or configs.tuned_tiles(kernel)[-1:]
    return (*autotune, configs.fixed_tiles(kernel, elem_bytes, r_pad, limits)[0])


def _tile_builds(kernel: str, quick: bool, variant: dict, limits) -> list[Build]:
    """Builds of a tile kernel (``dx``, ``fused``): the fixed tile it runs on this arch without autotuning
    (quick), or every tile of its autotune and fixed lists."""
    from ..ops import configs

    b = Build(kernel, {}, 4, 1, variant)
    if quick:
        tiles = configs.fixed_tiles(kernel, b.elem_bytes, b.r_pad, limits)[:1]
    else:
        tiles = (*configs.tuned_tiles(kernel), *getattr(configs.configs(), kernel)["fixed"])
    return _unique([Build(kernel, t.blocks, t.num_warps, t.num_stages, variant) for t in tiles])


def _s_builds(quick: bool, variant: dict, limits) -> list[Build]:
    """The S kernel's tile on this arch (quick), or every tile of its list for the variant."""
    from ..ops import configs

    b = Build("s", {}, 4, 1, variant)
    tiles = ([configs.s_kernel_tile(b.elem_bytes, b.r_pad, limits)] if quick
             else configs.s_kernel_tiles(b.elem_bytes, b.r_pad, None))  # None: no limits, the whole list
    return [Build("s", dict(BLOCK_M=bm, BLOCK_K=bk), configs.configs().s_warps, stages, variant)
            for bm, bk, stages in tiles]


def kernel_builds(kernel: str, quick: bool, variant: dict, limits) -> list[Build]:
    """The compiles of ``kernel`` for ``variant`` on the arch of ``limits``."""
    from ..kernels import dropout, lora_multi, nf4_dequant
    from ..ops import configs

    if kernel == "skinny":
        return _skinny_builds(quick, variant, limits)
    if kernel in ("fused", "dx"):
        return _tile_builds(kernel, quick, variant, limits)
    if kernel == "s":
        return _s_builds(quick, variant, limits)
    if kernel == "merged":
        b = Build(kernel, {}, 4, 1, variant)
        block_k = configs.merged_block_ks(64, b.elem_bytes, b.r_pad, limits)[0]
        return [Build(kernel, dict(BLOCK_N=nf4_dequant.MERGED_BLOCK_N, BLOCK_K=block_k), 4, 3, variant)]
    if kernel == "multi_shrink":
        return [Build(kernel, dict(BLOCK_K=lora_multi.SHRINK_BLOCK_K), 4, 3, variant)]
    if kernel == "multi_expand":
        return [Build(kernel, dict(BLOCK_N=lora_multi.EXPAND_BLOCK_N), 4, 3, variant)]
    if kernel == "uniform":
        return [Build(kernel, dict(BLOCK_M=dropout.MASK_BLOCK_M, BLOCK_K=dropout.MASK_BLOCK_K), 4, 3, variant)]
    if kernel == "dequant":
        return [Build(kernel, {}, 4, 3, variant)]
    raise KeyError(kernel)


def smem_estimate(build: Build) -> int:
    """The kernel module's shared-memory bound for ``build`` (what the choices per GPU rely on); 0 for
    kernels whose one config is small on every arch (the report checks them all the same)."""
    from ..kernels import lora_dx, lora_s, nf4_dequant, nf4_skinny
    from ..kernels.experimental import fused

    k, c = build.kernel, build.config
    if k in ("skinny", "skinny_m"):
        return nf4_skinny.skinny_smem(_skinny_config_of(build), build.elem_bytes, build.r_pad)
    if k == "s":
        return lora_s.s_kernel_smem(c["BLOCK_M"], c["BLOCK_K"], build.num_stages, build.elem_bytes, build.r_pad)
    if k == "fused":
        return fused.fused_smem(c, build.num_stages, build.elem_bytes, build.r_pad)
    if k == "dx":
        return lora_dx.dx_smem(c, build.num_stages, build.elem_bytes, build.r_pad)
    if k == "merged":
        return nf4_dequant.merged_smem(c["BLOCK_K"], build.elem_bytes, build.r_pad)
    return 0


def is_offered(build: Build, limits) -> bool:
    """True when the package would launch ``build`` on a GPU with ``limits``: a config ``ops.configs``
    picks there (fixed tiles per arch, autotune lists pruned per GPU, skinny configs that fit)."""
    import torch

    from ..kernels.runtime import default_table
    from ..ops import configs

    if build.variant.get("table", "shfl") != default_table(torch.device("cuda")):
        return False  # the interpreter's code-table variant, compiled for comparison
    k = build.kernel
    if k in ("skinny", "skinny_m"):
        return configs.skinny_fits(_skinny_config_of(build), build.elem_bytes, build.r_pad, limits)
    if k == "s":
        return _s_builds(True, build.variant, limits)[0] == build
    if k in ("fused", "dx"):
        return any(Build(k, t.blocks, t.num_warps, t.num_stages, build.variant) == build
                   for t in launched_tiles(k, build.elem_bytes, build.r_pad, limits))
    if k == "merged":
        return kernel_builds("merged", True, build.variant, limits)[0] == build and limits.fits(smem_estimate(build))
    return True  # one config, launched everywhere


#: Kernels each candidate of ``ops.candidates`` launches, per operation (beside cuBLAS and plain torch): a
#: candidate of the shipped table or of the rule makes them "dispatched". The forward's ``dequant`` runs
#: the S kernel with dropout, ``skinny`` with ``s_first`` configs; ``native`` is CUDA C++.
FORWARD_KERNELS = {"torch": set(), "dequant": {"dequant", "s"}, "merged": {"merged"}, "skinny": {"skinny", "s"},
                   "native": set()}
DX_KERNELS = {"torch": set(), "dequant": {"dequant"}, "merged": {"merged"}, "fused": {"dx"}}
MIXED_KERNELS = {"torch": set(), "triton": {"multi_shrink", "multi_expand"}}
OPERATION_KERNELS = {"forward": FORWARD_KERNELS, "dx": DX_KERNELS, "mixed": MIXED_KERNELS}
#: Launched whatever the table says: every dropout mask on a GPU is made from its uniforms (``ops.dropout``:
#: dA's, the torch candidates', a mixed batch's).
ALWAYS_LAUNCHED = {"uniform"}
KERNELS = ("skinny", "dequant", "s", "uniform", "multi_shrink", "multi_expand", "merged", "fused", "dx")


def dispatched_kernels() -> set[str]:
    """Kernels production can launch: those of every candidate the rule lists and of the shipped table's
    winners, per operation, and ``ALWAYS_LAUNCHED``. ``skinny`` stands for both of its budgets
    (``skinny``, ``skinny_m``)."""
    from ..ops import candidates, dispatch

    names = set(ALWAYS_LAUNCHED)
    for operation, kernels in OPERATION_KERNELS.items():
        for name in candidates.RULE[operation]:
            names |= kernels[name]
    for ops in dispatch.load_table()["gpus"].values():
        for operation, points in ops.items():
            for p in points:
                names |= OPERATION_KERNELS[operation][p["candidate"]]
    return names


def is_dispatched(build: Build, dispatched: set[str], limits) -> bool:
    """True when production can launch this build: a dispatched kernel, offered on the arch; for the
    skinny kernel, one of the configs the dispatcher can launch (``shipped_skinny_configs``)."""
    if not is_offered(build, limits):
        return False
    if build.kernel in ("skinny", "skinny_m"):
        return any(_skinny_build(c, build.variant) == build for c in shipped_skinny_configs(limits, build.elem_bytes))
    return build.kernel in dispatched


def builds(quick: bool, arch: int) -> list[Build]:
    """Every compile of the report for ``arch`` (``quick``: dispatched kernels and the skinny defaults,
    the configs offered on the arch)."""
    from ..ops import configs

    limits = configs.named_archs()[arch]
    dispatched = dispatched_kernels()
    kernels = [k for k in KERNELS if not quick or k in dispatched or k == "skinny"]
    out = []
    for kernel in kernels:
        seen = set()
        for variant in (QUICK_VARIANTS if quick else FULL_VARIANTS):
            key = (None if kernel in DTYPELESS else variant["dtype"], None if kernel in RANKLESS else variant["r"])
            if key in seen:
                continue
            seen.add(key)
            # the interpreter's code table beside the GPU's, for comparison, where the budgets were set
            compare = not quick and arch == BUDGET_ARCH and variant in BUDGET_VARIANTS
            tables = ("shfl", "gather") if compare else ("shfl",)
            for table in tables:
                out.extend(kernel_builds(kernel, quick, {**variant, "table": table}, limits))
    return _unique(out)


def _kernel_args(build: Build) -> tuple:
    """``(JITFunction, every argument by name, weight elements per main-loop iteration, options)``."""
    import torch

    from ..kernels import dropout, lora_dx, lora_multi, lora_s, nf4_dequant, nf4_skinny
    from ..kernels.experimental import fused

    v = build.variant
    act_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[v["dtype"]]
    act = lambda: torch.empty(16, dtype=act_dtype)  # noqa: E731
    f32 = lambda: torch.empty(16, dtype=torch.float32)  # noqa: E731
    ids = torch.empty(16, dtype=torch.int64)
    seed = torch.empty(16, dtype=torch.int32)
    weight = dict(packed_ptr=torch.empty(16, dtype=torch.uint8), code_ptr=f32(),
                  absmax_ptr=torch.empty(16, dtype=torch.uint8), nested_absmax_ptr=f32(), nested_code_ptr=f32(),
                  offset=0.0123, BLOCKSIZE=64, DOUBLE_QUANT=True, TABLE=v["table"])
    r_pad = build.r_pad
    precision = "ieee" if v["dtype"] == "fp32" else "tf32"
    rank = max(1, v["r"] - 3)
    sizes = dict(M=7, N=4096, K=4096, R=rank)
    cfg = build.config
    options = {"enable_fp_fusion": False, **({"maxnreg": build.maxnreg} if build.maxnreg else {})}
    if build.kernel in ("skinny", "skinny_m"):
        args = dict(x_ptr=act(), **weight, a_ptr=act(), b_ptr=act(), bias_ptr=act(), s_ptr=act(), y_ptr=act(),
                    partial_y_ptr=f32(), partial_s_ptr=f32(), counter_ptr=torch.empty(16, dtype=torch.int32),
                    **sizes, scale=2.0, seed_ptr=seed, p=0.1, HAS_BIAS=True, HAS_DROPOUT=False, R_PAD=r_pad,
                    DOT_PRECISION=precision, SPLIT_K=4, S_FIRST=False, SCALE_WEIGHTS=False,
                    LORA_CHUNKS=nf4_skinny.lora_chunks(cfg["BLOCK_K"], r_pad, weight["BLOCKSIZE"]), EVEN_N=True,
                    EVEN_K=True)
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
        args = dict(**words, a_ptr=act(), b_ptr=act(), out_ptr=act(), N=4096, K=4096, R=rank, scale=2.0,
                    ROWS_PER_PROGRAM=nf4_dequant.MERGED_ROWS_PER_PROGRAM, R_PAD=r_pad, DOT_PRECISION=precision,
                    **cfg)
        return nf4_dequant._dequant_merged_kernel, args, cfg["BLOCK_N"] * cfg["BLOCK_K"], options
    if build.kernel == "fused":
        args = dict(x_ptr=act(), **weight, a_ptr=act(), b_ptr=act(), bias_ptr=act(), s_ptr=act(), y_ptr=act(),
                    **sizes, M_BUCKET=512, scale=2.0, seed_ptr=seed, p=0.1, HAS_BIAS=False, HAS_DROPOUT=False,
                    R_PAD=r_pad, DOT_PRECISION=precision, **cfg)
        return fused._fused_forward_kernel, args, cfg["BLOCK_N"] * cfg["BLOCK_K"], options
    if build.kernel == "dx":
        args = dict(dy_ptr=act(), g_ptr=act(), a_ptr=act(), dx_ptr=act(), **weight, scale=2.0, seed_ptr=seed,
                    dropout_p=0.1, M=333, N=4096, K=4096, R=rank, M_BUCKET=512, R_PAD=r_pad,
                    HAS_DROPOUT=False, EVEN_M=333 % cfg["BLOCK_M"] == 0, EVEN_N=4096 % cfg["BLOCK_N"] == 0,
                    EVEN_K=4096 % cfg["BLOCK_K"] == 0, **cfg)
        return lora_dx._lora_dx_kernel, args, cfg["BLOCK_N"] * cfg["BLOCK_K"], options
    if build.kernel == "s":  # with dropout, the case the default forward launches it for
        args = dict(x_ptr=act(), a_ptr=act(), s_ptr=act(), M=333, K=4096, R=rank, seed_ptr=seed, p=0.1,
                    HAS_DROPOUT=True, R_PAD=r_pad, DOT_PRECISION=precision, **cfg)
        return lora_s._lora_s_kernel, args, cfg["BLOCK_M"] * cfg["BLOCK_K"], options
    if build.kernel == "uniform":
        args = dict(out_ptr=f32(), seed_ptr=seed, M=333, K=4096, **cfg)
        return dropout._uniform_kernel, args, cfg["BLOCK_M"] * cfg["BLOCK_K"], options
    if build.kernel == "multi_shrink":
        args = dict(x_ptr=act(), a_ptr=act(), ids_ptr=ids, s_ptr=act(), K=4096, R=rank, R_PAD=r_pad, **cfg)
        return lora_multi._shrink_kernel, args, cfg["BLOCK_K"], options
    if build.kernel == "multi_expand":
        args = dict(s_ptr=act(), b_ptr=act(), ids_ptr=ids, scale_ptr=f32(), y_ptr=act(), N=4096, R=rank, R_PAD=r_pad,
                    **cfg)
        return lora_multi._expand_kernel, args, cfg["BLOCK_N"], options
    raise KeyError(build.kernel)


# ----------------------------------------------------------------------------- compiling
def compile_row(build: Build, arch: int, dispatched: bool, offered: bool) -> dict:
    """One row of the report (errors become a row with ``error`` set)."""
    import triton

    from ..ops import configs
    from .static_analysis import analyze, compile_kernel

    limits = configs.named_archs()[arch]
    # the instruction budgets were set for Hopper's half-precision code; fp32 (FMA dots) is reported only
    budgeted = arch == BUDGET_ARCH and build.variant["dtype"] != "fp32" and build.kernel in BUDGETS
    budget = BUDGETS[build.kernel] if budgeted else Budget(spills=None, wgmma_serialized=True)
    row = dict(kernel=build.kernel, config=build.config_text(), variant=build.variant_text(), arch=f"sm_{arch}",
               triton=triton.__version__, smem_limit=limits.smem_per_block, smem_estimate=smem_estimate(build),
               offered=offered, dispatched=dispatched, budget=budget.text(), error="")
    try:
        fn, args, elems, options = _kernel_args(build)
        compiled, log = compile_kernel(fn, args, build.num_warps, build.num_stages, arch, options)
        result = analyze(compiled, log, elems, build.num_warps, fn, sass=arch == BUDGET_ARCH)
        row.update(regs=result.regs, spills=result.spill_bytes, smem_bytes=result.smem_bytes,
                   fits=limits.fits(result.smem_bytes, result.regs, build.num_warps),
                   loop_ptx_per_weight_elem=result.loop_ptx_per_weight_elem,
                   loop_sass_per_weight_elem=result.loop_sass_per_weight_elem,
                   loop_shared_ops_per_weight_elem=result.loop_shared_ops_per_weight_elem,
                   wgmma_serialized=result.wgmma_serialized,
                   weight_operand_from_registers=result.weight_operand_from_registers,
                   wgmma_waits_each_step=result.wgmma_waits_each_step,
                   lut_global_gathers=result.lut_global_gathers, has_loop=result.has_loop,
                   top_opcodes=result.top_opcodes)
        misses = budget.misses(row) if dispatched else []
        row["within_budget"] = not budget.misses(row)
        row["error"] = "; ".join(problems(row, build) + (["over budget: " + "; ".join(misses)] if misses else []))
    except Exception as exc:  # noqa: BLE001 - a failed compile is a row of the report
        row.update(fits=False, within_budget=False,
                   error=f"compile failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}")
    return row


def problems(row: dict, build: Build) -> list[str]:
    """What makes an offered row fail the report beside its instruction budget."""
    if not row["offered"]:
        return []
    out = []
    if not row["fits"]:
        out.append(f"offered but does not fit sm_{row['arch'].removeprefix('sm_')}: {row['smem_bytes']} B of shared "
                   f"memory (limit {row['smem_limit']}), {row['regs']} registers x {32 * build.num_warps} threads")
    if row["smem_estimate"] and row["smem_bytes"] > row["smem_estimate"]:
        out.append(f"shared memory {row['smem_bytes']} B above the kernel's estimate {row['smem_estimate']} B")
    if row["dispatched"] and build.variant["dtype"] != "fp32" and row["spills"]:
        out.append(f"dispatched {build.variant['dtype']} config spills {row['spills']} B")
    return out


def _init_worker(cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # fresh: a cached kernel prints no ptxas log
    from triton import knobs

    knobs.cache.dir = cache_dir
    knobs.runtime.interpret = False


def _jobs(quick: bool) -> list[tuple[Build, int, bool, bool]]:
    from ..ops import configs

    dispatched = dispatched_kernels()
    jobs = []
    for arch, limits in configs.named_archs().items():
        for b in builds(quick, arch):
            jobs.append((b, arch, is_dispatched(b, dispatched, limits), is_offered(b, limits)))
    return jobs


@contextlib.contextmanager
def _without_interpreter_switch():
    """``TRITON_INTERPRET`` out of the environment while compile workers start (they inherit it): a worker
    imports the package, which may import triton, before its initializer runs, and triton fixes its
    interpreter switch when it is first imported."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _compile_all(jobs: list[tuple[Build, int, bool, bool]], workers: int) -> list[dict]:
    # Fresh interpreters (spawn): a process that imported the kernels under TRITON_INTERPRET=1
    # (the test run) holds interpreter functions, which cannot be compiled for a GPU.
    with tempfile.TemporaryDirectory(prefix="lora_triton_static_") as cache, _without_interpreter_switch(), \
            ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                initargs=(cache,)) as pool:
        return list(pool.map(_compile_job, jobs, chunksize=1))


def _compile_job(job: tuple[Build, int, bool, bool]) -> dict:
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
    """Rows for every build, arch and triton version in ``versions`` (``installed`` = this one)."""
    rows = []
    for version in versions:
        if version in ("installed", installed_triton_version()):
            rows += _compile_all(_jobs(quick), workers)
        else:
            rows += _rows_with_other_triton(version, quick, workers, cache)
    return rows


def failures(rows: list[dict]) -> list[dict]:
    """Rows that fail the report: an offered config that does not fit its arch, exceeds its shared-memory
    estimate or (bf16/fp16, dispatched) spills; a dispatched sm_90 compile over its budget; an offered
    config that does not compile."""
    return [r for r in rows if r["error"] and (r["offered"] or r["dispatched"])]


def print_report(rows: list[dict]) -> None:
    header = (f"{'kernel':<14} {'config':<40} {'variant':<28} {'arch':<5} {'triton':<6} {'regs':>4} {'spill':>5} "
              f"{'smem KB':>7} {'est KB':>6} {'fits':>4} {'offr':>4} {'disp':>4} {'ptx/el':>6} {'wait0':>5}  notes")
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.get("regs") is None and r["error"].startswith("compile failed"):
            print(f"{r['kernel']:<14} {r['config']:<40} {r['variant']:<28} {r['arch']:<5} {r['triton']:<6} {r['error']}")
            continue
        yes = lambda flag: "yes" if flag else "no"  # noqa: E731
        mark = "FAIL " if r["error"] and (r["offered"] or r["dispatched"]) else ""
        print(f"{r['kernel']:<14} {r['config']:<40} {r['variant']:<28} {r['arch']:<5} {r['triton']:<6} "
              f"{r['regs'] or '':>4} {r['spills']:>5} {r['smem_bytes'] / 1024:>7.1f} {r['smem_estimate'] / 1024:>6.1f} "
              f"{yes(r['fits']):>4} {yes(r['offered']):>4} {yes(r['dispatched']):>4} "
              f"{r['loop_ptx_per_weight_elem']:>6.2f} {str(r['wgmma_waits_each_step'])[:5]:>5}  {mark}{r['error']}")


def run_static(out_dir: str, quick: bool, versions: list[str] | None = None, workers: int | None = None,
               cache: str | None = None) -> int:
    """Write ``out_dir/static.csv``, print the report; 1 when a row fails it (``failures``)."""
    from .report import write_csv

    versions = versions or (["installed"] if quick else ["3.6.0", "installed"])
    workers = workers or os.cpu_count() or 1
    cache = cache or os.path.join(os.path.expanduser("~"), ".cache", "lora-triton")
    rows = report_rows(quick, versions, workers, cache)
    write_csv(os.path.join(out_dir, "static.csv"), rows, FIELDS)
    print_report(rows)
    bad = failures(rows)
    archs = sorted({r["arch"] for r in rows})
    print(f"\nstatic: {len(rows)} compiles for {', '.join(archs)}, wrote {os.path.join(out_dir, 'static.csv')}; "
          f"{len(bad)} failing row(s)")
    for r in bad:
        print(f"  FAIL {r['kernel']} {r['config']} {r['variant']} {r['arch']} triton {r['triton']}: {r['error']}")
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
        print(json.dumps(_compile_all(_jobs(args.quick), args.jobs or os.cpu_count())))
        return 0
    return run_static(args.out, args.quick, workers=args.jobs)


if __name__ == "__main__":
    sys.exit(main())
