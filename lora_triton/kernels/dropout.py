"""Seed-based dropout on the LoRA branch: the mask is regenerated, never stored.

Element ``(m, k)`` of ``x [M, K]`` is kept when ``tl.rand(seed, m * K + k) >= p`` and then
scaled by ``1 / (1 - p)``. Every kernel that needs ``drop(x)`` (forward ``S``, backward ``dx``)
calls ``dropout_scale`` with the same seed and offsets, so forward and backward agree without
saving a mask the size of ``x``. Kernels load the seed from memory (``load_seed``: an int32 0-d tensor
drawn on the device), so no launch reads it on the host and a captured CUDA graph draws a new one
at every replay. ``launch_uniform`` writes the uniforms it draws (``ops.dropout`` turns
them into masks: the one place every path gets a mask from).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import on_device

#: The mask kernel's tile (element-wise: no shared memory to speak of on any GPU).
MASK_BLOCK_M, MASK_BLOCK_K = 16, 64


@triton.jit
def dropout_scale(seed, offs_m, offs_k, K, p):
    """fp32 ``[len(offs_m), len(offs_k)]``: 0 where dropped, ``1/(1-p)`` where kept."""
    offsets = offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    keep = tl.rand(seed, offsets) >= p
    return tl.where(keep, 1.0 / (1.0 - p), 0.0)


@triton.jit
def load_seed(seed_ptr, HAS_DROPOUT: tl.constexpr):
    """The dropout seed a kernel's masks use (0, and nothing read, without dropout): int32 in memory, as the
    scalar argument it replaces was (an int64 narrowed here costs Philox about five 64-bit instructions
    per element)."""
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    return seed


@triton.jit
def _uniform_kernel(out_ptr, seed_ptr, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    seed = load_seed(seed_ptr, True)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offsets = offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptr + offsets, tl.rand(seed, offsets), mask=mask)


def launch_uniform(out: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Fill ``out [M, K]`` (fp32, contiguous) with the uniforms ``tl.rand(seed, m * K + k)`` that
    ``dropout_scale`` draws (``seed``: int32 0-d on out's device): element ``(m, k)`` is kept at
    probability ``p`` iff it is ``>= p``."""
    m, k = out.shape
    if m and k:
        with on_device(out.device):
            _uniform_kernel[(triton.cdiv(m, MASK_BLOCK_M), triton.cdiv(k, MASK_BLOCK_K))](
                out, seed, m, k, BLOCK_M=MASK_BLOCK_M, BLOCK_K=MASK_BLOCK_K)
    return out
