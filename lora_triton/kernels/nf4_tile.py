"""In-register NF4 decoding shared by every kernel that reads the packed base weight.

``W`` ``[N, K]`` is stored as bitsandbytes stores it: the flattened row-major weight, two
codes per byte with the even column in the high nibble, one absmax per ``BLOCKSIZE``
consecutive elements. Kernels require ``K % BLOCKSIZE == 0``, so a block never straddles two
rows and the block of ``(n, k)`` is ``n * (K // BLOCKSIZE) + k // BLOCKSIZE``.

Cost model (measured on an H200, bench/RESULTS.md): decoding is bound by load instructions,
not bytes. Each packed byte is loaded once (contiguous, so the loads vectorize), each nibble
is one lookup in the 16-entry code table (L1-resident), and the absmax - with double
quantization a byte, a nested-code lookup and a nested absmax - is loaded once per
``(row, block)`` and broadcast over the block, never once per element.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask,
                      DOUBLE_QUANT: tl.constexpr):
    """fp32 absmax of the blocks ``block`` (any shape of int indices).

    With double quantization ``absmax = nested_code[q] * nested_absmax[block // 256] + offset``
    (bitsandbytes' order: multiply, then add); otherwise the stored float32 value.
    """
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q, mask=mask, other=0.0)
        nested = tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
        return scale * nested + offset
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def decode_nibbles(byte, code_ptr):
    """The NF4 code values ``(hi, lo)`` (fp32, each shaped like ``byte``) of int32 bytes in 0..255:
    ``hi`` belongs to the even element of the byte, ``lo`` to the odd one."""
    return tl.load(code_ptr + (byte >> 4)), tl.load(code_ptr + (byte & 0xF))


@triton.jit
def interleave(hi, lo, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``[ROWS, COLS]`` from two ``[ROWS, COLS // 2]`` tensors: columns ``2j`` from ``hi``,
    ``2j + 1`` from ``lo`` (the byte order of the packed weight)."""
    return tl.reshape(tl.join(hi, lo), (ROWS, COLS))


@triton.jit
def load_nf4_tile(packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                  offs_n, k0, N, K,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                  DOUBLE_QUANT: tl.constexpr):
    """Dequantize ``W[offs_n, k0 : k0 + BLOCK_K]`` into an fp32 tile ``[BLOCK_N, BLOCK_K]``.

    ``offs_n`` holds ``BLOCK_N`` row indices; ``k0`` is a multiple of ``BLOCK_K``. Both
    ``BLOCK_K`` and ``BLOCKSIZE`` are powers of two, so the tile covers either part of one block
    per row (``BLOCK_K <= BLOCKSIZE``) or ``BLOCK_K // BLOCKSIZE`` whole blocks per row.
    Rows ``>= N`` and columns ``>= K`` read as 0.
    """
    HALF: tl.constexpr = BLOCK_K // 2
    offs_b = k0 // 2 + tl.arange(0, HALF)
    row_ok = offs_n < N
    byte_mask = row_ok[:, None] & (offs_b[None, :] < K // 2)
    rows = offs_n.to(tl.int64)
    byte = tl.load(packed_ptr + rows[:, None] * (K // 2) + offs_b[None, :], mask=byte_mask, other=0).to(tl.int32)
    hi, lo = decode_nibbles(byte, code_ptr)
    blocks_per_row = K // BLOCKSIZE
    if BLOCK_K <= BLOCKSIZE:
        # one block per row; columns < K always (K % BLOCKSIZE == 0 and k0 < K)
        absmax = load_block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                                   rows * blocks_per_row + k0 // BLOCKSIZE, row_ok, DOUBLE_QUANT)
        return interleave(hi, lo, BLOCK_N, BLOCK_K) * absmax[:, None]
    else:
        NB: tl.constexpr = BLOCK_K // BLOCKSIZE
        offs_blk = k0 // BLOCKSIZE + tl.arange(0, NB)
        blk_mask = row_ok[:, None] & (offs_blk[None, :] < blocks_per_row)  # zero whole blocks past K
        absmax = load_block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                                   rows[:, None] * blocks_per_row + offs_blk[None, :], blk_mask, DOUBLE_QUANT)
        w = tl.reshape(interleave(hi, lo, BLOCK_N, BLOCK_K), (BLOCK_N, NB, BLOCKSIZE))
        return tl.reshape(w * absmax[:, :, None], (BLOCK_N, BLOCK_K))
