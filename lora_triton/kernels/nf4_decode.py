"""The NF4 decode primitive every kernel that reads the packed base weight shares.

``W`` ``[N, K]`` stays in bitsandbytes' bytes: the flattened row-major weight, two codes per
byte with the even column in the high nibble, one absmax per ``BLOCKSIZE`` consecutive
elements. Kernels need ``K % BLOCKSIZE == 0`` (a block never straddles two rows, so the block
of ``(n, k)`` is ``n * (K // BLOCKSIZE) + k // BLOCKSIZE``).

Three ways in, chosen per kernel by the static report (bench/RESULTS.md):

``load_nf4_tile``  the MMA kernels (skinny, dx, experimental fused): one byte = two codes per
                   load element; Triton copies the tile to shared memory in 16-byte pieces and
                   builds the MMA operand from it. Measured against 32-bit words there: words
                   cost 1.4-3.4x more instructions per element, because Triton moves the
                   decoded 8-codes-per-thread tile into the MMA operand layout element by element.
``load_nf4_codes`` the same bytes, the codes left unscaled, and ``load_tile_absmax`` for the
                   scales: the skinny kernel, which multiplies each sub-tile's MMA product by its
                   rows' absmax instead of every weight element (``nf4_skinny``).
``decode_words``   the dequant kernel (no MMA, the layout is free): **32-bit words**, 8 codes each
                   (``K % 32 == 0`` for every block size, so a row starts on a word). A word is 4
                   bytes little-endian, so element ``e`` of it (element ``2j`` in the high nibble of
                   byte ``j``) is ``(word >> WORD_SHIFT[e]) & 0xF``, ``WORD_SHIFT = [4, 0, 12, 8,
                   20, 16, 28, 24]``.

The 16-entry code table lives in registers; ``TABLE`` (a constexpr) picks how a code becomes
its value, both exact (the table's own fp32 values):

``"gather"``  ``tl.gather`` on the 16-element table tensor. Runs under the interpreter (the
              path the CPU tests take); on sm_90 Triton lowers it to shared-memory reads.
``"shfl"``    GPU only: lane ``L`` of every warp holds ``code[L % 16]`` and one
              ``shfl.sync.idx`` per element reads the lane the code names. ``shfl`` uses the
              low 5 bits of its lane operand, so the shifted word needs no mask (lanes 16..31
              repeat the table). Layout-independent: whichever elements a thread holds, it
              reads from lanes of its own warp. Its bit logic is emulated in
              ``emulate_shfl_lookup`` and tested exhaustively on CPU.

``load_nf4_tile``'s values are ``code * absmax`` in fp32, rounded once to the operand dtype by the
caller: bit-identical to ``NF4Weight.dequantize`` (kernels that decode absmax compile with
``enable_fp_fusion=False`` so ``nested * q + offset`` is not contracted into an FMA).
A prmt (byte-permute) table was measured against ``shfl`` on paper and not built: NF4 values are
arbitrary fp32 numbers, so a ``prmt`` lookup needs a byte plane per result byte (4 planes, two
permutes and a select per 4 elements each, plus a byte transpose), about 4-5 instructions per
element against ``shfl``'s one.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ..format import NF4Weight

TABLES = ("gather", "shfl")
#: Shift of element ``e`` of a 32-bit word (the Python twin of ``word_shifts``).
WORD_SHIFT = (4, 0, 12, 8, 20, 16, 28, 24)


@triton.jit
def word_shifts():
    """int32 ``[8]``: ``WORD_SHIFT`` (element ``2j`` is the high nibble of byte ``j``)."""
    e = tl.arange(0, 8)
    return (e // 2) * 8 + (1 - e % 2) * 4


@triton.jit
def _lane_id(like):
    return tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _shfl_lookup(table_lane, shifted):
    return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, -1;", "=r,r,r", [table_lane, shifted],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def code_table(code_ptr, TABLE: tl.constexpr):
    """The code table in registers: fp32 ``[16]`` for ``"gather"``; for ``"shfl"`` an fp32 ``[1, 1]``
    tensor that holds ``code[L % 16]`` in lane ``L`` (one register and one load per thread;
    ``lookup`` broadcasts it in registers, which never moves a value between threads). Load it
    once, before the K loop."""
    if TABLE == "shfl":
        lane = _lane_id(tl.zeros((1, 1), tl.int32))
        return tl.load(code_ptr + (lane & 15))
    else:
        return tl.load(code_ptr + tl.arange(0, 16))


@triton.jit
def lookup(table, codes, TABLE: tl.constexpr):
    """fp32 code values of int32 ``codes`` ``[ROWS, COLS]`` (the code in bits 0..3; higher bits are
    ignored), ``table`` from ``code_table``."""
    ROWS: tl.constexpr = codes.shape[0]
    COLS: tl.constexpr = codes.shape[1]
    if TABLE == "shfl":
        return _shfl_lookup(tl.broadcast_to(table, (ROWS, COLS)), codes)
    else:
        return tl.reshape(tl.gather(table, tl.reshape(codes & 0xF, (ROWS * COLS,)), 0), (ROWS, COLS))


@triton.jit
def decode_words(words, table, TABLE: tl.constexpr):
    """fp32 code values ``[ROWS, WORDS * 8]`` of int32 words ``[ROWS, WORDS]``, in element order."""
    ROWS: tl.constexpr = words.shape[0]
    WORDS: tl.constexpr = words.shape[1]
    shifted = words[:, :, None] >> word_shifts()[None, None, :]  # code in bits 0..3, other bits vary
    return lookup(table, tl.reshape(shifted, (ROWS, WORDS * 8)), TABLE)


@triton.jit
def decode_bytes(byte, table, TABLE: tl.constexpr):
    """fp32 code values ``[ROWS, 2 * COLS]`` of int32 bytes ``[ROWS, COLS]`` (0..255), in element
    order: the high nibble is the even element."""
    ROWS: tl.constexpr = byte.shape[0]
    COLS: tl.constexpr = byte.shape[1]
    return tl.reshape(tl.join(lookup(table, byte >> 4, TABLE), lookup(table, byte, TABLE)), (ROWS, 2 * COLS))


@triton.jit
def _nested_block(block, SHIFT: tl.constexpr):
    """``block // 256`` (``SHIFT``: as ``block >> 8``, equal for ``block >= 0``)."""
    if SHIFT:
        return block >> 8
    else:
        return block // 256


