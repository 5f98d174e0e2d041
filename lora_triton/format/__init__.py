"""Layer 1 - the NF4 format, byte-compatible with bitsandbytes."""

from .codebooks import NESTED_BLOCKSIZE, SUPPORTED_BLOCKSIZES, dynamic_map_signed, nf4_code
from .weight import NF4Weight

__all__ = ["NF4Weight", "nf4_code", "dynamic_map_signed", "SUPPORTED_BLOCKSIZES", "NESTED_BLOCKSIZE"]
