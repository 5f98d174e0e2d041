"""The native CUDA kernels (``kernels/native.py``) as a ``torch.library`` custom op: opaque to
``torch.compile``, with a fake kernel for shapes, run on the current stream of x's device.

``native_forward(x, weight, lora_a, lora_b, scale, bias, config)`` -> ``(y [M, N], S [M, r])`` for
``x [M, K]``, ``1 <= M <= 16``, bf16 / fp16, ranks 1..128, no dropout. ``config``: ``split_k`` (0: per
shape), ``row_tiles`` (16-row tiles per CTA, 2 or 4; 0: per shape), ``table`` (``"shared"`` or
``"register"``). Without the library a call raises a RuntimeError saying how to build it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..format import NF4Weight
from ..format.nf4 import num_blocks
from ..kernels import native
from .validate import check_operands, check_tensor


def check_config(config: dict | None) -> dict:
    """``config`` completed with ``native.CONFIG_DEFAULT``; ValueError naming the bad field otherwise."""
    unknown = sorted(set(config or {}) - set(native.CONFIG_DEFAULT))
    if unknown:
        raise ValueError(f"native config: unknown keys {unknown}; expected some of {list(native.CONFIG_DEFAULT)}")
    full = {**native.CONFIG_DEFAULT, **(config or {})}
    split_k = full["split_k"]
    if isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 0:
        raise ValueError(f"native config: split_k must be an int >= 0 (0: per shape), got {split_k!r}")
    if full["row_tiles"] not in (0, 2, 4) or isinstance(full["row_tiles"], bool):
        raise ValueError(f"native config: row_tiles must be 0 (per shape), 2 or 4, got {full['row_tiles']!r}")
    if full["table"] not in native.TABLES:
        raise ValueError(f"native config: table must be one of {list(native.TABLES)}, got {full['table']!r}")
    return full


def validate(x: Tensor, weight: NF4Weight, lora_a: Tensor, lora_b: Tensor, bias: Tensor | None, scale: float) -> None:
    """TypeError / ValueError unless the operands suit the native kernels (works on fake tensors: the
    addresses are checked at launch)."""
    if isinstance(x, Tensor) and x.dtype not in native.NATIVE_DTYPES:
        raise TypeError(f"the native kernels take bf16 or fp16 activations, got {x.dtype} (fp32: use the Triton "
                        "candidates)")
    check_operands(x, weight, lora_a, lora_b, bias, scale, 0.0, 0)
    if x.shape[0] > native.MAX_M:
        raise ValueError(f"the native kernels are for decode sizes, M <= {native.MAX_M} tokens, got M={x.shape[0]}")
    if lora_a.shape[0] > native.MAX_RANK:
        raise ValueError(f"the native kernels take LoRA ranks up to {native.MAX_RANK}, got r={lora_a.shape[0]}")
    if weight.shape[1] % weight.blocksize:
        raise ValueError(f"the native kernels read whole NF4 blocks per row: K={weight.shape[1]} is not a multiple "
                         f"of the block size {weight.blocksize}")
    n_blocks = num_blocks(weight.numel, weight.blocksize)
    u8, f32 = (torch.uint8,), (torch.float32,)
    device = x.device
    check_tensor("NF4 packed weight", weight.packed, ((weight.numel + 1) // 2,), device, dtypes=u8)
    check_tensor("NF4 quant_map", weight.code, (16,), device, dtypes=f32)
    if weight.double_quant:
        check_tensor("NF4 absmax (double-quantized)", weight.absmax, (n_blocks,), device, dtypes=u8)
        check_tensor("NF4 nested_absmax", weight.nested_absmax, (-(-n_blocks // 256),), device, dtypes=f32)
        check_tensor("NF4 nested_quant_map", weight.nested_code, (256,), device, dtypes=f32)
    else:
        check_tensor("NF4 absmax", weight.absmax, (n_blocks,), device, dtypes=f32)


def native_forward(x: Tensor, weight: NF4Weight, lora_a: Tensor, lora_b: Tensor, scale: float,
                   bias: Tensor | None = None, config: dict | None = None) -> tuple[Tensor, Tensor]:
    """``(y [M, N], S [M, r])`` through the native kernels (module docstring). Raises TypeError / ValueError
    for bad inputs, RuntimeError off CUDA or without the library (the message says how to build it)."""
    validate(x, weight, lora_a, lora_b, bias, scale)
    cfg = check_config(config)
    if not torch.compiler.is_compiling():  # Dynamo cannot trace the file lookup; the op checks again when it runs
        native.require_library()
    if x.device.type != "cuda":
        raise RuntimeError(f"the native kernels run on CUDA tensors, got {x.device}; use a Triton candidate")
    n, k = weight.shape
    return _native_op(x, weight.packed, weight.absmax, weight.code, weight.nested_absmax, weight.nested_code,
                      weight.offset_value, n, k, weight.blocksize, lora_a, lora_b, float(scale), bias,
                      cfg["split_k"], cfg["row_tiles"], native.TABLES[cfg["table"]])


@torch.library.custom_op("lora_triton::nf4_lora_native_forward", mutates_args=())
def _native_op(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
               nested_code: Optional[Tensor], offset_value: float, n: int, k: int, blocksize: int, lora_a: Tensor,
               lora_b: Tensor, scale: float, bias: Optional[Tensor], split_k: int, row_tiles: int,
               table: int) -> tuple[Tensor, Tensor]:
    if x.device.type != "cuda":
        raise RuntimeError(f"the native kernels run on CUDA tensors, got {x.device}")
    m, r = x.shape[0], lora_a.shape[0]
    y, s = x.new_empty(m, n), x.new_empty(m, r)
    if m == 0:
        return y, s
    for name, t in (("x", x), ("the packed NF4 weight", packed), ("lora_a", lora_a)):
        if t.data_ptr() % native.ALIGNMENT:
            raise ValueError(f"the native kernels read {name} with 16-byte loads: it must start on a 16-byte "
                             f"boundary, got address {t.data_ptr():#x} (a sliced view?); pass a .clone()")
    native.launch_native(native.require_library(), x, packed, absmax, code, nested_absmax, nested_code, offset_value,
                         n, k, blocksize, lora_a, lora_b, scale, bias, y, s, native.Config(split_k, row_tiles, table))
    return y, s


@_native_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, offset_value, n, k, blocksize, lora_a, lora_b, scale, bias,
      split_k, row_tiles, table):
    return x.new_empty(x.shape[0], n), x.new_empty(x.shape[0], lora_a.shape[0])
