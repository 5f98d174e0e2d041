"""In-register NF4 decoding shared by every kernel that reads the packed base weight.

``W`` ``[N, K]`` is stored as bitsandbytes stores it: the flattened row-major weight, two
codes per byte with the even column in the high nibble, one absmax per ``BLOCKSIZE``
consecutive elements. Kernels require ``K % BLOCKSIZE == 0``, so a block never straddles two
rows and the block of ``(n, k)`` is ``n * (K // BLOCKSIZE) + k // BLOCKSIZE``.
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
def load_nf4_tile(packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                  offs_n, offs_k, N, K,
                  BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """Dequantize ``W[offs_n, offs_k]`` into an fp32 tile ``[len(offs_n), len(offs_k)]``.

    Out-of-range rows/columns read as 0. ``code_ptr`` is the 16-entry NF4 table (fp32).
    """
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    flat = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where((offs_k[None, :] % 2) == 0, byte >> 4, byte & 0xF)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    block = offs_n[:, None].to(tl.int64) * (K // BLOCKSIZE) + offs_k[None, :] // BLOCKSIZE
    absmax = load_block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask, DOUBLE_QUANT)
    return value * absmax


@triton.jit
def decode_nf4_bytes(packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                     byte_index, block, mask, DOUBLE_QUANT: tl.constexpr):
    """Decode the packed bytes ``byte_index`` (any shape) into two fp32 tensors of that shape:
    ``(hi, lo)`` = the values of the even and the odd element of each byte.

    ``block`` holds each byte's absmax block (both nibbles of a byte share it because block
    sizes are even). Masked bytes decode to 0. Each byte is read once, not once per nibble.
    """
    byte = tl.load(packed_ptr + byte_index, mask=mask, other=0).to(tl.int32)
    absmax = load_block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask, DOUBLE_QUANT)
    hi = tl.load(code_ptr + (byte >> 4), mask=mask, other=0.0) * absmax
    lo = tl.load(code_ptr + (byte & 0xF), mask=mask, other=0.0) * absmax
    return hi, lo


@triton.jit
def load_nf4_tile_pairs(packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                        offs_n, offs_p, N, K,
                        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """The even/odd-column split of a tile of ``W`` (shared/DESIGN.md): for pair indices
    ``offs_p`` (columns ``2*p`` and ``2*p + 1``) return fp32 ``(W[offs_n, 2p], W[offs_n, 2p+1])``,
    each ``[len(offs_n), len(offs_p)]``, so a kernel does two dots (even and odd columns of
    ``x``) instead of interleaving nibbles. Needs an even ``K``; out-of-range entries read 0.
    """
    mask = (offs_n[:, None] < N) & (offs_p[None, :] < K // 2)
    byte_index = offs_n[:, None].to(tl.int64) * (K // 2) + offs_p[None, :]
    block = offs_n[:, None].to(tl.int64) * (K // BLOCKSIZE) + (2 * offs_p[None, :]) // BLOCKSIZE
    return decode_nf4_bytes(packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                            byte_index, block, mask, DOUBLE_QUANT)