@triton.jit
def load_block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask,
                      DOUBLE_QUANT: tl.constexpr, IN_BOUNDS: tl.constexpr = False,
                      SHIFT_NESTED_INDEX: tl.constexpr = False):
    """fp32 absmax of the blocks ``block`` (any shape of int indices); where ``mask`` is False a finite
    stand-in (0, or ``offset`` with double quantization: ``nested_code[0] * 0 + offset``), to be
    multiplied by zeros only (``IN_BOUNDS``: every block is valid and ``mask`` is not applied).

    With double quantization ``absmax = nested_code[q] * nested_absmax[block // 256] + offset``
    (bitsandbytes' order: multiply, then add); otherwise the stored float32 value.
    ``SHIFT_NESTED_INDEX``: the nested index as ``block >> 8`` (equal for ``block >= 0``, always the
    case; one shift instead of signed division's four instructions). Only the skinny kernel sets it:
    in the other kernels the shorter code moved ptxas' register allocation (triton 3.9: fused
    16x128x128 fp16 rank 64 from 168 to 209 registers in the static report).
    """
    if DOUBLE_QUANT:
        if IN_BOUNDS:
            q = tl.load(absmax_ptr + block).to(tl.int32)
            nested = tl.load(nested_absmax_ptr + _nested_block(block, SHIFT_NESTED_INDEX))
        else:
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            nested = tl.load(nested_absmax_ptr + _nested_block(block, SHIFT_NESTED_INDEX), mask=mask, other=0.0)
        return tl.load(nested_code_ptr + q) * nested + offset  # q is a valid index, masked or not
    elif IN_BOUNDS:
        return tl.load(absmax_ptr + block)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def in_bounds(offs, limit, ALWAYS: tl.constexpr):
    """``offs < limit``, or all True when the caller guarantees it (``ALWAYS``)."""
    if ALWAYS:
        return tl.full(offs.shape, True, tl.int1)
    else:
        return offs < limit


