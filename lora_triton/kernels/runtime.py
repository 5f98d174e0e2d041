"""Where kernels can run, the one place that decides "interpreting", and the interpreter's bf16 shim.

Triton's CPU interpreter mishandles bf16 (``tl.dot`` multiplies raw bit patterns, element-wise
math gives garbage; see shared/TRITON_CPU.md). Our answer: under the interpreter only,
launchers widen bf16 operands to fp32 before the launch (exact) and round the fp32 result
back to bf16 with torch (round-to-nearest-even) afterwards. On a GPU nothing is widened.

Nothing here reads the environment at import: ``interpreting()`` reads ``TRITON_INTERPRET``
at call time, the switch ``triton.jit`` obeys when it decorates a kernel (a plain ``os.environ``
read, which ``torch.compile`` can trace; Triton's own knob object it cannot).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return TRITON_INSTALLED and os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_launch(device: torch.device) -> bool:
    """True when a Triton kernel can run on tensors of ``device``."""
    if not TRITON_INSTALLED:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def require_launchable(device: torch.device) -> None:
    """Raise a RuntimeError that says what to do when Triton cannot run on ``device``."""
    if not can_launch(device):
        raise RuntimeError(f"cannot run Triton kernels on {device}: use a CUDA device, set TRITON_INTERPRET=1 "
                           "before importing lora_triton kernels (tests), or method='torch'")


def default_table(device: torch.device) -> str:
    """The NF4 code-table variant (``nf4_decode.TABLES``) kernels use on ``device``: the warp
    shuffle on a GPU (fewest instructions in the static report), ``tl.gather`` in the interpreter
    (the inline assembly cannot run there)."""
    return "gather" if device.type == "cpu" else "shfl"


def m_bucket(m: int) -> int:
    """Autotune key for the row count M: its next power of two, so a new sequence length
    reuses the tuning of its bucket instead of benchmarking every config again."""
    return 1 << max(0, m - 1).bit_length()


def padded_rank(r: int) -> int:
    """The rank the kernels compute with: a power of two >= 16 (tl.dot's smallest tile)."""
    return max(16, 1 << max(0, r - 1).bit_length())


def kernel_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a launcher hands to the kernel for ``dtype`` operands on ``device``
    (bf16 -> fp32 under the interpreter, everything else unchanged)."""
    if dtype == torch.bfloat16 and device.type == "cpu":
        return torch.float32
    return dtype


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device (asked once per device); 2 for the interpreter's CPU."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def tile_counters(device: torch.device, count: int) -> torch.Tensor:
    """The per-device int32 counter buffer of the split-K kernels' last-program reductions (the
    Triton skinny kernel and the native one), at least ``count`` long. It is zero between launches:
    each launch leaves it as it found it, so launches on one stream may share it; two launches
    must not run concurrently on different streams."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < count:
        buf = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf
