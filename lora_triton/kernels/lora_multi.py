"""Many adapters in one batch (serving): each row's LoRA term from its own adapter of a stacked bank.

``y[m] += scale[i] * (x[m] @ A[i]^T) @ B[i]^T`` with ``i = adapter_ids[m]`` (``-1``: no adapter,
the row keeps the base output), after the NF4 base product ran once for the whole batch.

Shapes and dtypes: ``x [M, K]``, ``y [M, N]`` (updated in place), ``A_bank [n_adapters, R, K]``,
``B_bank [n_adapters, N, R]``, one dtype for all four (fp16 / bf16 / fp32); ``scales`` fp32
``[n_adapters]``; ``adapter_ids`` int32 / int64 ``[M]``. Adapters of different ranks share the
bank's ``R`` (the largest rank): an adapter of rank ``r`` has zeros in ``A[i, r:]`` and
``B[i, :, r:]``, so the padding adds exact zeros.

Two kernels, one program per row (a gathered matrix-vector product, the decode case):
``_shrink_kernel`` ``S[m] = x[m] @ A[i]^T`` and ``_expand_kernel`` ``y[m, n-block] +=
scale[i] * S[m] @ B[i, n-block]^T``. The bank is indexed inside the kernels, so a new set of
adapter ids is data, not a new compile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import on_device, padded_rank

SHRINK_BLOCK_K = 128
EXPAND_BLOCK_N = 128


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, ids_ptr, s_ptr, K, R, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program ``m``: ``S[m] = x[m] @ A[ids[m]]^T`` (fp32 sums, stored in S's dtype; 0 for id -1)."""
    row = tl.program_id(0)
    adapter = tl.load(ids_ptr + row).to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    acc = tl.zeros((R_PAD,), dtype=tl.float32)
    if adapter >= 0:
        a_rows = a_ptr + adapter * R * K + offs_r[:, None].to(tl.int64) * K
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row.to(tl.int64) * K + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            a = tl.load(a_rows + offs_k[None, :], mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0)
            acc += tl.sum(a.to(tl.float32) * x[None, :], axis=1)
    tl.store(s_ptr + row.to(tl.int64) * R + offs_r, acc.to(s_ptr.dtype.element_ty), mask=offs_r < R)


@triton.jit
def _expand_kernel(s_ptr, b_ptr, ids_ptr, scale_ptr, y_ptr, N, R, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program ``(m, n)``: ``y[m, n-block] += scale[i] * S[m] @ B[i, n-block]^T``, ``i = ids[m]``
    (rows with id -1 are left as they are)."""
    row, pid_n = tl.program_id(0), tl.program_id(1)
    adapter = tl.load(ids_ptr + row).to(tl.int64)
    if adapter >= 0:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, R_PAD)
        s = tl.load(s_ptr + row.to(tl.int64) * R + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + adapter * N * R + offs_n[:, None].to(tl.int64) * R + offs_r[None, :],
                    mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
        lora = tl.sum(b.to(tl.float32) * s[None, :], axis=1) * tl.load(scale_ptr + adapter)
        y_ptrs = y_ptr + row.to(tl.int64) * N + offs_n
        y = tl.load(y_ptrs, mask=offs_n < N, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + lora).to(y_ptr.dtype.element_ty), mask=offs_n < N)


def launch_shrink(x: torch.Tensor, bank_a: torch.Tensor, ids: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Fill ``s [M, R]`` with each row's ``x[m] @ A[ids[m]]^T`` (zeros for id -1); ``x [M, K]``, ``bank_a
    [n, R, K]``, ``s`` in one dtype, ``ids`` int32 / int64 ``[M]`` in ``[-1, n)``, all contiguous."""
    m, k = x.shape
    r = bank_a.shape[1]
    if m:
        with on_device(x.device):
            _shrink_kernel[(m,)](x, bank_a, ids, s, k, r, R_PAD=padded_rank(r), BLOCK_K=SHRINK_BLOCK_K)
    return s


def launch_expand(s: torch.Tensor, bank_b: torch.Tensor, ids: torch.Tensor, scales: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor:
    """Add each row's ``scales[i] * S[m] @ B[i]^T`` (``i = ids[m]``, rows with id -1 unchanged) to ``y [M, N]``
    in place; ``s [M, R]``, ``bank_b [n, N, R]`` in y's dtype, ``scales`` fp32 ``[n]``, all contiguous."""
    m, n = y.shape
    r = bank_b.shape[2]
    if m:
        with on_device(y.device):
            _expand_kernel[(m, triton.cdiv(n, EXPAND_BLOCK_N))](s, bank_b, ids, scales, y, n, r, R_PAD=padded_rank(r),
                                                                BLOCK_N=EXPAND_BLOCK_N)
    return y
