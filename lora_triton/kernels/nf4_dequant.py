"""Dense ``dequant(W)`` from the packed NF4 bytes, and ``W + s * B @ A``, each in one Triton kernel.

``launch_dequant``         ``W [N, K]`` in the output's dtype (fp16 / bf16 / fp32), bit-identical to
                           ``NF4Weight.dequantize``: each program decodes ``BLOCKS_PER_PROGRAM`` whole
                           absmax blocks, one int32 word per 8 codes and one absmax per block
                           (``nf4_decode``), values ``code * absmax`` in fp32 rounded once.
``launch_dequant_merged``  ``W + s * B @ A`` ``[N, K]``: the same decode in 2-D tiles, the rank-r product
                           added in fp32 before the one rounding (the ``merged`` candidate: the LoRA term
                           rides in the base GEMM instead of passes of its own over ``[M, N]`` / ``[M, K]``).

The launchers only launch (the ops layer validates, allocates and picks the tile width).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4_decode import code_table, decode_words, load_block_absmax
from .runtime import dot_precision, on_device, pipelined_smem

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


# ----------------------------------------------------------------------------- W + s * B @ A
#: Rows of W per loop step of the merged kernel, and rows per program (the program keeps its
#: ``[r, BLOCK_K]`` slice of A in registers over them); its column tile is the caller's.
MERGED_BLOCK_N = 64
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


def launch_dequant_merged(weight_args: tuple, lora_a: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor,
                          scale: float, *, blocksize: int, double_quant: bool, table: str, block_k: int,
                          r_pad: int) -> torch.Tensor:
    """Fill ``out [N, K]`` (contiguous, fp16 / bf16 / fp32) with ``W + scale * lora_b @ lora_a`` (``lora_a [r, K]``,
    ``lora_b [N, r]`` in out's dtype); ``weight_args`` as ``launch_dequant``'s; ``block_k`` divides the block
    size and ``K`` (``ops.configs.merged_block_ks``)."""
    n, k = out.shape
    with on_device(out.device):
        _dequant_merged_kernel[(k // block_k, triton.cdiv(n, MERGED_ROWS_PER_PROGRAM))](
            *weight_args, lora_a, lora_b, out, n, k, lora_a.shape[0], float(scale), BLOCKSIZE=blocksize,
            DOUBLE_QUANT=double_quant, TABLE=table, BLOCK_N=MERGED_BLOCK_N, BLOCK_K=block_k,
            ROWS_PER_PROGRAM=MERGED_ROWS_PER_PROGRAM, R_PAD=r_pad, DOT_PRECISION=dot_precision(out.dtype),
            enable_fp_fusion=False)  # as in launch_dequant: the absmax rounds as torch rounds it
    return out
