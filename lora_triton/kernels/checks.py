"""Input validation shared by every kernel launcher: a clear error, never a wrong number.

Launchers call these before touching a pointer. Kernels assume contiguous row-major
operands, so non-contiguous and stride-0 (expanded) tensors are rejected here; the ops layer
makes its inputs contiguous before it calls a launcher.
"""

from __future__ import annotations

import torch

from ..format import NF4Weight

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device,
                 dtypes: tuple[torch.dtype, ...] = ACTIVATION_DTYPES) -> None:
    """Raise unless ``t`` has exactly ``shape``, one of ``dtypes``, lives on ``device``, is
    contiguous and has no zero stride (values are not inspected).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.numel() and any(s == 0 for s, d in zip(t.stride(), t.shape) if d > 1):  # empty: nothing is read
        raise ValueError(f"{name} has a zero stride (an expanded tensor, strides {t.stride()}); "
                         "call .contiguous() first")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major), got strides {t.stride()} for shape "
                         f"{list(t.shape)}; call .contiguous() first")


def check_nf4_weight(weight: NF4Weight, device: torch.device) -> None:
    """Raise unless ``weight`` is an NF4Weight on ``device`` whose rows hold whole blocks."""
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    if weight.device != device:
        raise ValueError(f"NF4 weight must be on {device} like the activations, got {weight.device}")
    n, k = weight.shape
    if k % weight.blocksize:
        raise ValueError(f"the kernels need in_features K divisible by the NF4 block size: K={k}, "
                         f"blocksize={weight.blocksize}; use the reference path for this weight")
    if k % 2:
        raise ValueError(f"the kernels need an even in_features K, got K={k}")


def packed_words(weight: NF4Weight) -> torch.Tensor:
    """The packed bytes as int32 words (a view, no copy; 8 codes per word, ``nf4_decode.decode_words``).

    Raises ValueError when the bytes do not start on a 4-byte boundary (a sliced view)."""
    if weight.packed.data_ptr() % 4:
        raise ValueError("the dequant kernel reads the packed NF4 bytes as 32-bit words: the packed tensor must start "
                         f"on a 4-byte boundary, got address {weight.packed.data_ptr():#x} (a sliced view?); pass "
                         "packed.clone()")
    return weight.packed.reshape(-1).view(torch.int32)


def nf4_kernel_args(weight: NF4Weight) -> tuple:
    """Positional kernel arguments describing ``weight`` (call ``check_nf4_weight`` first):
    ``(packed, code, absmax, nested_absmax, nested_code, offset)``. Without double quant the
    nested pointers alias ``code`` (never read) and ``offset`` is 0.0."""
    if weight.double_quant:
        return (weight.packed, weight.code, weight.absmax, weight.nested_absmax, weight.nested_code,
                weight.offset_value)
    return weight.packed, weight.code, weight.absmax, weight.code, weight.code, 0.0