@triton.jit
def load_nf4_codes(packed_ptr, table, offs_n, k0, N, K,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TABLE: tl.constexpr,
                   EVEN_N: tl.constexpr = False, EVEN_K: tl.constexpr = False, row0=0,
                   LOCAL_ROWS: tl.constexpr = False):
    """The code values of ``W[row0 + offs_n, k0 : k0 + BLOCK_K]`` before scaling: fp32 ``[BLOCK_N, BLOCK_K]``,
    each exactly ``code[nibble]`` (rows ``>= N`` and columns ``>= K`` read byte 0, i.e. ``code[0]``).

    ``packed_ptr`` is the packed uint8 weight; ``table`` comes from ``code_table``; ``offs_n``
    holds ``BLOCK_N`` row indices from ``row0`` on (a loop that passes its step as ``row0`` and a fixed
    ``tl.arange`` as ``offs_n`` keeps the per-row address arithmetic out of the loop); ``k0`` is even.
    Each byte is loaded once. ``EVEN_N`` / ``EVEN_K``: the caller guarantees every row is ``< N`` / the
    whole tile is ``< K`` (no masks). ``LOCAL_ROWS``: ``offs_n`` are in-tile rows (``0 <= offs_n <
    BLOCK_N``, ``row0`` carries the tile's place), so the byte offsets inside the tile are int32 (exact
    for ``BLOCK_N * K / 2 <= 2**31``) and only the tile's base is 64-bit: fewer live registers in a
    loop over row tiles (the fused dx's 4-byte spill in the static report). Otherwise they are int64.
    """
    HALF: tl.constexpr = BLOCK_K // 2
    offs_b = k0 // 2 + tl.arange(0, HALF)
    rows = offs_n if LOCAL_ROWS else offs_n.to(tl.int64)
    byte_ptr = (packed_ptr + tl.cast(row0, tl.int64) * (K // 2)) + (rows[:, None] * (K // 2) + offs_b[None, :])
    if EVEN_N and EVEN_K:
        byte = tl.load(byte_ptr, eviction_policy="evict_first")
    else:
        byte_mask = in_bounds(offs_n, N - row0, EVEN_N)[:, None] & in_bounds(offs_b, K // 2, EVEN_K)[None, :]
        byte = tl.load(byte_ptr, mask=byte_mask, other=0, eviction_policy="evict_first")
    return decode_bytes(byte.to(tl.int32), table, TABLE)


@triton.jit
def load_nf4_tile(packed_ptr, table, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                  offs_n, k0, N, K,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                  DOUBLE_QUANT: tl.constexpr, TABLE: tl.constexpr,
                  EVEN_N: tl.constexpr = False, EVEN_K: tl.constexpr = False,
                  SHIFT_NESTED_INDEX: tl.constexpr = False, row0=0, LOCAL_ROWS: tl.constexpr = False):
    """Dequantize ``W[row0 + offs_n, k0 : k0 + BLOCK_K]`` into an fp32 tile ``[BLOCK_N, BLOCK_K]``.

    ``packed_ptr`` is the packed uint8 weight; ``table`` comes from ``code_table``; ``offs_n``
    holds ``BLOCK_N`` row indices; ``k0`` is a multiple of ``BLOCK_K``. Both ``BLOCK_K`` and
    ``BLOCKSIZE`` are powers of two, so the tile covers part of one block per row
    (``BLOCK_K <= BLOCKSIZE``) or ``BLOCK_K // BLOCKSIZE`` whole blocks. Rows ``>= N`` and
    columns ``>= K`` read as 0. One absmax load per (row, block), each byte loaded once.
    ``EVEN_N`` / ``EVEN_K``: the caller guarantees every row of ``offs_n`` is ``< N`` / the whole
    tile is ``< K``, so those bounds are not tested (no mask instructions in the K loop).
    Each value is ``code * absmax`` in fp32 (``NF4Weight.dequantize``'s rounding).
    ``row0``: the rows are ``row0 + offs_n``, and ``LOCAL_ROWS``: ``offs_n`` lie in the tile
    (``load_nf4_codes``); ``SHIFT_NESTED_INDEX``: see ``load_block_absmax``.
    """
    row_ok = in_bounds(offs_n, N - row0, EVEN_N)
    codes = load_nf4_codes(packed_ptr, table, offs_n, k0, N, K, BLOCK_N, BLOCK_K, TABLE, EVEN_N, EVEN_K, row0,
                           LOCAL_ROWS)
    blocks_per_row = K // BLOCKSIZE
    rows = tl.cast(row0, tl.int64) + offs_n.to(tl.int64)
    if BLOCK_K <= BLOCKSIZE:
        # one block per row; columns < K always (K % BLOCKSIZE == 0 and k0 < K)
        absmax = load_block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                                   rows * blocks_per_row + k0 // BLOCKSIZE, row_ok, DOUBLE_QUANT, EVEN_N,
                                   SHIFT_NESTED_INDEX)
        return codes * absmax[:, None]
    else:
        NB: tl.constexpr = BLOCK_K // BLOCKSIZE
        offs_blk = k0 // BLOCKSIZE + tl.arange(0, NB)
        # zero whole blocks past K
        blk_mask = row_ok[:, None] & in_bounds(offs_blk, blocks_per_row, EVEN_K)[None, :]
        absmax = load_block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                                   rows[:, None] * blocks_per_row + offs_blk[None, :], blk_mask, DOUBLE_QUANT,
                                   EVEN_N and EVEN_K, SHIFT_NESTED_INDEX)
        w = tl.reshape(codes, (BLOCK_N, NB, BLOCKSIZE))
        return tl.reshape(w * absmax[:, :, None], (BLOCK_N, BLOCK_K))


@triton.jit
def load_tile_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, offs_n, k0, N, K,
                     BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                     EVEN_N: tl.constexpr = False, EVEN_K: tl.constexpr = False):
    """fp32 ``[BLOCK_N, max(1, BLOCK_K // BLOCKSIZE)]``: the absmax of every block the tile
    ``W[offs_n, k0 : k0 + BLOCK_K]`` touches, in column order (``load_block_absmax``'s values, one
    column when the tile lies inside one block); for rows ``>= N`` and blocks past ``K`` the finite
    stand-in of ``load_block_absmax`` (the caller multiplies it by zeros or masks it out)."""
    NB: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K > BLOCKSIZE else 1
    blocks_per_row = K // BLOCKSIZE
    offs_blk = k0 // BLOCKSIZE + tl.arange(0, NB)
    mask = in_bounds(offs_n, N, EVEN_N)[:, None] & in_bounds(offs_blk, blocks_per_row, EVEN_K)[None, :]
    block = offs_n.to(tl.int64)[:, None] * blocks_per_row + offs_blk[None, :]
    return load_block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask, DOUBLE_QUANT,
                             EVEN_N and EVEN_K, SHIFT_NESTED_INDEX=True)


