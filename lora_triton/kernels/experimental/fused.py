"""The single-pass tile kernel the package's description names, kept for measurement, not dispatched.

``y = x @ dequant(W)^T + s * S @ B^T + b`` and ``S = drop(x) @ A^T`` in one kernel: the NF4 tile is
decoded in registers inside the K loop and ``S`` accumulates in the same loop (``r / BLOCK_N`` extra
MMA work per N tile); LoRA and bias are added in the epilogue. No dequantized ``W`` reaches memory.
On the one GPU measured (an H200, 2026-11-29) it lost to dequantize + cuBLAS at every M, so the
forward path never imports this module: the benchmark times it (``lora-triton bench --what
forward``) and the static report compiles it, until a GPU table shows it winning somewhere.

Shapes and dtypes as ``kernels.lora_s``: ``x [M, K]``, NF4 ``W [N, K]``, ``A [r, K]``, ``B [N, r]``,
``b [N]`` in one dtype, ranks up to 128 (padded to ``R_PAD``), ``K`` a multiple of the block size.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..dropout import load_seed
from ..lora_s import load_x_tile, lora_s_step, s_tile_ptrs
from ..nf4_decode import code_table, load_nf4_tile
from ..runtime import dot_precision, on_device, pipelined_smem


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


@triton.jit(do_not_specialize=["M", "R", "M_BUCKET"])
def _fused_forward_kernel(
        x_ptr, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
        a_ptr, b_ptr, bias_ptr, s_ptr, y_ptr,
        M, N, K, R, M_BUCKET, scale, seed_ptr, p,
        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
        TABLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``y``; ``S`` accumulates in the K loop, stored by the first N tile."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    seed = load_seed(seed_ptr, HAS_DROPOUT)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    table = code_table(code_ptr, TABLE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_x_tile(x_ptr, offs_m, offs_k, M, K)
        acc = _nf4_dot_step(acc, x, packed_ptr, table, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                            offset, offs_n, k0, N, K, BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, DOT_PRECISION,
                            TABLE)
        s_acc = lora_s_step(s_acc, x, a_ptr, offs_m, offs_r, offs_k, R, K, seed, p, HAS_DROPOUT, DOT_PRECISION)
    s_ptrs, s_mask = s_tile_ptrs(s_ptr, offs_m, offs_r, M, R)
    s = s_acc.to(s_ptr.dtype.element_ty)
    if pid_n == 0:
        tl.store(s_ptrs, s, mask=s_mask)
    _lora_epilogue(acc, s, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, offs_r, M, N, R, scale, HAS_BIAS, DOT_PRECISION)


def fused_smem(config: dict, stages: int, elem_bytes: int, r_pad: int) -> int:
    """Upper bound of the kernel's shared memory for ``config`` (its ``BLOCK_*``), activations of
    ``elem_bytes`` and padded rank ``r_pad``: per stage the x tile, the packed weight tile (half a byte
    per element, its scales 1/4 byte per element at block size 32) and the ``[BLOCK_K, r_pad]`` tile of
    A; once, the decoded weight tile as a dot operand."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    stage = bm * bk * elem_bytes + bn * bk // 2 + bn * bk // 4 + bk * r_pad * elem_bytes
    return pipelined_smem(stages, stage, bn * bk * elem_bytes)


def _prune(configs, named_args, **kwargs):
    """Drop tiles the shape cannot use (dot K-dims under 16, tiles far larger than M, N or K); keeps the
    smallest config if nothing survives."""
    m, n, k = (named_args.get(name, 1) for name in ("M", "N", "K"))
    cap = lambda size: max(16, triton.next_power_of_2(size))  # noqa: E731
    legal = [c for c in configs if 16 <= c.kwargs["BLOCK_K"] <= cap(k) and c.kwargs["BLOCK_M"] <= cap(m)
             and c.kwargs["BLOCK_N"] <= cap(n)]
    return legal or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


def _bench_quietly(fn, quantiles):
    """Autotune timing: shorter than do_bench's defaults so a benchmark fits its budget."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


@functools.lru_cache(maxsize=None)
def _autotuned(configs: tuple[triton.Config, ...]):
    return triton.autotune(configs=list(configs), key=["M_BUCKET", "N", "K", "R_PAD"],
                           prune_configs_by={"early_config_prune": _prune}, do_bench=_bench_quietly)(
        _fused_forward_kernel)


def launch_fused(x: torch.Tensor, weight_args: tuple, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 bias: torch.Tensor | None, s: torch.Tensor, y: torch.Tensor, scale: float, seed: torch.Tensor | None,
                 dropout_p: float, *, blocksize: int, double_quant: bool, table: str, r_pad: int, m_bucket: int,
                 config: triton.Config | dict | None = None, autotune: tuple[triton.Config, ...] | None = None
                 ) -> None:
    """Fill ``y [M, N]`` and ``s [M, r]`` (contiguous, x's dtype) with one launch, with ``config`` (a
    ``triton.Config``, or a dict of ``BLOCK_*`` / ``GROUP_M`` for the interpreter) or autotuned over
    ``autotune``; ``weight_args`` = ``nf4_decode.kernel_args``."""
    m, k = x.shape
    n, r = y.shape[1], lora_a.shape[0]
    args = (x, *weight_args, lora_a, lora_b, x if bias is None else bias, s, y, m, n, k, r, m_bucket, float(scale),
            x if seed is None else seed, float(dropout_p))
    meta = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, HAS_BIAS=bias is not None,
                HAS_DROPOUT=dropout_p > 0, R_PAD=r_pad, DOT_PRECISION=dot_precision(x.dtype), TABLE=table)
    grid = lambda meta_: (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]),)  # noqa: E731
    with on_device(x.device):
        if autotune is not None:
            _autotuned(tuple(autotune))[grid](*args, **meta, enable_fp_fusion=False)
        elif isinstance(config, triton.Config):
            _fused_forward_kernel[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                        num_stages=config.num_stages, enable_fp_fusion=False)
        else:
            _fused_forward_kernel[grid](*args, **meta, **config)
