"""Seed-based dropout on the LoRA branch: the mask is regenerated, never stored.

Element ``(m, k)`` of ``x [M, K]`` is kept when ``tl.rand(seed, m * K + k) >= p`` and then
scaled by ``1 / (1 - p)``. Every kernel that needs ``drop(x)`` (forward ``S``, backward ``dx``)
calls ``dropout_scale`` with the same seed and offsets, so forward and backward agree without
saving a mask the size of ``x``. ``dropout_mask`` materializes the same mask for tests, the
reference path and the ``dA`` product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import can_launch, on_device

#: The mask kernel's tile (element-wise: no shared memory to speak of on any GPU).
MASK_BLOCK_M, MASK_BLOCK_K = 16, 64


@triton.jit
def dropout_scale(seed, offs_m, offs_k, K, p):
    """fp32 ``[len(offs_m), len(offs_k)]``: 0 where dropped, ``1/(1-p)`` where kept."""
    offsets = offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    keep = tl.rand(seed, offsets) >= p
    return tl.where(keep, 1.0 / (1.0 - p), 0.0)


@triton.jit
def _dropout_mask_kernel(out_ptr, seed, p, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    scale = dropout_scale(seed, offs_m, offs_k, K, p)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], scale, mask=mask)


def dropout_mask(seed: int, p: float, m: int, k: int, device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dropout mask ``[m, k]`` (entries 0 or ``1/(1-p)``) that kernels regenerate from ``seed``."""
    device = torch.device(device)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not can_launch(device):
        raise RuntimeError(f"cannot run Triton on {device}: set TRITON_INTERPRET=1 for CPU tensors")
    out = torch.empty(m, k, dtype=torch.float32, device=device)
    with on_device(device):
        _dropout_mask_kernel[(triton.cdiv(m, MASK_BLOCK_M), triton.cdiv(k, MASK_BLOCK_K))](
            out, seed, p, m, k, BLOCK_M=MASK_BLOCK_M, BLOCK_K=MASK_BLOCK_K)
    return out.to(dtype)
