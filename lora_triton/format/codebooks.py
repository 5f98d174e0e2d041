"""The two code books of bitsandbytes' NF4 format.

* ``NF4_CODE`` - the 16 NormalFloat values a 4-bit code stands for (float32, sorted).
* ``dynamic_map_signed()`` - the 256-entry signed dynamic 8-bit map used by double
  quantization to store the per-block absmax values in one byte each.

Both are bit-for-bit the tables bitsandbytes uses (tests compare them with bitsandbytes'
own ``get_4bit_type("nf4")`` and ``create_dynamic_map()``).
"""

from __future__ import annotations

import functools

import torch

# bitsandbytes' NF4 table as float32 literals. Rounded copies (4 decimals, as in torchao)
# are not bit-compatible, so the full float32 values are spelled out.
_NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

#: Block sizes bitsandbytes accepts for 4-bit quantization.
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

#: Block size of the second (8-bit) quantization of the absmax values.
NESTED_BLOCKSIZE = 256


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The NF4 code book: float32 ``[16]``, sorted ascending, on ``device``."""
    return torch.tensor(_NF4_VALUES, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    # Signed dynamic map with 7 exponent bits over 8 bits: for each decade 10^(e-6),
    # e = 0..6, 2^e linearly spaced fractions (the midpoints of linspace(0.1, 1, 2^e + 1)),
    # positive and negative; plus 0 and 1. 2 * (2^7 - 1) + 2 = 256 values. Computed in
    # float32 exactly as bitsandbytes does, so the values agree to the last bit.
    values = [torch.zeros(1), torch.ones(1)]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        fractions = (edges[:-1] + edges[1:]) / 2.0
        magnitude = fractions * (10.0 ** (e - 6))
        values += [magnitude, -magnitude]
    return torch.sort(torch.cat(values)).values


def dynamic_map_signed(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map: float32 ``[256]``, sorted ascending.

    A fresh tensor per call: each weight owns its table, as in bitsandbytes (a shared one
    would make ``safetensors`` refuse the state dict and tie every weight's table together).
    """
    return _dynamic_map_cpu().to(device, copy=True)
