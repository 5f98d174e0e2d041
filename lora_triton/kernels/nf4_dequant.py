"""Dense ``dequant(W)`` from the packed NF4 bytes in one Triton kernel (the dequantize + cuBLAS path).

``W [N, K]`` in fp16 / bf16 / fp32, bit-identical to ``NF4Weight.dequantize``: each program
decodes ``BLOCKS_PER_PROGRAM`` whole absmax blocks, one int32 word per 8 codes and one absmax
per block (``nf4_decode``), values ``code * absmax`` in fp32 rounded once to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..format import NF4Weight
from .checks import check_nf4_weight, nf4_kernel_args, packed_words
from .nf4_decode import TABLES, code_table, decode_words, load_block_absmax
from .runtime import default_table, kernel_dtype, require_launchable

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
    out = torch.empty(weight.shape, dtype=kernel_dtype(dtype, weight.device), device=weight.device)
    launch_dequant((packed_words(weight), *nf4_kernel_args(weight)[1:]), out, weight.n_blocks, blocksize=weight.blocksize,
                   double_quant=weight.double_quant, table=table or default_table(weight.device))
    return out.to(dtype)
