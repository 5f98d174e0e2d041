"""The LoRA down-projection ``S = drop(x) @ A^T`` in one Triton kernel.

Shapes and dtypes: ``x [M, K]``, ``A [r, K]`` in one dtype (fp16 / bf16 / fp32; fp32 under the
interpreter for bf16), ``S [M, r]`` in that dtype, fp32 accumulation. One program per
``BLOCK_M`` rows walks K in ``BLOCK_K`` steps; the rank is padded to ``R_PAD`` (a power of two
>= 16, masked). With dropout the mask is regenerated from ``seed`` (``dropout.dropout_scale``),
so the backward applies the same one without storing it.

The launcher only launches: the tile is the caller's choice (``ops.configs.s_kernel_tiles``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dropout import dropout_scale, load_seed
from .runtime import dot_precision, on_device, pipelined_smem


@triton.jit
def load_x_tile(x_ptr, offs_m, offs_k, M, K):
    """``x[offs_m, offs_k]`` ``[len(offs_m), len(offs_k)]``, 0 outside (contiguous rows)."""
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    return tl.load(x_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], mask=mask, other=0.0)


@triton.jit
def lora_s_step(s_acc, x, a_ptr, offs_m, offs_r, offs_k, R, K, seed, p,
                HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``s_acc [BM, R_PAD] += drop(x) [BM, BK] @ A[:, offs_k]^T``."""
    if HAS_DROPOUT:
        x = x * dropout_scale(seed, offs_m, offs_k, K, p).to(x.dtype)
    mask = (offs_k[:, None] < K) & (offs_r[None, :] < R)
    a_t = tl.load(a_ptr + offs_r[None, :].to(tl.int64) * K + offs_k[:, None], mask=mask, other=0.0)  # [BK, R_PAD]
    return tl.dot(x, a_t, s_acc, input_precision=DOT_PRECISION)


@triton.jit
def s_tile_ptrs(s_ptr, offs_m, offs_r, M, R):
    """Pointers and mask of the ``[BM, R_PAD]`` tile of ``S [M, R]`` at rows ``offs_m``."""
    return s_ptr + offs_m[:, None].to(tl.int64) * R + offs_r[None, :], (offs_m[:, None] < M) & (offs_r[None, :] < R)


@triton.jit(do_not_specialize=["M", "R"])
def _lora_s_kernel(x_ptr, a_ptr, s_ptr, M, K, R, seed_ptr, p,
                   HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``S[rows] = drop(x[rows]) @ A^T`` for one block of BLOCK_M rows, stored in S's dtype."""
    seed = load_seed(seed_ptr, HAS_DROPOUT)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    s_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_x_tile(x_ptr, offs_m, offs_k, M, K)
        s_acc = lora_s_step(s_acc, x, a_ptr, offs_m, offs_r, offs_k, R, K, seed, p, HAS_DROPOUT, DOT_PRECISION)
    s_ptrs, s_mask = s_tile_ptrs(s_ptr, offs_m, offs_r, M, R)
    tl.store(s_ptrs, s_acc.to(s_ptr.dtype.element_ty), mask=s_mask)


def s_kernel_smem(block_m: int, block_k: int, stages: int, elem_bytes: int, r_pad: int) -> int:
    """Upper bound of the S kernel's shared memory: per stage the x tile and the ``[BLOCK_K, r_pad]``
    tile of A; outside the pipeline the dropout-scaled x tile's layout conversion."""
    return pipelined_smem(stages, (block_m * block_k + block_k * r_pad) * elem_bytes, block_m * block_k * elem_bytes)


def launch_lora_s(x: torch.Tensor, lora_a: torch.Tensor, s: torch.Tensor, seed: torch.Tensor | None,
                  dropout_p: float, *, r_pad: int, block_m: int, block_k: int, num_stages: int,
                  num_warps: int) -> None:
    """Fill ``s [M, r]`` with ``drop(x) @ A^T`` (``x [M, K]``, ``lora_a [r, K]``, one dtype, contiguous;
    ``seed``: int32 0-d on x's device, None without dropout)."""
    m, k = x.shape
    with on_device(x.device):
        _lora_s_kernel[(triton.cdiv(m, block_m),)](
            x, lora_a, s, m, k, lora_a.shape[0], x if seed is None else seed, dropout_p, HAS_DROPOUT=dropout_p > 0,
            R_PAD=r_pad, DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=block_m, BLOCK_K=block_k,
            num_warps=num_warps, num_stages=num_stages)
