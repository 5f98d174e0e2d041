"""NF4 blockwise quantization in plain torch, bit-exact with bitsandbytes.

Every function works on CPU and CUDA tensors and is vectorized (no Python loop over blocks).
Blocks run over the flattened, row-major tensor; a tail shorter than a block is a block of
its own. The byte layout: ``NF4Weight`` (format/weight.py).

Functions here take and return plain tensors; ``weight.NF4Weight`` bundles them.
"""

from __future__ import annotations

import torch

from .codebooks import NESTED_BLOCKSIZE, SUPPORTED_BLOCKSIZES, dynamic_map_signed, nf4_code

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_blocksize(blocksize: int) -> None:
    """Raise ``TypeError`` unless ``blocksize`` is an int, ``ValueError`` unless it is one
    bitsandbytes supports."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"blocksize must be an int, one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r} "
                        f"({type(blocksize).__name__})")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r}")


def num_blocks(numel: int, blocksize: int) -> int:
    """Number of blocks (the last one may be partial) covering ``numel`` elements."""
    return -(-numel // blocksize)


def _blocks_with_tail(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 1-D tensor into ``[full_blocks, blocksize]`` and the (possibly empty) tail."""
    full = flat.numel() - flat.numel() % blocksize
    return flat[:full].view(-1, blocksize), flat[full:]


def blockwise_absmax_nf4_codes(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the NF4 code of every element.

    Args:
        weight: float tensor of any shape (fp32/fp16/bf16), finite.
        blocksize: one of ``SUPPORTED_BLOCKSIZES``.
    Returns:
        ``(absmax, codes)``: absmax float32 ``[n_blocks]``; codes uint8 ``[numel]`` in 0..15.

    Rounding follows bitsandbytes exactly: full blocks are scaled by the float32 reciprocal
    of their absmax, the tail block is divided by its absmax (clamped to 1e-38, which is also
    what bitsandbytes stores for an all-zero tail), values are clamped to [-1, 1] and sent to
    the nearest code, an exact midpoint going to the lower code.
    """
    flat = weight.reshape(-1).float()
    body, tail = _blocks_with_tail(flat, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = (body * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if tail.numel():
        tail_absmax = tail.abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        scaled = torch.cat([scaled, (tail / tail_absmax).clamp(-1, 1)])
    code = nf4_code(weight.device)
    midpoints = (code[:-1] + code[1:]) / 2
    codes = torch.bucketize(scaled, midpoints, right=False).to(torch.uint8)
    return absmax, codes


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte, the first element in the high nibble.

    Args:
        codes: uint8 ``[n]`` with values in 0..15.
    Returns:
        uint8 ``[(n + 1) // 2]``; an odd count is padded with code 7 (the value 0.0), as
        bitsandbytes pads with a scaled 0.
    """
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: uint8 ``[(numel+1)//2]`` -> int32 codes ``[numel]``."""
    packed = packed.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    return codes[:numel].int()


# bitsandbytes' CPU backend rounds to the 8-bit map through a 65536-entry table over [-1, 1]
# rather than by exact nearest-code search, so a value within ~1.5e-5 of a midpoint can land
# on the farther code. We reproduce the table to stay byte-identical with it.
_LUT_SIZE = 65536


def _dynamic8_lookup_table(code: torch.Tensor) -> torch.Tensor:
    """int64 ``[65536]``: for grid point ``-1 + 2i/65535`` the index of the first code whose
    upper midpoint is not below it (the nearest code, ties to the lower one)."""
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device)) / (_LUT_SIZE - 1)
    midpoints = 0.5 * (code[:-1] + code[1:])
    return torch.searchsorted(midpoints, grid, right=False)


