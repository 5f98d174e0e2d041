"""The optional native CUDA kernels (top-level ``kernels/``, built by CMake): loading the library with
ctypes, and ``launch_native``.

The decode-size forward ``y = x @ dequant(W)^T + s * (x @ A^T) @ B^T + b``, ``S = x @ A^T`` for
``x [M, K]`` with ``1 <= M <= 16``, bf16 or fp16, ranks 1..128, no dropout; ``kernels/README.md``
has the design and the C interface (``kernels/nf4_lora.h``).

The library is ``liblora_triton_native.so``, built by one command from the repository root::

    cmake -S . -B build/native -DCMAKE_BUILD_TYPE=Release && cmake --build build/native -j

Where it is looked for, in order, each time ``library()`` is called (nothing is read at import):

1. ``$LORA_TRITON_NATIVE_LIB`` when set (a file path; only that path is tried);
2. ``build/native/liblora_triton_native.so`` of the checkout this package lives in;
3. ``liblora_triton_native.so`` next to this module (a copy placed into an installed package).

Loading is cached per path for the life of the process (a failed load too: rebuild, then
restart). The C interface is ``kernels/nf4_lora.h``; the ctypes structures
below mirror it field for field, and ``LT_ABI_VERSION`` must match.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from .runtime import multiprocessors, on_device

ENV_VAR = "LORA_TRITON_NATIVE_LIB"
LIBRARY_FILE = "liblora_triton_native.so"
BUILD_COMMAND = "cmake -S . -B build/native -DCMAKE_BUILD_TYPE=Release && cmake --build build/native -j"
ABI_VERSION = 1

LT_OK, LT_ERR_INVALID, LT_ERR_WORKSPACE, LT_ERR_CUDA = 0, 1, 2, 3
LT_BF16, LT_FP16 = 0, 1


class Config(ctypes.Structure):
    """``lt_config``: 0 fields mean "chosen per shape"."""

    _fields_ = [("split_k", ctypes.c_int), ("row_tiles", ctypes.c_int), ("table", ctypes.c_int)]


class Nf4Weight(ctypes.Structure):
    """``lt_nf4_weight``: device pointers of the packed bytes and block scales."""

    _fields_ = [("packed", ctypes.c_void_p), ("absmax", ctypes.c_void_p), ("code", ctypes.c_void_p),
                ("nested_absmax", ctypes.c_void_p), ("nested_code", ctypes.c_void_p), ("offset", ctypes.c_float),
                ("double_quant", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int), ("blocksize", ctypes.c_int)]


class Plan(ctypes.Structure):
    """``lt_plan``: the launch configuration of a shape and the scratch memory it needs."""

    _fields_ = [("split_k", ctypes.c_int), ("row_tiles", ctypes.c_int), ("shrink_split_k", ctypes.c_int),
                ("workspace_bytes", ctypes.c_size_t), ("counters", ctypes.c_int)]


def checkout_root() -> Path:
    """The directory that holds the ``lora_triton`` package (the repository root in a checkout)."""
    return Path(__file__).resolve().parents[2]


def search_paths() -> list[Path]:
    """Where ``library()`` looks, in order (``$LORA_TRITON_NATIVE_LIB`` alone when it is set)."""
    override = os.environ.get(ENV_VAR)
    if override:
        return [Path(override)]
    return [checkout_root() / "build" / "native" / LIBRARY_FILE, Path(__file__).resolve().parent / LIBRARY_FILE]


def library() -> ctypes.CDLL | None:
    """The loaded native library, or None when no search path holds a loadable one."""
    for path in search_paths():
        if path.is_file():
            lib = _load(str(path))
            if lib is not None:
                return lib
    return None


def missing_message() -> str:
    """Why the library is not there and how to build it."""
    tried = ", ".join(str(p) for p in search_paths())
    reasons = "; ".join(f"{path}: {_LOAD_ERRORS[path]}" for path in map(str, search_paths()) if path in _LOAD_ERRORS)
    return (f"the native CUDA kernels are not built (looked for {tried}{'; ' + reasons if reasons else ''}). "
            f"Build them from the repository root with `{BUILD_COMMAND}` (needs nvcc and CMake >= 3.24), or point "
            f"{ENV_VAR} at a built {LIBRARY_FILE}")


def require_library() -> ctypes.CDLL:
    """The loaded library; RuntimeError saying how to build it when there is none."""
    lib = library()
    if lib is None:
        raise RuntimeError(missing_message())
    return lib


_LOAD_ERRORS: dict[str, str] = {}


@functools.lru_cache(maxsize=8)
def _load(path: str) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(path)
    except OSError as err:
        _LOAD_ERRORS[path] = f"cannot be loaded ({err})"
        return None
    lib.lt_abi_version.restype = ctypes.c_int
    if lib.lt_abi_version() != ABI_VERSION:
        _LOAD_ERRORS[path] = f"ABI version {lib.lt_abi_version()}, this package needs {ABI_VERSION}: rebuild it"
        return None
    lib.lt_last_error.restype = ctypes.c_char_p
    lib.lt_nf4_lora_plan.restype = ctypes.c_int
    lib.lt_nf4_lora_plan.argtypes = [ctypes.c_int] * 4 + [ctypes.POINTER(Config), ctypes.c_int, ctypes.POINTER(Plan)]
    lib.lt_nf4_lora_forward.restype = ctypes.c_int
    lib.lt_nf4_lora_forward.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(Nf4Weight), ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(Config),
        ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return lib


def last_error(lib: ctypes.CDLL) -> str:
    """The library's message for the last failed call on this thread."""
    return lib.lt_last_error().decode("utf-8", "replace")


