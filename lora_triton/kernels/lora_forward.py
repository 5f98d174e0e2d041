"""Forward of the QLoRA layer in Triton: ``y = x @ dequant(W)^T + s * S @ B^T + b``, ``S = drop(x) @ A^T``.

Shapes and dtypes: ``x [M, K]``, NF4 ``W [N, K]`` (bitsandbytes' packed layout, plain or
double-quantized absmax), ``A [r, K]``, ``B [N, r]``, ``b [N]``; activations, adapter and bias
share one dtype (fp16, bf16 or fp32); accumulation is fp32; ``y [M, N]`` and ``S [M, r]`` come
back in ``x``'s dtype. Ranks 1..128 for the tile kernels (``RANK_LIMITED``: padded inside to a
power of two >= 16, masked), any rank for ``dequant`` and ``merged``. ``K`` must
be a multiple of the NF4 block size (kernels read whole blocks); other weights use the
plain-torch path (``method="torch"``; ``"reference"`` is its old name, still accepted).

The candidates compute the same thing (shared/DESIGN.md asks to measure, not assume):

``fused``    one kernel: NF4 tile decoded in registers inside the K loop, ``S`` accumulated in
             the same loop (``r / BLOCK_N`` extra MMA work per N tile), LoRA and bias added in
             the epilogue. No dequantized ``W`` ever reaches memory.
``split``    ``S`` first in a small kernel, then the fused kernel reads it in its epilogue
             (reads ``x`` twice, no redundant MMA).
``decode``   small ``M``: split-K over a grid of ``(N tiles, K splits)`` so a few rows still
             fill the GPU; fp32 partials are atomically added, a small epilogue kernel adds
             LoRA and bias and casts. Memory-bound: each packed byte is read once.
``dequant``  a Triton kernel dequantizes ``W`` to a dense ``x.dtype`` tensor (``nf4_dequant``),
             then cuBLAS: ``F.linear``, ``S = x @ A^T`` (the ``S`` kernel when there is
             dropout) and one ``addmm`` for LoRA (what bitsandbytes + PEFT do, minus their
             separate dropout and scaling passes).
``merged``   large M (issue 14, item 3): one kernel writes ``W + s * B @ A`` (``nf4_dequant``), then
             one cuBLAS ``F.linear`` with the bias gives ``y``: the LoRA term rides in the base GEMM
             instead of an ``addmm`` pass over ``[M, N]``; ``S = x @ A^T`` for the backward. Without
             dropout only (with it ``drop(x) @ A^T`` is not ``x @ A^T``): with dropout it runs ``dequant``.
``skinny``   decode-size kernel (``nf4_skinny``): swap-AB, split-K, deterministic reduction,
             LoRA and bias in the same launch.

Which one runs is decided in ``ops/dispatch.py`` (measured tables); this module runs the one it
is told to. All kernels read ``W`` through ``nf4_decode`` (the code table in
registers, one absmax load per block) and dropout through ``dropout.dropout_scale``, so every
candidate sees the same ``W`` and the same mask for a seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..format import NF4Weight
from .checks import check_nf4_weight, check_tensor, nf4_kernel_args
from .dropout import dropout_scale
from .nf4_decode import code_table, load_nf4_tile
from .nf4_dequant import dequantize_nf4, dequantize_nf4_merged
from .nf4_skinny import check_config, launch_skinny, skinny_fits, split_k_for, split_k_range
from .runtime import (GpuLimits, can_launch, default_table, gpu_limits, interpreting, kernel_dtype, m_bucket,
                      launch_first_fitting, multiprocessors, on_device, padded_rank, pipelined_smem, require_launchable)

METHODS = ("fused", "split", "decode", "dequant", "merged", "skinny")
"""Kernel candidates of the forward (``"torch"`` is also accepted: plain torch)."""
#: Names of the plain-torch path: ``"torch"`` and its old name.
TORCH_METHODS = ("torch", "reference")

#: Largest adapter rank of the candidates that hold a ``[.., R_PAD]`` rank tile in registers
#: (``RANK_LIMITED``); ``dequant`` and ``merged`` take any rank.
MAX_RANK = 128
RANK_LIMITED = ("fused", "split", "decode", "skinny")


# ====================================================================== configs
def autotuning() -> bool:
    """False under the interpreter, or on a GPU when ``LORA_TRITON_AUTOTUNE=0`` (the GPU test run,
    which would otherwise compile every config for every constexpr combination it covers).
    Read at launch time, never at import."""
    return not interpreting() and os.environ.get("LORA_TRITON_AUTOTUNE", "1") != "0"


#: The one config each autotuned kernel runs under the interpreter (autotuning more than one
#: config fails on CPU, shared/TRITON_CPU.md).
INTERPRETER_CONFIGS = {"fused": {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4},
                       "decode": {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2}}


def _fused_configs() -> list[triton.Config]:
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps): matmul-tutorial tiles for Hopper, small-M ones, and
        # two that fit the 99 KB of an sm_86 / sm_89 block at rank 128 (the larger ones do not)
        (128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (64, 256, 64, 4, 8), (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4), (32, 128, 128, 3, 4), (16, 128, 128, 3, 4), (64, 64, 64, 3, 4), (32, 64, 64, 2, 4),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in shapes]


def _decode_configs() -> list[triton.Config]:
    shapes = [(64, 128, 4), (64, 256, 2), (32, 256, 4), (128, 128, 2), (32, 128, 8), (64, 256, 1)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_stages=3, num_warps=4)
            for bn, bk, sk in shapes]


def tuned_configs(name: str) -> list[triton.Config]:
    """Every config the autotuner of the ``fused`` (and ``split``) or ``decode`` kernel may time, before
    the per-GPU pruning (``offered_configs``)."""
    return {"fused": _fused_configs, "decode": _decode_configs}[name]()


#: The config each autotuned kernel runs on a GPU without autotuning (``LORA_TRITON_AUTOTUNE=0``, the GPU
#: test run): the first of these that fits the GPU (``fixed_gpu_config``).
FIXED_GPU_PREFERENCE = {
    "fused": [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=4),
              triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=2, num_warps=4),
              triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=1, num_warps=4)],
    "decode": [triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4}, num_stages=3, num_warps=4),
               triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 4}, num_stages=2, num_warps=4),
               triton.Config({"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 4}, num_stages=1, num_warps=4)],
}


def tile_kernel_smem(name: str, config: dict, stages: int, elem_bytes: int, r_pad: int, single_pass: bool = True) -> int:
    """Upper bound of the shared memory of the ``fused`` tile kernel (``single_pass=False``: ``split``) or
    the ``decode`` partial kernel for ``config`` (its ``BLOCK_*``), activations of ``elem_bytes`` and
    padded rank ``r_pad``. Per stage the loop loads the x tile and the packed weight tile (half a byte
    per element, its scales 1/4 byte per element at block size 32), and, for ``fused``, the
    ``[BLOCK_K, r_pad]`` tile of A; ``decode`` reads A only in its first N tile, unpipelined. Once: the
    decoded weight tile as a dot operand."""
    bm, bn, bk = config.get("BLOCK_M", 16), config["BLOCK_N"], config["BLOCK_K"]
    stage = bm * bk * elem_bytes + bn * bk // 2 + bn * bk // 4
    once = bn * bk * elem_bytes
    if name == "decode":
        once += bk * r_pad * elem_bytes
    elif single_pass:
        stage += bk * r_pad * elem_bytes
    return pipelined_smem(stages, stage, once)


def _fits(limits: GpuLimits | None, smem: int, num_warps: int) -> bool:
    return limits is None or limits.fits(smem, None, num_warps)


def offered_configs(name: str, elem_bytes: int, r_pad: int, limits: GpuLimits | None,
                    single_pass: bool = True) -> list[triton.Config]:
    """The configs of ``tuned_configs(name)`` that fit a GPU with ``limits`` (all of them for None)."""
    return [c for c in tuned_configs(name)
            if _fits(limits, tile_kernel_smem(name, c.kwargs, c.num_stages, elem_bytes, r_pad, single_pass),
                     c.num_warps)]


def fixed_gpu_configs(name: str, elem_bytes: int, r_pad: int, limits: GpuLimits | None,
                      single_pass: bool = True) -> list[triton.Config]:
    """The configs ``name`` tries, in order, without autotuning on a GPU with ``limits``:
    ``FIXED_GPU_PREFERENCE[name]`` from the first whose shared-memory bound fits."""
    preference = FIXED_GPU_PREFERENCE[name]
    for i, config in enumerate(preference):
        if _fits(limits, tile_kernel_smem(name, config.kwargs, config.num_stages, elem_bytes, r_pad, single_pass),
                 config.num_warps):
            return preference[i:]
    return preference[-1:]


def fixed_gpu_config(name: str, elem_bytes: int, r_pad: int, limits: GpuLimits | None,
                     single_pass: bool = True) -> triton.Config:
    """The config ``name`` launches first without autotuning on a GPU with ``limits``."""
    return fixed_gpu_configs(name, elem_bytes, r_pad, limits, single_pass)[0]


def _prune_to_legal(configs, named_args, **kwargs):
    """Drop tiles a shape cannot use (dot K-dims under 16, tiles far larger than M, N or K) and tiles
    that do not fit the GPU of the launch (``offered_configs``). Keeps the smallest config if nothing
    survives."""
    m, n, k = (named_args.get(name, 1) for name in ("M", "N", "K"))
    x = named_args.get("x_ptr")
    device = getattr(x, "device", None)
    limits = gpu_limits(device) if device is not None else None
    elem_bytes = x.element_size() if x is not None else 2
    r_pad = kwargs.get("R_PAD", named_args.get("R_PAD", 16))
    name = "decode" if "SPLIT_K" in configs[0].kwargs else "fused"
    single_pass = kwargs.get("SINGLE_PASS", named_args.get("SINGLE_PASS", True))
    fitting = [c for c in configs
               if _fits(limits, tile_kernel_smem(name, c.kwargs, c.num_stages, elem_bytes, r_pad, single_pass),
                        c.num_warps)]
    configs = fitting or [min(configs, key=lambda c: tile_kernel_smem(name, c.kwargs, c.num_stages, elem_bytes, r_pad,
                                                                      single_pass))]
    cap = lambda size: max(16, triton.next_power_of_2(size))  # noqa: E731
    legal = [c for c in configs
             if c.kwargs["BLOCK_K"] >= 16 and c.kwargs["BLOCK_K"] <= cap(k)
             and c.kwargs.get("BLOCK_M", 16) <= cap(m) and c.kwargs["BLOCK_N"] <= cap(n)]
    if legal:
        return legal
    return [min(configs, key=lambda c: c.kwargs.get("BLOCK_M", 16) * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


def _bench_quietly(fn, quantiles):
    """Autotune timing: shorter than do_bench's defaults so the benchmark fits its budget."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_AUTOTUNE = dict(prune_configs_by={"early_config_prune": _prune_to_legal}, do_bench=_bench_quietly)

