"""Decode-size forward through the native CUDA kernels (top-level ``kernels/``, issue 20).

``y = x @ dequant(W)^T + s * (x @ A^T) @ B^T + b`` and ``S = x @ A^T`` for ``x [M, K]`` with
``1 <= M <= 16``, NF4 ``W [N, K]`` in bitsandbytes' bytes (plain or double-quantized absmax),
``A [r, K]``, ``B [N, r]``, ``b [N]``, ``1 <= r <= 128``; activations, adapter and bias bf16 or
fp16 (one dtype), fp32 accumulation; ``y [M, N]``, ``S [M, r]`` in that dtype. No dropout
(decode is inference; the Triton ``skinny`` kernel covers dropout).

``lora_forward_native`` validates with the Triton launchers' own checks (plus dtype, M and quant
state checks of its own), then calls the
``torch.library`` custom op ``lora_triton::nf4_lora_native_forward`` (opaque to ``torch.compile``,
with a fake kernel for shapes), whose CUDA implementation calls the C interface of
``kernels/nf4_lora.h`` through ``native_lib`` on the current stream. The library is optional:
without it ``supports`` is False and a call raises a RuntimeError that says how to build it.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch
from torch import Tensor

from ..format import NF4Weight
from ..format.nf4 import num_blocks
from . import native_lib
from .checks import check_tensor
from .runtime import multiprocessors, on_device
from .lora_forward import validate_operands

NATIVE_DTYPES = (torch.bfloat16, torch.float16)
MAX_M = 16
MAX_RANK = 128
#: ``config["table"]``: where the 16 NF4 code values live while decoding (compile-time variants).
TABLES = {"shared": 0, "register": 1}
CONFIG_DEFAULT = {"split_k": 0, "row_tiles": 0, "table": "shared"}  # 0: chosen per shape by the library
_ALIGNMENT = 16  # bytes: the kernels read x, the packed weight and A with 16-byte loads
_DTYPE_CODES = {torch.bfloat16: native_lib.LT_BF16, torch.float16: native_lib.LT_FP16}


def available() -> bool:
    """True when the native library can be loaded (it does not say a GPU is there)."""
    return native_lib.library() is not None


def supports(device: torch.device, m: int, dtype: torch.dtype, r: int = 1) -> bool:
    """Whether the native kernels can run a forward of ``m`` tokens of ``dtype`` at rank ``r`` on ``device``."""
    return device.type == "cuda" and 0 <= m <= MAX_M and 1 <= r <= MAX_RANK and dtype in NATIVE_DTYPES and available()


def check_config(config: dict | None) -> dict:
    """``config`` completed with ``CONFIG_DEFAULT``; ValueError naming the bad field otherwise."""
    unknown = sorted(set(config or {}) - set(CONFIG_DEFAULT))
    if unknown:
        raise ValueError(f"native config: unknown keys {unknown}; expected some of {list(CONFIG_DEFAULT)}")
    full = {**CONFIG_DEFAULT, **(config or {})}
    split_k = full["split_k"]
    if isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 0:
        raise ValueError(f"native config: split_k must be an int >= 0 (0: per shape), got {split_k!r}")
    if full["row_tiles"] not in (0, 2, 4) or isinstance(full["row_tiles"], bool):
        raise ValueError(f"native config: row_tiles must be 0 (per shape), 2 or 4, got {full['row_tiles']!r}")
    if full["table"] not in TABLES:
        raise ValueError(f"native config: table must be one of {list(TABLES)}, got {full['table']!r}")
    return full


def validate(x: Tensor, weight: NF4Weight, lora_a: Tensor, lora_b: Tensor, bias: Tensor | None, scale: float) -> None:
    """Raise TypeError / ValueError with a clear message unless the operands suit the native kernels.

    Checks types, dtypes, shapes, devices, contiguity and stride-0 tensors, M and rank limits, and
    the quant state's tensors; works on fake tensors (addresses are checked at launch).
    """
    if isinstance(x, Tensor) and x.dtype not in NATIVE_DTYPES:
        raise TypeError(f"the native kernels take bf16 or fp16 activations, got {x.dtype} (fp32: use the Triton "
                        "candidates)")
    validate_operands(x, weight, lora_a, lora_b, bias, scale, 0.0, 0)  # the Triton launchers' checks
    if x.shape[0] > MAX_M:
        raise ValueError(f"the native kernels are for decode sizes, M <= {MAX_M} tokens, got M={x.shape[0]}")
    if lora_a.shape[0] > MAX_RANK:
        raise ValueError(f"the native kernels take LoRA ranks up to {MAX_RANK}, got r={lora_a.shape[0]}")
    _check_quant_state(weight, x.device)


def _check_quant_state(weight: NF4Weight, device: torch.device) -> None:
    """The NF4 tensors as the kernels read them: dtypes, sizes, device, contiguity."""
    n_blocks = num_blocks(weight.numel, weight.blocksize)
    u8, f32 = (torch.uint8,), (torch.float32,)
    check_tensor("NF4 packed weight", weight.packed, ((weight.numel + 1) // 2,), device, dtypes=u8)
    check_tensor("NF4 quant_map", weight.code, (16,), device, dtypes=f32)
    if weight.double_quant:
        check_tensor("NF4 absmax (double-quantized)", weight.absmax, (n_blocks,), device, dtypes=u8)
        check_tensor("NF4 nested_absmax", weight.nested_absmax, (-(-n_blocks // 256),), device, dtypes=f32)
        check_tensor("NF4 nested_quant_map", weight.nested_code, (256,), device, dtypes=f32)
    else:
        check_tensor("NF4 absmax", weight.absmax, (n_blocks,), device, dtypes=f32)


def lora_forward_native(x: Tensor, weight: NF4Weight, lora_a: Tensor, lora_b: Tensor, scale: float,
                        bias: Tensor | None = None, config: dict | None = None) -> tuple[Tensor, Tensor]:
    """``(y [M, N], S [M, r])`` through the native kernels (see the module docstring for shapes).

    ``config``: ``split_k`` (0: per shape), ``row_tiles`` (16-row tiles per CTA, 2 or 4; 0: per
    shape), ``table`` (``"shared"`` or ``"register"``). Raises TypeError / ValueError for bad
    inputs, RuntimeError off CUDA or without the library (the message says how to build it).
    """
    validate(x, weight, lora_a, lora_b, bias, scale)
    cfg = check_config(config)
    if not torch.compiler.is_compiling():  # Dynamo cannot trace the file lookup; the op checks again when it runs
        native_lib.require_library()
    if x.device.type != "cuda":
        raise RuntimeError(f"the native kernels run on CUDA tensors, got {x.device}; use lora_forward_triton")
    n, k = weight.shape
    return _native_op(x, weight.packed, weight.absmax, weight.code, weight.nested_absmax, weight.nested_code,
                      weight.offset_value, n, k, weight.blocksize, lora_a, lora_b, float(scale), bias,
                      cfg["split_k"], cfg["row_tiles"], TABLES[cfg["table"]])


# ----------------------------------------------------------------------------- the custom op
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
        if t.data_ptr() % _ALIGNMENT:
            raise ValueError(f"the native kernels read {name} with 16-byte loads: it must start on a 16-byte "
                             f"boundary, got address {t.data_ptr():#x} (a sliced view?); pass a .clone()")
    lib = native_lib.require_library()
    launch_native(lib, x, packed, absmax, code, nested_absmax, nested_code, offset_value, n, k, blocksize, lora_a,
                  lora_b, scale, bias, y, s, native_lib.Config(split_k, row_tiles, table))
    return y, s


def launch_native(lib, x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                  nested_code: Optional[Tensor], offset_value: float, n: int, k: int, blocksize: int, lora_a: Tensor,
                  lora_b: Tensor, scale: float, bias: Optional[Tensor], y: Tensor, s: Tensor,
                  config: native_lib.Config) -> None:
    """Fill ``y [M, N]`` and ``S [M, r]`` through the library ``lib`` (validated operands on one device): the
    call runs with x's device current and on its current stream, with a workspace and tile counters of
    its own (zeroed on that stream), so no state is shared with another call."""
    m, r = x.shape[0], lora_a.shape[0]
    with on_device(x.device):
        plan = native_lib.Plan()
        _check_status(lib, lib.lt_nf4_lora_plan(m, n, k, r, ctypes.byref(config), multiprocessors(x.device),
                                                ctypes.byref(plan)))
        workspace = torch.empty(plan.workspace_bytes, dtype=torch.uint8, device=x.device)
        counters = torch.zeros(max(1, plan.counters), dtype=torch.int32, device=x.device)
        double_quant = nested_absmax is not None
        weight = native_lib.Nf4Weight(packed.data_ptr(), absmax.data_ptr(), code.data_ptr(),
                                      nested_absmax.data_ptr() if double_quant else None,
                                      nested_code.data_ptr() if double_quant else None,
                                      offset_value if double_quant else 0.0, int(double_quant), n, k, blocksize)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        _check_status(lib, lib.lt_nf4_lora_forward(
            _DTYPE_CODES[x.dtype], x.data_ptr(), m, ctypes.byref(weight), lora_a.data_ptr(), lora_b.data_ptr(), r,
            scale, None if bias is None else bias.data_ptr(), y.data_ptr(), s.data_ptr(), ctypes.byref(config),
            multiprocessors(x.device), workspace.data_ptr(), plan.workspace_bytes, counters.data_ptr(),
            counters.numel(), -1 if x.device.index is None else x.device.index, stream))


@_native_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, offset_value, n, k, blocksize, lora_a, lora_b, scale, bias,
      split_k, row_tiles, table):
    return x.new_empty(x.shape[0], n), x.new_empty(x.shape[0], lora_a.shape[0])


def _check_status(lib, status: int) -> None:
    if status == native_lib.LT_OK:
        return
    message = f"native NF4 LoRA kernels: {native_lib.last_error(lib)}"
    raise (ValueError(message) if status == native_lib.LT_ERR_INVALID else RuntimeError(message))