# ----------------------------------------------------------------------------- launching
NATIVE_DTYPES = (torch.bfloat16, torch.float16)
MAX_M = 16
MAX_RANK = 128
#: ``config["table"]``: where the 16 NF4 code values live while decoding (compile-time variants).
TABLES = {"shared": 0, "register": 1}
CONFIG_DEFAULT = {"split_k": 0, "row_tiles": 0, "table": "shared"}  # 0: chosen per shape by the library
ALIGNMENT = 16  # bytes: the kernels read x, the packed weight and A with 16-byte loads
_DTYPE_CODES = {torch.bfloat16: LT_BF16, torch.float16: LT_FP16}


def check_status(lib: ctypes.CDLL, status: int) -> None:
    """ValueError for the library's invalid-argument status, RuntimeError for the others."""
    if status == LT_OK:
        return
    message = f"native NF4 LoRA kernels: {last_error(lib)}"
    raise (ValueError(message) if status == LT_ERR_INVALID else RuntimeError(message))


def launch_native(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                  nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, offset_value: float, n: int,
                  k: int, blocksize: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                  bias: torch.Tensor | None, y: torch.Tensor, s: torch.Tensor, config: Config) -> None:
    """Fill ``y [M, N]`` and ``S [M, r]`` through the library ``lib`` (validated operands on one device): the
    call runs with x's device current and on its current stream, with a workspace and tile counters of
    its own (zeroed on that stream), so no state is shared with another call."""
    m, r = x.shape[0], lora_a.shape[0]
    with on_device(x.device):
        plan = Plan()
        check_status(lib, lib.lt_nf4_lora_plan(m, n, k, r, ctypes.byref(config), multiprocessors(x.device),
                                               ctypes.byref(plan)))
        workspace = torch.empty(plan.workspace_bytes, dtype=torch.uint8, device=x.device)
        counters = torch.zeros(max(1, plan.counters), dtype=torch.int32, device=x.device)
        double_quant = nested_absmax is not None
        weight = Nf4Weight(packed.data_ptr(), absmax.data_ptr(), code.data_ptr(),
                           nested_absmax.data_ptr() if double_quant else None,
                           nested_code.data_ptr() if double_quant else None,
                           offset_value if double_quant else 0.0, int(double_quant), n, k, blocksize)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        check_status(lib, lib.lt_nf4_lora_forward(
            _DTYPE_CODES[x.dtype], x.data_ptr(), m, ctypes.byref(weight), lora_a.data_ptr(), lora_b.data_ptr(), r,
            scale, None if bias is None else bias.data_ptr(), y.data_ptr(), s.data_ptr(), ctypes.byref(config),
            multiprocessors(x.device), workspace.data_ptr(), plan.workspace_bytes, counters.data_ptr(),
            counters.numel(), -1 if x.device.index is None else x.device.index, stream))