#: Tiles of the S kernel ``(BLOCK_M, BLOCK_K, num_stages)`` in order of preference, per (activation
#: bytes, largest padded rank): compiled for sm_80..sm_90 by the static report, these keep the
#: half-precision tiles free of spills (the 64x128 tile spills at rank 128 on sm_80) and fit every
#: named GPU from the second entry on (the first, 57-139 KB, only where the estimate says it fits).
#: The kernel is light (it reads x once and A per row block), so a smaller tile costs little.
S_TILES: dict[tuple[int, int], tuple[tuple[int, int, int], ...]] = {
    (2, 64): ((64, 128, 3), (32, 64, 3), (16, 32, 1)),
    (2, 128): ((32, 64, 3), (16, 32, 1)),
    (4, 64): ((32, 64, 3), (16, 32, 1)),
    (4, 128): ((16, 32, 1),),
}
S_WARPS = 4
S_INTERPRETER_TILE = (32, 64, 1)


def s_kernel_smem(block_m: int, block_k: int, stages: int, elem_bytes: int, r_pad: int) -> int:
    """Upper bound of the S kernel's shared memory: per stage the x tile and the ``[BLOCK_K, r_pad]``
    tile of A; outside the pipeline the dropout-scaled x tile's layout conversion."""
    return pipelined_smem(stages, (block_m * block_k + block_k * r_pad) * elem_bytes, block_m * block_k * elem_bytes)


