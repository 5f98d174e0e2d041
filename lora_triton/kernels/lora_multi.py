"""Many adapters in one batch (serving): each row's LoRA term from its own adapter of a stacked bank.

``y[m] += scale[i] * (x[m] @ A[i]^T) @ B[i]^T`` with ``i = adapter_ids[m]`` (``-1``: no adapter,
the row keeps the base output), after the NF4 base product ran once for the whole batch.

Shapes and dtypes: ``x [M, K]``, ``y [M, N]`` (updated in place), ``A_bank [n_adapters, R, K]``,
``B_bank [n_adapters, N, R]``, one dtype for all four (fp16 / bf16 / fp32); ``scales`` fp32
``[n_adapters]``; ``adapter_ids`` int32 / int64 ``[M]``. Adapters of different ranks share the
bank's ``R`` (the largest rank): an adapter of rank ``r`` has zeros in ``A[i, r:]`` and
``B[i, :, r:]``, so the padding adds exact zeros. Returns ``S [M, R]`` in x's dtype (zero rows
for ``-1``), rounded to x's dtype before the expand, as the single-adapter path does.

Two kernels, one program per row (a gathered matrix-vector product, the decode case):
``_shrink_kernel`` ``S[m] = x[m] @ A[i]^T`` and ``_expand_kernel`` ``y[m, n-block] +=
scale[i] * S[m] @ B[i, n-block]^T``. The bank is indexed inside the kernels, so a new set of
adapter ids is data, not a new compile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import ACTIVATION_DTYPES, check_tensor
from .runtime import kernel_dtype, on_device, require_launchable

ID_DTYPES = (torch.int32, torch.int64)
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


def check_multi_lora(x, y, bank_a, bank_b, scales, adapter_ids, check_values: bool = True) -> None:
    """Raise TypeError / ValueError naming the operand unless they form a valid mixed batch
    (shapes, dtypes, devices, contiguity; with ``check_values`` also finite scales and adapter ids
    in ``[-1, n_adapters)``, which reads them: a device sync)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [M, K], got {type(x).__name__}"
                         f"{'' if not isinstance(x, torch.Tensor) else f' of shape {list(x.shape)}'}")
    m, k = x.shape
    if not isinstance(bank_a, torch.Tensor) or bank_a.dim() != 3:
        raise ValueError("A_bank must be a 3-D tensor [n_adapters, R, K]")
    n_adapters, r, _ = bank_a.shape
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise ValueError("y must be a 2-D tensor [M, N]")
    n = y.shape[1]
    if n_adapters < 1 or r < 1:
        raise ValueError(f"A_bank needs at least one adapter of rank >= 1, got shape {list(bank_a.shape)}")
    check_tensor("x", x, (m, k), x.device, ACTIVATION_DTYPES)
    for name, t, shape in (("y", y, (m, n)), ("A_bank", bank_a, (n_adapters, r, k)),
                           ("B_bank", bank_b, (n_adapters, n, r))):
        check_tensor(name, t, shape, x.device, (x.dtype,))
    check_tensor("scales", scales, (n_adapters,), x.device, (torch.float32,))
    check_tensor("adapter_ids", adapter_ids, (m,), x.device, ID_DTYPES)
    if not check_values:
        return
    if m and not bool(torch.isfinite(scales).all()):
        raise ValueError(f"scales must be finite, got {scales.tolist()}")
    if m:
        low, high = int(adapter_ids.min()), int(adapter_ids.max())
        if low < -1 or high >= n_adapters:
            raise ValueError(f"adapter_ids must be in [-1, {n_adapters}) (-1: no adapter), got values in "
                             f"[{low}, {high}]")


def multi_lora_add_(x: torch.Tensor, y: torch.Tensor, bank_a: torch.Tensor, bank_b: torch.Tensor,
                    scales: torch.Tensor, adapter_ids: torch.Tensor, check_values: bool = True) -> torch.Tensor:
    """Add each row's LoRA term to ``y`` in place (module docstring for shapes); returns ``S [M, R]``.

    Raises TypeError / ValueError for bad operands, RuntimeError where Triton cannot run.
    ``check_values=False`` skips the checks that read the scales and ids (a device sync per call)
    for callers whose values are valid by construction (``ops.multi_lora``).
    """
    check_multi_lora(x, y, bank_a, bank_b, scales, adapter_ids, check_values)
    require_launchable(x.device)
    m, k = x.shape
    n_adapters, r, _ = bank_a.shape
    n = y.shape[1]
    s = x.new_empty(m, r)
    if m == 0:
        return s
    kdt = kernel_dtype(x.dtype, x.device)  # the interpreter's bf16 shim: fp32 inside, rounded back after
    xk, ak, bk = x.to(kdt), bank_a.to(kdt), bank_b.to(kdt)
    yk = y if kdt == y.dtype else y.to(kdt)
    sk = s if kdt == s.dtype else s.to(kdt)
    r_pad = max(16, triton.next_power_of_2(r))
    ids = adapter_ids.contiguous()
    with on_device(x.device):
        _shrink_kernel[(m,)](xk, ak, ids, sk, k, r, R_PAD=r_pad, BLOCK_K=SHRINK_BLOCK_K)
        if sk is not s:
            s.copy_(sk)
            sk = s.to(kdt)  # the expand reads S rounded to x's dtype, as the GPU path does
        _expand_kernel[(m, triton.cdiv(n, EXPAND_BLOCK_N))](sk, bk, ids, scales, yk, n, r, R_PAD=r_pad,
                                                            BLOCK_N=EXPAND_BLOCK_N)
    if yk is not y:
        y.copy_(yk)
    return s
