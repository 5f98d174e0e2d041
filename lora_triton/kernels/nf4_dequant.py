"""Dense ``dequant(W)`` from the packed NF4 bytes in one Triton kernel (the dequantize + cuBLAS path).

``dequantize_nf4``         ``W [N, K]`` in fp16 / bf16 / fp32, bit-identical to ``NF4Weight.dequantize``:
                           each program decodes ``BLOCKS_PER_PROGRAM`` whole absmax blocks, one int32 word
                           per 8 codes and one absmax per block (``nf4_decode``), values ``code * absmax``
                           in fp32 rounded once to the output dtype.
``dequantize_nf4_merged``  ``W + s * B @ A`` ``[N, K]``: the same decode in 2-D tiles, the rank-r product
                           added in fp32 before the one rounding (the ``merged`` candidate: the LoRA term
                           rides in the base GEMM instead of passes of its own over ``[M, N]`` / ``[M, K]``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..format import NF4Weight
from .checks import check_nf4_weight, check_tensor, nf4_kernel_args, packed_words
from .nf4_decode import TABLES, code_table, decode_words, load_block_absmax
from .runtime import (GpuLimits, default_table, gpu_limits, kernel_dtype, launch_first_fitting, on_device, padded_rank,
                      pipelined_smem, require_launchable)

#: Packed bytes per program (more when one block is larger).
DEQUANT_BYTES = 16384


@triton.jit
def _dequant_kernel(words_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, out_ptr,
                    n_blocks, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, TABLE: tl.constexpr,
                    BLOCKS_PER_PROGRAM: tl.constexpr):
    """Flattened ``W`` in out's dtype, ``BLOCKS_PER_PROGRAM`` blocks per program (whole blocks only)."""
    WORDS: tl.constexpr = BLOCKSIZE // 8
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    in_range = blocks < n_blocks
    words = tl.load(words_ptr + blocks[:, None] * WORDS + tl.arange(0, WORDS)[None, :], mask=in_range[:, None],
                    other=0)
    table = code_table(code_ptr, TABLE)
    absmax = load_block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, blocks, in_range,
                               DOUBLE_QUANT)
    values = decode_words(words, table, TABLE) * absmax[:, None]
    out_index = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + out_index, values.to(out_ptr.dtype.element_ty), mask=in_range[:, None])


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The dense weight buffer both launchers fill completely (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def blocks_per_program(blocksize: int) -> int:
    return max(1, DEQUANT_BYTES // (blocksize // 2))


def launch_dequant(weight_args: tuple, out: torch.Tensor, n_blocks: int, *, blocksize: int, double_quant: bool,
                   table: str) -> torch.Tensor:
    """Fill ``out`` (contiguous, ``n_blocks * blocksize`` elements, fp16/bf16/fp32) with ``dequant(W)``.

    ``weight_args``: ``(words, code, absmax, nested_absmax, nested_code, offset)`` (words: the packed
    bytes viewed as int32)."""
    per_program = blocks_per_program(blocksize)
    with on_device(out.device):
        _dequant_kernel[(triton.cdiv(n_blocks, per_program),)](
            *weight_args, out, n_blocks, BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, TABLE=table,
            BLOCKS_PER_PROGRAM=per_program,
            enable_fp_fusion=False)  # no FMA: absmax = code * nested + offset rounds twice, as in torch
    return out


def dequantize_nf4(weight: NF4Weight, dtype: torch.dtype, table: str | None = None) -> torch.Tensor:
    """Dense ``W [N, K]`` in ``dtype`` (fp16/bf16/fp32) from the Triton kernel, equal bit for bit
    to ``weight.dequantize(dtype)``. ``table``: the code-table variant (default: the device's).
    Under the interpreter bf16 is decoded in fp32 and rounded by torch.
    """
    check_nf4_weight(weight, weight.device)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"can dequantize to float16, bfloat16 or float32 only, got {dtype}")
    if table is not None and table not in TABLES:
        raise ValueError(f"table must be one of {TABLES} or None (the device's), got {table!r}")
    require_launchable(weight.device)
    out = _new_output(weight.shape, kernel_dtype(dtype, weight.device), weight.device)
    launch_dequant((packed_words(weight), *nf4_kernel_args(weight)[1:]), out, weight.n_blocks, blocksize=weight.blocksize,
                   double_quant=weight.double_quant, table=table or default_table(weight.device))
    return out.to(dtype)


# ----------------------------------------------------------------------------- W + s * B @ A
#: Tile of the merged kernel: rows of W per loop step, columns (at most one absmax block wide), and
#: rows per program (the program keeps its ``[r, BLOCK_K]`` slice of A in registers over them).
MERGED_BLOCK_N = 64
MERGED_MAX_BLOCK_K = 128
MERGED_ROWS_PER_PROGRAM = 512


@triton.jit
def _dequant_merged_kernel(words_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                           a_ptr, b_ptr, out_ptr, N, K, R, scale,
                           BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, TABLE: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
                           R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``out[n, k] = code * absmax + scale * sum_j B[n, j] A[j, k]`` (fp32, one rounding) for the
    columns ``[k0, k0 + BLOCK_K)`` of ``ROWS_PER_PROGRAM`` rows, ``BLOCK_N`` rows a step. ``BLOCK_K``
    divides ``BLOCKSIZE`` and ``K``, so a tile lies in one absmax block per row and never past ``K``.
    ``a [R, K]``, ``b [N, R]`` in out's dtype."""
    WORDS: tl.constexpr = BLOCK_K // 8
    k0 = tl.program_id(0) * BLOCK_K
    n_begin = tl.program_id(1) * ROWS_PER_PROGRAM
    offs_r = tl.arange(0, R_PAD)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :], mask=offs_r[:, None] < R, other=0.0)
    table = code_table(code_ptr, TABLE)
    local_n = tl.arange(0, BLOCK_N)  # offsets within a step are int32 (BLOCK_N * K < 2**31); the bases 64-bit
    for step in range(0, tl.cdiv(tl.minimum(ROWS_PER_PROGRAM, N - n_begin), BLOCK_N)):
        n0 = n_begin + step * BLOCK_N
        row_ok = n0 + local_n < N
        base = n0.to(tl.int64)
        words = tl.load(words_ptr + base * (K // 8) + k0 // 8 + local_n[:, None] * (K // 8)
                        + tl.arange(0, WORDS)[None, :], mask=row_ok[:, None], other=0)
        absmax = load_block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                                   (n0 + local_n) * (K // BLOCKSIZE) + k0 // BLOCKSIZE, row_ok, DOUBLE_QUANT)
        b = tl.load(b_ptr + base * R + local_n[:, None] * R + offs_r[None, :],
                    mask=row_ok[:, None] & (offs_r[None, :] < R), other=0.0)
        delta = tl.dot(b, a, input_precision=DOT_PRECISION)
        values = tl.fma(delta, scale, decode_words(words, table, TABLE) * absmax[:, None])
        tl.store(out_ptr + base * K + local_n[:, None] * K + offs_k[None, :], values.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])


def merged_smem(block_k: int, elem_bytes: int, r_pad: int) -> int:
    """Upper bound of the merged kernel's shared memory: its ``[r_pad, BLOCK_K]`` slice of A, the
    ``[BLOCK_N, r_pad]`` tile of B of a step (two buffers) and the step's ``[BLOCK_N, BLOCK_K]`` fp32
    product, each once in shared memory for the dot's operand layouts."""
    return pipelined_smem(2, MERGED_BLOCK_N * r_pad * elem_bytes,
                          r_pad * block_k * elem_bytes + MERGED_BLOCK_N * block_k * 4)


def merged_block_ks(blocksize: int, elem_bytes: int = 2, r_pad: int = 16, limits: GpuLimits | None = None
                    ) -> list[int]:
    """Columns per tile the merged kernel tries, in order: one absmax block, at most ``MERGED_MAX_BLOCK_K``,
    then halved down to 16; from the first whose shared-memory bound fits a GPU with ``limits``."""
    block_ks = []
    block_k = min(blocksize, MERGED_MAX_BLOCK_K)
    while block_k >= 16:
        block_ks.append(block_k)
        block_k //= 2
    fitting = [b for b in block_ks if limits is None or limits.fits(merged_smem(b, elem_bytes, r_pad))]
    return block_ks[block_ks.index(fitting[0]):] if fitting else block_ks[-1:]


def merged_block_k(blocksize: int, elem_bytes: int = 2, r_pad: int = 16, limits: GpuLimits | None = None) -> int:
    """The tile width the merged kernel launches with first (``merged_block_ks``)."""
    return merged_block_ks(blocksize, elem_bytes, r_pad, limits)[0]


def dequantize_nf4_merged(weight: NF4Weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                          dtype: torch.dtype, table: str | None = None) -> torch.Tensor:
    """Dense ``W + scale * lora_b @ lora_a`` ``[N, K]`` in ``dtype`` (fp16/bf16/fp32), summed in fp32 and
    rounded once: the weight of ``x @ W^T + scale * (x @ A^T) @ B^T`` as one product.

    Args:
        weight: ``NF4Weight`` ``[N, K]``, ``K`` a multiple of its block size.
        lora_a: ``[r, K]``; lora_b: ``[N, r]``, both in ``dtype`` on weight's device, contiguous; ``r >= 1``.
        scale: the LoRA scale (a finite Python number).
        table: the code-table variant (default: the device's).
    Raises:
        TypeError / ValueError naming the argument for a bad input.
    """
    check_nf4_weight(weight, weight.device)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"can dequantize to float16, bfloat16 or float32 only, got {dtype}")
    if table is not None and table not in TABLES:
        raise ValueError(f"table must be one of {TABLES} or None (the device's), got {table!r}")
    if isinstance(scale, (bool, torch.Tensor)) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    n, k = weight.shape
    r = lora_a.shape[0] if isinstance(lora_a, torch.Tensor) and lora_a.dim() == 2 else 0
    if r < 1:
        raise ValueError(f"lora_a must be [r, K={k}] with r >= 1, got "
                         f"{list(lora_a.shape) if isinstance(lora_a, torch.Tensor) else type(lora_a).__name__}")
    check_tensor("lora_a", lora_a, (r, k), weight.device, dtypes=(dtype,))
    check_tensor("lora_b", lora_b, (n, r), weight.device, dtypes=(dtype,))
    require_launchable(weight.device)
    kdt = kernel_dtype(dtype, weight.device)
    out = _new_output(weight.shape, kdt, weight.device)
    if out.numel() == 0:
        return out.to(dtype)
    a, b, r_pad, table = lora_a.to(kdt), lora_b.to(kdt), padded_rank(r), table or default_table(weight.device)

    def launch(block_k: int) -> None:
        _dequant_merged_kernel[(k // block_k, triton.cdiv(n, MERGED_ROWS_PER_PROGRAM))](
            packed_words(weight), *nf4_kernel_args(weight)[1:], a, b, out, n, k, r, float(scale),
            BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=weight.double_quant, TABLE=table, BLOCK_N=MERGED_BLOCK_N,
            BLOCK_K=block_k, ROWS_PER_PROGRAM=MERGED_ROWS_PER_PROGRAM, R_PAD=r_pad,
            DOT_PRECISION="ieee" if kdt == torch.float32 else "tf32",
            enable_fp_fusion=False)  # as in dequantize_nf4: the absmax rounds as torch rounds it

    block_ks = merged_block_ks(weight.blocksize, out.element_size(), r_pad, gpu_limits(weight.device))
    with on_device(weight.device):
        launch_first_fitting(("merged", weight.device, kdt, r_pad, weight.blocksize, weight.double_quant, table),
                             block_ks, launch)
    return out.to(dtype)