def s_kernel_tiles(elem_bytes: int, r_pad: int, limits: GpuLimits | None) -> tuple[tuple[int, int, int], ...]:
    """The S kernel's tiles for activations of ``elem_bytes`` and padded rank ``r_pad`` on a GPU with
    ``limits``, in the order the launcher tries them: ``S_TILES`` from the first whose shared-memory
    bound fits (the launcher moves on should Triton still find one too large)."""
    tiles = S_TILES[(min(elem_bytes, 4), 64 if r_pad <= 64 else 128)]
    for i, tile in enumerate(tiles):
        if _fits(limits, s_kernel_smem(*tile, elem_bytes, r_pad), S_WARPS):
            return tiles[i:]
    return tiles[-1:]


def s_kernel_tile(elem_bytes: int, r_pad: int, limits: GpuLimits | None) -> tuple[int, int, int]:
    """The tile the S kernel launches with first on a GPU with ``limits`` (``s_kernel_tiles``)."""
    return s_kernel_tiles(elem_bytes, r_pad, limits)[0]


def _epilogue_block_n() -> int:
    return 64 if interpreting() else 128


# Ints that only enter masks, seeds or autotune keys: one compiled kernel for every value
# (Triton would otherwise recompile for M == 1, M % 16 == 0 and the rest).
_NOT_SPECIALIZED = ["M", "R", "M_BUCKET", "seed"]


# ====================================================================== shared jit pieces
@triton.jit
def _load_x_tile(x_ptr, offs_m, offs_k, M, K):
    """``x[offs_m, offs_k]`` ``[len(offs_m), len(offs_k)]``, 0 outside (contiguous rows)."""
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    return tl.load(x_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], mask=mask, other=0.0)


@triton.jit
def _nf4_dot_step(acc, x, packed_ptr, table, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                  offset, offs_n, k0, N, K,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                  DOUBLE_QUANT: tl.constexpr, DOT_PRECISION: tl.constexpr, TABLE: tl.constexpr):
    """``acc [BM, BN] += x [BM, BK] @ W[offs_n, k0:k0+BK]^T``; the NF4 tile is decoded in
    registers and cast to x's dtype for the MMA."""
    w = load_nf4_tile(packed_ptr, table, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                      offs_n, k0, N, K, BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, TABLE)
    return tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)