# ====================================================================== CPU twins of the bit logic
def emulate_shfl_lookup(code: np.ndarray, words: np.ndarray) -> np.ndarray:
    """What ``decode_words(..., TABLE="shfl")`` computes, bit for bit, in numpy (``decode_bytes``
    is the same lookup on ``byte >> 4`` and ``byte``: ``emulate_shfl_bytes``).

    ``code`` float32 ``[16]``; ``words`` int32 ``[...]``. Returns float32 ``[..., 8]``: for element
    ``e`` the warp shuffle reads lane ``(word >> WORD_SHIFT[e]) & 31`` (arithmetic shift, as
    ``shr.s32``; ``shfl.sync.idx`` with ``c = 0x1f`` keeps the low 5 bits), whose table register
    holds ``code[lane % 16]``.
    """
    table_lane = np.asarray(code, dtype=np.float32)[np.arange(32) % 16]
    shifted = np.asarray(words, dtype=np.int32)[..., None] >> np.asarray(WORD_SHIFT, dtype=np.int32)
    return table_lane[shifted & 0x1F]


def emulate_shfl_bytes(code: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """What ``decode_bytes(..., TABLE="shfl")`` computes, in numpy: float32 ``[..., 2]`` per byte
    (high nibble first); the lane operand is ``byte >> 4`` or the byte itself, low 5 bits kept."""
    table_lane = np.asarray(code, dtype=np.float32)[np.arange(32) % 16]
    byte = np.asarray(packed, dtype=np.int32)
    return np.stack([table_lane[(byte >> 4) & 0x1F], table_lane[byte & 0x1F]], axis=-1)


def words_of_packed(packed: np.ndarray) -> np.ndarray:
    """int32 words of packed NF4 bytes (``uint8 [4 * n]``), as a kernel's 32-bit loads see them."""
    return np.ascontiguousarray(packed, dtype=np.uint8).view("<i4")


def codes_of_packed(packed: np.ndarray) -> np.ndarray:
    """The codes in element order (``uint8 [2 * n]``): high nibble first, as bitsandbytes packs."""
    packed = np.asarray(packed, dtype=np.uint8)
    return np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)


# ----------------------------------------------------------------------------- launch arguments
def kernel_args(weight: NF4Weight) -> tuple:
    """The positional kernel arguments describing ``weight``: ``(packed, code, absmax, nested_absmax,
    nested_code, offset)``. Without double quant the nested pointers alias ``code`` (never read) and
    ``offset`` is 0.0."""
    if weight.double_quant:
        return (weight.packed, weight.code, weight.absmax, weight.nested_absmax, weight.nested_code,
                weight.offset_value)
    return weight.packed, weight.code, weight.absmax, weight.code, weight.code, 0.0


def word_args(weight: NF4Weight) -> tuple:
    """``kernel_args`` with the packed bytes viewed as int32 words (``decode_words``'s input; no copy:
    the bytes must start on a 4-byte boundary, which ``ops.validate`` checks)."""
    assert weight.packed.data_ptr() % 4 == 0, "the packed NF4 bytes must start on a 4-byte boundary"
    return (weight.packed.reshape(-1).view(torch.int32), *kernel_args(weight)[1:])
