"""Where kernels can run, and the interpreter's bf16 shim.

Triton's CPU interpreter mishandles bf16 (``tl.dot`` multiplies raw bit patterns, element-wise
math gives garbage; see shared/TRITON_CPU.md). Our answer: under the interpreter only,
launchers widen bf16 operands to fp32 before the launch (exact) and round the fp32 result
back to bf16 with torch (round-to-nearest-even) afterwards. On a GPU nothing is widened.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def can_launch(device: torch.device) -> bool:
    """True when a Triton kernel can run on tensors of ``device``."""
    if not TRITON_INSTALLED:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


def m_bucket(m: int) -> int:
    """Autotune key for the row count M: its next power of two, so a new sequence length
    reuses the tuning of its bucket instead of benchmarking every config again."""
    return 1 << max(0, m - 1).bit_length()


def kernel_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a launcher hands to the kernel for ``dtype`` operands on ``device``
    (bf16 -> fp32 under the interpreter, everything else unchanged)."""
    if dtype == torch.bfloat16 and device.type == "cpu":
        return torch.float32
    return dtype