@triton.jit
def _lora_s_step(s_acc, x, a_ptr, offs_m, offs_r, offs_k, R, K, seed, p,
                 HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``s_acc [BM, R_PAD] += drop(x) [BM, BK] @ A[:, offs_k]^T``."""
    if HAS_DROPOUT:
        x = x * dropout_scale(seed, offs_m, offs_k, K, p).to(x.dtype)
    mask = (offs_k[:, None] < K) & (offs_r[None, :] < R)
    a_t = tl.load(a_ptr + offs_r[None, :].to(tl.int64) * K + offs_k[:, None], mask=mask, other=0.0)  # [BK, R_PAD]
    return tl.dot(x, a_t, s_acc, input_precision=DOT_PRECISION)


@triton.jit
def _s_tile_ptrs(s_ptr, offs_m, offs_r, M, R):
    return s_ptr + offs_m[:, None].to(tl.int64) * R + offs_r[None, :], (offs_m[:, None] < M) & (offs_r[None, :] < R)


@triton.jit
def _lora_epilogue(acc, s, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, offs_r, M, N, R, scale,
                   HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Store ``y = acc + scale * s @ B[offs_n]^T (+ bias)`` in y's dtype; ``s [BM, R_PAD]`` is in
    x's dtype (``S`` is rounded to it before the B product, as the reference does)."""
    b_mask = (offs_r[:, None] < R) & (offs_n[None, :] < N)
    b_t = tl.load(b_ptr + offs_n[None, :].to(tl.int64) * R + offs_r[:, None], mask=b_mask, other=0.0)
    acc += scale * tl.dot(s, b_t, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M row tiles share their W column tiles in L2."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


# ====================================================================== kernels
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _fused_forward_kernel(
        x_ptr, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
        a_ptr, b_ptr, bias_ptr, s_ptr, y_ptr,
        M, N, K, R, M_BUCKET, scale, seed, p,
        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, SINGLE_PASS: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
        TABLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``y``. SINGLE_PASS: accumulate ``S`` in the K loop and
    store it (from the first N tile); otherwise read the ``S`` the S kernel wrote."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    table = code_table(code_ptr, TABLE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _load_x_tile(x_ptr, offs_m, offs_k, M, K)
        acc = _nf4_dot_step(acc, x, packed_ptr, table, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                            offset, offs_n, k0, N, K, BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, DOT_PRECISION,
                            TABLE)
        if SINGLE_PASS:
            s_acc = _lora_s_step(s_acc, x, a_ptr, offs_m, offs_r, offs_k, R, K, seed, p,
                                 HAS_DROPOUT, DOT_PRECISION)
    s_ptrs, s_mask = _s_tile_ptrs(s_ptr, offs_m, offs_r, M, R)
    if SINGLE_PASS:
        s = s_acc.to(s_ptr.dtype.element_ty)
        if pid_n == 0:
            tl.store(s_ptrs, s, mask=s_mask)
    else:
        s = tl.load(s_ptrs, mask=s_mask, other=0.0)
    _lora_epilogue(acc, s, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, offs_r, M, N, R, scale, HAS_BIAS, DOT_PRECISION)


@triton.jit(do_not_specialize=["M", "R", "seed"])
def _lora_s_kernel(x_ptr, a_ptr, s_ptr, M, K, R, seed, p,
                   HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``S[rows] = drop(x[rows]) @ A^T`` for one block of BLOCK_M rows, stored in S's dtype."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    s_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _load_x_tile(x_ptr, offs_m, offs_k, M, K)
        s_acc = _lora_s_step(s_acc, x, a_ptr, offs_m, offs_r, offs_k, R, K, seed, p, HAS_DROPOUT, DOT_PRECISION)
    s_ptrs, s_mask = _s_tile_ptrs(s_ptr, offs_m, offs_r, M, R)
    tl.store(s_ptrs, s_acc.to(s_ptr.dtype.element_ty), mask=s_mask)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _decode_partial_kernel(
        x_ptr, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
        a_ptr, y32_ptr, s32_ptr,
        M, N, K, R, M_BUCKET, seed, p,
        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
        DOT_PRECISION: tl.constexpr, TABLE: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Split-K partial sums for small M: program ``(n, k, m)`` adds ``x @ W^T`` over its K range
    into the zeroed fp32 ``y32 [M, N]``; programs of the first N tile also add their part of
    ``S`` into the zeroed fp32 ``s32 [M, r]``."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k_begin, k_end = split_k_range(pid_k, K, BLOCK_K, SPLIT_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    table = code_table(code_ptr, TABLE)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _load_x_tile(x_ptr, offs_m, offs_k, M, K)
        acc = _nf4_dot_step(acc, x, packed_ptr, table, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                            offset, offs_n, k0, N, K, BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, DOT_PRECISION,
                            TABLE)
        if pid_n == 0:
            s_acc = _lora_s_step(s_acc, x, a_ptr, offs_m, offs_r, offs_k, R, K, seed, p, HAS_DROPOUT, DOT_PRECISION)
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.atomic_add(y32_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc, mask=y_mask)
    s_ptrs, s_mask = _s_tile_ptrs(s32_ptr, offs_m, offs_r, M, R)
    if pid_n == 0:
        tl.atomic_add(s_ptrs, s_acc, mask=s_mask)


@triton.jit
def _decode_epilogue_kernel(y32_ptr, s32_ptr, b_ptr, bias_ptr, s_ptr, y_ptr, M, N, R, scale,
                            HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``y = y32 + scale * S @ B^T (+ bias)`` and ``S = s32`` cast to the output dtype."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    acc = tl.load(y32_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], mask=y_mask, other=0.0)
    s32_ptrs, s_mask = _s_tile_ptrs(s32_ptr, offs_m, offs_r, M, R)
    s = tl.load(s32_ptrs, mask=s_mask, other=0.0).to(s_ptr.dtype.element_ty)
    s_ptrs, _ = _s_tile_ptrs(s_ptr, offs_m, offs_r, M, R)
    if pid_n == 0:
        tl.store(s_ptrs, s, mask=s_mask)
    _lora_epilogue(acc, s, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, offs_r, M, N, R, scale, HAS_BIAS, DOT_PRECISION)


_fused_autotuned = triton.autotune(configs=_fused_configs(), key=["M_BUCKET", "N", "K", "R_PAD", "SINGLE_PASS"],
                                   **_AUTOTUNE)(_fused_forward_kernel)
_decode_autotuned = triton.autotune(configs=_decode_configs(), key=["M_BUCKET", "N", "K", "R_PAD"],
                                    reset_to_zero=["y32_ptr", "s32_ptr"], **_AUTOTUNE)(_decode_partial_kernel)


def _run_tunable(name: str, kernel, tuned, grid, x: torch.Tensor, *args, **meta) -> None:
    """Launch ``kernel`` (its first argument ``x``) autotuned on a GPU over the configs that fit it, or
    with one fixed config: the interpreter's, or on a GPU test run (``LORA_TRITON_AUTOTUNE=0``) the one
    ``fixed_gpu_config`` picks for the GPU."""
    if autotuning():
        tuned[grid](x, *args, **meta, enable_fp_fusion=False)
    elif interpreting():
        kernel[grid](x, *args, **meta, **INTERPRETER_CONFIGS[name])
    else:
        configs = fixed_gpu_configs(name, x.element_size(), meta["R_PAD"], gpu_limits(x.device),
                                    meta.get("SINGLE_PASS", True))
        launch = lambda cfg: kernel[grid](x, *args, **meta, **cfg.kwargs, num_warps=cfg.num_warps,  # noqa: E731
                                          num_stages=cfg.num_stages, enable_fp_fusion=False)
        launch_first_fitting((name, x.device, x.dtype, tuple(sorted(meta.items()))), configs, launch)


# ====================================================================== launchers
@dataclass(frozen=True)
class Operands:
    """Validated operands in the dtype the kernels see (bf16 widened under the interpreter)."""

    x: torch.Tensor
    weight: NF4Weight
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    dropout_p: float
    seed: int

    @property
    def m(self) -> int:
        return self.x.shape[0]

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    @property
    def k(self) -> int:
        return self.weight.shape[1]

    @property
    def r(self) -> int:
        return self.lora_a.shape[0]

    def new_outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Uninitialised ``y [M, N]`` and ``S [M, r]`` in the kernels' dtype."""
        return (_new_output((self.m, self.n), self.x.dtype, self.x.device),
                _new_output((self.m, self.r), self.x.dtype, self.x.device))

    def weight_args(self) -> tuple:
        return nf4_kernel_args(self.weight)

    def bias_arg(self) -> torch.Tensor:
        """The bias pointer (any tensor when there is no bias: HAS_BIAS=False never reads it)."""
        return self.x if self.bias is None else self.bias

    def meta(self) -> dict:
        """Constexprs every kernel of this problem shares."""
        return dict(R_PAD=padded_rank(self.r),
                    DOT_PRECISION="ieee" if self.x.dtype == torch.float32 else "tf32")

    def weight_meta(self) -> dict:
        return dict(BLOCKSIZE=self.weight.blocksize, DOUBLE_QUANT=self.weight.double_quant,
                    TABLE=default_table(self.x.device))


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel must fill completely comes from here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch_s(op: Operands) -> torch.Tensor:
    """``S = drop(x) @ A^T`` ``[M, r]`` through the S kernel, its tile chosen for the GPU (``s_kernel_tiles``)."""
    s = _new_output((op.m, op.r), op.x.dtype, op.x.device)
    r_pad = padded_rank(op.r)

    def launch(tile: tuple[int, int, int]) -> torch.Tensor:
        block_m, block_k, stages = tile
        _lora_s_kernel[(triton.cdiv(op.m, block_m),)](
            op.x, op.lora_a, s, op.m, op.k, op.r, op.seed, op.dropout_p, HAS_DROPOUT=op.dropout_p > 0,
            BLOCK_M=block_m, BLOCK_K=block_k, num_warps=S_WARPS, num_stages=stages, **op.meta())
        return s

    if interpreting():
        return launch(S_INTERPRETER_TILE)
    tiles = s_kernel_tiles(op.x.element_size(), r_pad, gpu_limits(op.x.device))
    return launch_first_fitting(("s", op.x.device, op.x.dtype, r_pad, op.dropout_p > 0), tiles, launch)


def _launch_fused_kernel(op: Operands, single_pass: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if single_pass:
        y, s = op.new_outputs()
    else:
        y, s = op.new_outputs()[0], _launch_s(op)
    grid = lambda meta: (triton.cdiv(op.m, meta["BLOCK_M"]) * triton.cdiv(op.n, meta["BLOCK_N"]),)  # noqa: E731
    _run_tunable("fused", _fused_forward_kernel, _fused_autotuned, grid,
                 op.x, *op.weight_args(), op.lora_a, op.lora_b, op.bias_arg(), s, y,
                 op.m, op.n, op.k, op.r, m_bucket(op.m), op.scale, op.seed, op.dropout_p,
                 SINGLE_PASS=single_pass, HAS_BIAS=op.bias is not None, HAS_DROPOUT=op.dropout_p > 0,
                 **op.weight_meta(), **op.meta())
    return y, s


def _launch_fused(op: Operands, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fused_kernel(op, single_pass=True)


def _launch_split(op: Operands, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fused_kernel(op, single_pass=False)


def _launch_decode(op: Operands, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    block_m = 16  # tl.dot's smallest tile; decode rows beyond 16 get more M programs
    work = torch.zeros(op.m * (op.n + op.r), dtype=torch.float32, device=op.x.device)  # one memset for both
    y32, s32 = work[: op.m * op.n].view(op.m, op.n), work[op.m * op.n:].view(op.m, op.r)
    grid = lambda meta: (triton.cdiv(op.n, meta["BLOCK_N"]), meta["SPLIT_K"], triton.cdiv(op.m, block_m))  # noqa: E731
    _run_tunable("decode", _decode_partial_kernel, _decode_autotuned, grid,
                 op.x, *op.weight_args(), op.lora_a, y32, s32, op.m, op.n, op.k, op.r, m_bucket(op.m),
                 op.seed, op.dropout_p, HAS_DROPOUT=op.dropout_p > 0, BLOCK_M=block_m, **op.weight_meta(),
                 **op.meta())
    y, s = op.new_outputs()
    block_n = _epilogue_block_n()
    _decode_epilogue_kernel[(triton.cdiv(op.n, block_n), triton.cdiv(op.m, block_m))](
        y32, s32, op.lora_b, op.bias_arg(), s, y, op.m, op.n, op.r, op.scale, HAS_BIAS=op.bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, **op.meta())
    return y, s


def _launch_dequant(op: Operands, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    w = dequantize_nf4(op.weight, op.x.dtype)
    s = _launch_s(op) if op.dropout_p > 0 else op.x @ op.lora_a.t()  # the S kernel only for dropout
    y = F.linear(op.x, w, op.bias)
    y.addmm_(s, op.lora_b.t(), alpha=op.scale)
    return y, s


def _launch_merged(op: Operands, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if op.dropout_p > 0:  # the merged weight computes x @ A^T, not drop(x) @ A^T
        return _launch_dequant(op)
    w = dequantize_nf4_merged(op.weight, op.lora_a, op.lora_b, op.scale, op.x.dtype)
    return F.linear(op.x, w, op.bias), op.x @ op.lora_a.t()


#: The skinny kernel's config when the caller names none: the tile that keeps the static report's
#: register, spill and C7515 budgets on triton 3.6 and 3.9 at rank 16 (bench/RESULTS.md); the
#: register cap only up to ``SKINNY_CAPPED_MAX_RANK`` (above it the cap spills). Under the
#: interpreter, a small tile.
SKINNY_DEFAULT = dict(block_m=16, block_n=128, block_k=128, num_warps=8, num_stages=2, maxnreg=128, s_first=False)
SKINNY_CAPPED_MAX_RANK = 16
#: The default above ``SKINNY_DECODE_MAX_M`` tokens (medium M, issue 14): 32-token tiles (each weight
#: tile decoded once per 32 tokens), 256 rows x 64 columns (one absmax block per row and K step at
#: bitsandbytes' blocksize 64, so the absmax scales the product: one FMA per accumulator element), the
#: register cap of issue 14's budget (168), and above rank 16 ``S`` first (the S kernel, then only the
#: expand in the epilogue; rank 64 in the loop costs 5.06 PTX per element on triton 3.9). Within issue
#: 14's budget on triton 3.6 and 3.9 at ranks 16 and 64 (bench/RESULTS.md, 2026-12-01 fourth pass).
SKINNY_MEDIUM_DEFAULT = dict(block_m=32, block_n=256, block_k=64, num_warps=8, num_stages=2, maxnreg=168,
                             s_first=False)
SKINNY_DECODE_MAX_M = 16
SKINNY_INTERPRETER = dict(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=1, maxnreg=None,
                          s_first=False)
#: The configs the GPU benchmark times besides the default (the dispatch table keeps the fastest per
#: shape) and the static report compiles: the fewest instructions per element (4 warps, ~254
#: registers), no load pipelining (1 stage, ~113-128 registers), a 256-row tile, a 64-row tile,
#: and token tiles of 32 and 64 for medium M (16 < M <= 128: each weight tile decoded once per 32
#: or 64 tokens instead of 16); ``scale_weights`` ones (absmax on each weight, the wgmma kept
#: asynchronous) beside the medium-M default (absmax on the product, a wait per K step).
SKINNY_CONFIGS = (
    dict(block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=2, maxnreg=None, s_first=False),
    dict(block_m=16, block_n=128, block_k=128, num_warps=8, num_stages=1, maxnreg=None, s_first=False),
    dict(block_m=16, block_n=256, block_k=128, num_warps=8, num_stages=2, maxnreg=None, s_first=False),
    dict(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3, maxnreg=None, s_first=False),
    dict(block_m=32, block_n=128, block_k=128, num_warps=8, num_stages=2, maxnreg=None, s_first=False),
    dict(block_m=64, block_n=128, block_k=128, num_warps=8, num_stages=2, maxnreg=None, s_first=False),
    dict(block_m=32, block_n=128, block_k=128, num_warps=8, num_stages=2, maxnreg=168, s_first=True),
    dict(block_m=64, block_n=128, block_k=128, num_warps=8, num_stages=2, maxnreg=168, s_first=True),
    dict(block_m=32, block_n=256, block_k=128, num_warps=8, num_stages=2, maxnreg=None, s_first=False),
    # the medium-M default of the third pass (2026-12-01), for a GPU run to time against the new one
    dict(block_m=32, block_n=128, block_k=128, num_warps=8, num_stages=2, maxnreg=168, s_first=False),
    # the medium-M default's tile with the absmax on each weight (its wgmma stays asynchronous), with
    # the shrink in the loop (rank 16) and S first (rank 64)
    dict(block_m=32, block_n=256, block_k=64, num_warps=8, num_stages=2, maxnreg=168, s_first=False,
         scale_weights=True),
    dict(block_m=32, block_n=256, block_k=64, num_warps=8, num_stages=2, maxnreg=168, s_first=True,
         scale_weights=True),
)
#: Programs the skinny kernel's split-K aims for per streaming multiprocessor (a few waves).
SKINNY_PROGRAMS_PER_SM = 4


def skinny_split_k(op: Operands, block_m: int, block_n: int, block_k: int) -> int:
    """The split the skinny kernel uses on this device for ``op`` (fills the SMs a few times over)."""
    sms = multiprocessors(op.x.device)
    return split_k_for(triton.cdiv(op.n, block_n), triton.cdiv(op.m, block_m), triton.cdiv(op.k, block_k),
                       SKINNY_PROGRAMS_PER_SM * sms)


def _skinny_tile_default(r_pad: int, m: int) -> dict:
    """The tuned default for a padded rank and ``m`` tokens, before any GPU limit: up to
    ``SKINNY_DECODE_MAX_M`` tokens ``SKINNY_DEFAULT`` (uncapped above ``SKINNY_CAPPED_MAX_RANK``), beyond
    it ``SKINNY_MEDIUM_DEFAULT`` (``S`` first above ``SKINNY_CAPPED_MAX_RANK``)."""
    if m > SKINNY_DECODE_MAX_M:
        return dict(SKINNY_MEDIUM_DEFAULT, s_first=r_pad > SKINNY_CAPPED_MAX_RANK)
    return dict(SKINNY_DEFAULT, maxnreg=SKINNY_DEFAULT["maxnreg"] if r_pad <= SKINNY_CAPPED_MAX_RANK else None)


def skinny_default_configs(r_pad: int, m: int = 1, elem_bytes: int = 2, limits: GpuLimits | None = None) -> list[dict]:
    """The configs the skinny launcher tries without a config of its own, in order: the tuned default
    (``_skinny_tile_default``), its tile with a single stage, then ``SKINNY_INTERPRETER``'s small tile;
    from the first whose shared-memory bound fits a GPU with ``limits`` (the launcher moves on should
    Triton still find one too large)."""
    first = _skinny_tile_default(r_pad, m)
    configs = [first, dict(first, num_stages=1), dict(SKINNY_INTERPRETER, s_first=first["s_first"])]
    configs = [c for i, c in enumerate(configs) if c not in configs[:i]]
    for i, config in enumerate(configs):
        if skinny_fits(config, elem_bytes, r_pad, limits):
            return configs[i:]
    return configs[-1:]


def skinny_default(r_pad: int, m: int = 1, elem_bytes: int = 2, limits: GpuLimits | None = None) -> dict:
    """The skinny kernel's default config on a GPU with ``limits`` (the first of ``skinny_default_configs``)."""
    return skinny_default_configs(r_pad, m, elem_bytes, limits)[0]


def _launch_skinny(op: Operands, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The skinny launch with ``config`` (over the default), or the default configs for this GPU
    (``skinny_default_configs``) when there is none."""
    limits = gpu_limits(op.x.device)
    elem_bytes, r_pad = op.x.element_size(), padded_rank(op.r)
    if interpreting():
        candidates = [SKINNY_INTERPRETER]
    elif config is None:
        candidates = skinny_default_configs(r_pad, op.m, elem_bytes, limits)
    else:
        candidates = [skinny_default(r_pad, op.m, elem_bytes, limits)]
    candidates = [{**c, "table": default_table(op.x.device), **(config or {})} for c in candidates]
    if interpreting() and candidates[0]["table"] == "shfl":
        raise ValueError("the 'shfl' code table is inline PTX: it runs on a GPU, not in Triton's interpreter")

    def launch(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = dict(cfg)
        if cfg.get("split_k") is None:
            cfg["split_k"] = skinny_split_k(op, cfg["block_m"], cfg["block_n"], cfg["block_k"])
        if cfg.get("s_first"):  # S by the S kernel; the launch only reads it
            y, s = _new_output((op.m, op.n), op.x.dtype, op.x.device), _launch_s(op)
        else:
            y, s = op.new_outputs()
        launch_skinny(op.x, op.weight_args(), op.lora_a, op.lora_b, op.bias, y, s, op.scale, op.dropout_p, op.seed,
                      blocksize=op.weight.blocksize, double_quant=op.weight.double_quant, r_pad=r_pad,
                      dot_precision=op.meta()["DOT_PRECISION"], **cfg)
        return y, s

    key = ("skinny", op.x.device, op.x.dtype, r_pad, op.m > SKINNY_DECODE_MAX_M, op.n, op.k, repr(config),
           op.weight.blocksize, op.weight.double_quant, op.bias is not None, op.dropout_p > 0)
    return launch_first_fitting(key, candidates, launch)


LAUNCHERS = {"fused": _launch_fused, "split": _launch_split, "decode": _launch_decode, "dequant": _launch_dequant,
             "merged": _launch_merged, "skinny": _launch_skinny}


# ====================================================================== public API
def lora_forward_triton(
    x2d: torch.Tensor,
    weight: NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    method: str = "dequant",
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the QLoRA layer through the named Triton candidate (``ops.dispatch`` chooses).

    Args:
        x2d: ``[M, K]`` activations, fp16 / bf16 / fp32, contiguous.
        weight: ``NF4Weight`` ``[N, K]`` on x's device, ``K`` a multiple of its block size.
        lora_a: ``[r, K]``, lora_b: ``[N, r]``, bias: ``[N]`` or None, all in x's dtype; ``r >= 1``
            (``r <= 128`` for the ``RANK_LIMITED`` candidates).
        scale: the LoRA scale ``s``.
        dropout_p: LoRA dropout probability in ``[0, 1)``; the mask is ``dropout.dropout_mask(seed, p, M, K)``.
        seed: dropout seed (ignored when ``dropout_p == 0``).
        method: one of ``METHODS`` or ``"torch"`` (plain torch; alias ``"reference"``).
        config: the candidate's launch config (only ``"skinny"`` takes one: ``block_m``, ``block_n``, ``block_k``,
            ``split_k``, ``num_warps``, ``num_stages``, ``maxnreg``, ``table``, ``s_first`` (``S`` by the
            S kernel first, the launch adds only the expand), ``scale_weights`` (absmax on each weight
            before the MMA, not on the product), any subset); None: its default.
    Returns:
        ``(y [M, N], S [M, r])`` in x's dtype, ``S = drop(x) @ A^T`` (saved for the backward).
    Raises:
        TypeError / ValueError for bad inputs; RuntimeError when Triton cannot run on x's
        device (CPU without ``TRITON_INTERPRET=1``) and the reference cannot stand in (dropout).
    """
    validate_operands(x2d, weight, lora_a, lora_b, bias, scale, dropout_p, seed)
    n, r = weight.shape[0], lora_a.shape[0]
    if method not in METHODS + TORCH_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS) + ['torch']}")
    if config is not None and method != "skinny":
        raise ValueError(f"method {method!r} takes no config (its kernels autotune), got {config!r}")
    if config is not None:
        check_config({**SKINNY_DEFAULT, "split_k": 1, "table": default_table(x2d.device), **config})
    if method in RANK_LIMITED and r > MAX_RANK:
        raise ValueError(f"the {method!r} kernel takes LoRA ranks up to {MAX_RANK} (its rank tile lives in registers), "
                         f"got r={r}; 'dequant' and 'merged' take any rank")
    if method in TORCH_METHODS:
        return _reference_forward(x2d, weight, lora_a, lora_b, scale, bias, dropout_p, seed)
    require_launchable(x2d.device)
    if x2d.shape[0] == 0:
        return x2d.new_empty(0, n), x2d.new_empty(0, r)
    kdt = kernel_dtype(x2d.dtype, x2d.device)
    widen = lambda t: None if t is None else t.to(kdt)  # noqa: E731
    op = Operands(widen(x2d), weight, widen(lora_a), widen(lora_b), widen(bias), float(scale),
                  float(dropout_p), int(seed))
    with on_device(x2d.device):
        y, s = LAUNCHERS[method](op, config)
    return y.to(x2d.dtype), s.to(x2d.dtype)


# ====================================================================== helpers
def validate_operands(x2d, weight, lora_a, lora_b, bias, scale, dropout_p, seed) -> None:
    """Raise TypeError/ValueError with a clear message unless the operands form a valid problem."""
    if not isinstance(x2d, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x2d).__name__}")
    if x2d.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K] (flatten leading dims first), got shape {list(x2d.shape)}")
    device = x2d.device
    check_nf4_weight(weight, device)
    n, k = weight.shape
    m = x2d.shape[0]
    check_tensor("x", x2d, (m, k), device)
    if not isinstance(lora_a, torch.Tensor) or not isinstance(lora_b, torch.Tensor):
        raise TypeError("lora_a and lora_b must be torch.Tensors")
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != lora_b.shape[-1]:
        raise ValueError(f"mismatched LoRA ranks: lora_a {list(lora_a.shape)} is [r, K] and lora_b "
                         f"{list(lora_b.shape)} is [N, r] with the same r")
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError(f"LoRA rank must be at least 1, got r={r}")
    check_tensor("lora_a", lora_a, (r, k), device, dtypes=(x2d.dtype,))
    check_tensor("lora_b", lora_b, (n, r), device, dtypes=(x2d.dtype,))
    if bias is not None:
        check_tensor("bias", bias, (n,), device, dtypes=(x2d.dtype,))
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")


def _reference_forward(x2d, weight, lora_a, lora_b, scale, bias, dropout_p, seed):
    """Plain-torch forward (``reference.lora_forward``) for devices Triton cannot run on."""
    from ..reference import lora_forward

    if dropout_p > 0:
        if not can_launch(x2d.device):
            raise RuntimeError("LoRA dropout needs the Triton mask generator (dropout.dropout_mask), which cannot "
                               f"run on {x2d.device}; set TRITON_INTERPRET=1 or use dropout_p=0")
        from .dropout import dropout_mask

        mask = dropout_mask(seed, dropout_p, x2d.shape[0], x2d.shape[1], x2d.device)
        return lora_forward(x2d, weight, lora_a, lora_b, scale, bias, mask)
    return lora_forward(x2d, weight, lora_a, lora_b, scale, bias)