def quantize_absmax_dynamic8(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of the float32 absmax values, as bitsandbytes' CPU backend does it.

    ``offset = absmax.mean()``; ``absmax - offset`` is quantized in blocks of 256 against the
    signed dynamic map: each value times the reciprocal of its block's absmax is rounded onto
    a 65536-point grid over [-1, 1], and the grid point's nearest code is stored. A block
    whose values are all equal (absmax 0) stores code 0.

    Args:
        absmax: float32 ``[n_blocks]``.
    Returns:
        ``(q_absmax uint8 [n_blocks], nested_absmax float32 [ceil(n_blocks/256)],
        offset float32 0-d)``.
    """
    offset = absmax.mean()
    if not bool(torch.isfinite(offset)):
        raise ValueError(f"cannot double-quantize these absmax values: their float32 mean overflows (largest absmax "
                         f"{float(absmax.max()):.3e}); quantize with double_quant=False")
    centered = absmax - offset
    body, tail = _blocks_with_tail(centered, NESTED_BLOCKSIZE)
    nested_absmax = body.abs().amax(dim=1)
    per_element_absmax = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)
    if tail.numel():
        tail_absmax = tail.abs().amax()
        nested_absmax = torch.cat([nested_absmax, tail_absmax.view(1)])
        per_element_absmax = torch.cat([per_element_absmax, tail_absmax.expand(tail.numel())])
    all_equal = per_element_absmax == 0
    normed = (centered * (1.0 / torch.where(all_equal, 1.0, per_element_absmax))).clamp(-1, 1)
    grid_index = (((normed + 1.0) * 0.5) * (_LUT_SIZE - 1) + 0.5).long()
    q_absmax = _dynamic8_lookup_table(dynamic_map_signed(absmax.device))[grid_index]
    q_absmax = torch.where(all_equal, 0, q_absmax)
    return q_absmax.to(torch.uint8), nested_absmax, offset


def dequantize_absmax_dynamic8(
    q_absmax: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor, offset: torch.Tensor | float
) -> torch.Tensor:
    """Decode double-quantized absmax: ``nested_code[q] * nested_absmax[i // 256] + offset``.

    Args:
        q_absmax: uint8 ``[n_blocks]``; nested_absmax: float32 ``[ceil(n_blocks/256)]``;
        nested_code: float32 ``[256]``; offset: float32 scalar.
    Returns:
        float32 ``[n_blocks]``, computed in float32 in bitsandbytes' order (multiply, then add).
    """
    codes = nested_code.index_select(0, q_absmax.reshape(-1).long())
    body, tail = _blocks_with_tail(codes, NESTED_BLOCKSIZE)
    n_full = body.shape[0]
    scaled = (body * nested_absmax[:n_full].unsqueeze(1)).reshape(-1)
    if tail.numel():
        scaled = torch.cat([scaled, tail * nested_absmax[n_full:]])
    return scaled + torch.as_tensor(offset, dtype=torch.float32, device=scaled.device)


def _byte_pair_table(code: torch.Tensor) -> torch.Tensor:
    """int64 ``[256]``: for each byte, the float32 bit patterns of its (high, low) nibble's code
    values packed into one 8-byte word, so one gather decodes two weights. On a little-endian
    machine viewing the gathered words as float32 yields them in element order."""
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # [256, 2]: byte -> (hi, lo)
    return pairs.contiguous().view(torch.int64).view(256)


def dequantize_codes(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    """``w = code[c] * absmax[block]`` in float32, then cast to ``dtype``.

    Args:
        packed: uint8 ``[(numel+1)//2]``; absmax: float32 ``[n_blocks]``; code: float32 ``[16]``.
    Returns:
        ``dtype`` tensor ``[numel]`` (flat; the caller reshapes).

    The codes are decoded a byte at a time through a 256-entry table of value pairs (a plain
    gather of bit patterns, 5-10x faster on CPU than indexing the 16 codes per nibble).
    """
    words = torch.take(_byte_pair_table(code), packed.reshape(-1).long())
    values = words.view(torch.float32)[:numel]
    body, tail = _blocks_with_tail(values, blocksize)
    n_full = body.shape[0]
    scaled = (body * absmax[:n_full].unsqueeze(1)).reshape(-1)
    if tail.numel():
        scaled = torch.cat([scaled, tail * absmax[n_full:]])
    return scaled.to(dtype)
