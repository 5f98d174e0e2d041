"""Where kernels run: the interpreter switch, the GPU's limits, the device guard every launch runs under.

* ``interpreting()`` is the one place that decides "interpreting". Triton's CPU interpreter
  mishandles bf16 (``tl.dot`` multiplies raw bit patterns, element-wise math gives garbage).
  Our answer: under the interpreter only, launchers widen bf16 operands to
  fp32 before the launch (exact) and round the fp32 result back to bf16 with torch
  (round-to-nearest-even) afterwards. On a GPU nothing is widened.
* ``gpu_limits(device)`` reads what one block may use on the GPU (shared memory per block opt-in,
  registers) from ``torch.cuda.get_device_properties``; the same numbers for the GPUs the package is
  built for are data (``ops/kernel_configs.json``). The ops layer chooses every config per GPU from
  them; ``out_of_resources()`` is the error Triton raises, before anything runs, for a config too large.
* ``on_device(device)`` makes the tensors' device current for a launch: Triton and the native
  library launch on the *current* device and stream.

Nothing here reads the environment at import: ``interpreting()`` reads ``TRITON_INTERPRET``
at call time, the switch ``triton.jit`` obeys when it decorates a kernel (a plain ``os.environ``
read, which ``torch.compile`` can trace; Triton's own knob object it cannot).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from dataclasses import dataclass

import torch

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None



class _NoTriton(RuntimeError):
    """Stands in for Triton's ``OutOfResources`` where triton is not installed (nothing raises it)."""


def out_of_resources() -> type[Exception]:
    """Triton's ``OutOfResources`` (a compiled kernel needs more of a resource than the GPU has), imported
    at call time: importing triton here would fix the interpreter switch before a caller sets it."""
    if not TRITON_INSTALLED:
        return _NoTriton
    from triton.runtime.errors import OutOfResources

    return OutOfResources


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return TRITON_INSTALLED and os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_launch(device: torch.device) -> bool:
    """True when a Triton kernel can run on tensors of ``device``."""
    if not TRITON_INSTALLED:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


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


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``: ``"ieee"`` keeps fp32 out of TF32 (its
    1e-3 error would break fp32's bound); fp16 / bf16 operands are unaffected by it."""
    return "ieee" if dtype == torch.float32 else "tf32"


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


# ----------------------------------------------------------------------------- GPU limits
@dataclass(frozen=True)
class GpuLimits:
    """What one block of a kernel may use on a GPU: a config that needs more fails at launch with
    Triton's ``OutOfResources``.

    ``arch``: compute capability as ``10 * major + minor``; ``smem_per_block``: shared memory per
    block in bytes, the opt-in maximum (``cudaDevAttrMaxSharedMemoryPerBlockOptin``);
    ``regs_per_block``: 32-bit registers per block; ``max_threads``: threads per block.
    """

    arch: int
    smem_per_block: int
    regs_per_block: int = 65536
    max_threads: int = 1024

    def fits(self, smem_bytes: int, regs_per_thread: int | None = None, num_warps: int = 4) -> bool:
        """True when a block of ``num_warps`` warps, ``smem_bytes`` of shared memory and
        ``regs_per_thread`` registers per thread (None: not known) can launch."""
        threads = 32 * num_warps
        regs_ok = regs_per_thread is None or regs_per_thread * threads <= self.regs_per_block
        return smem_bytes <= self.smem_per_block and regs_ok and threads <= self.max_threads


def _indexed(device: torch.device) -> torch.device:
    """``device`` with its index (``cuda`` -> ``cuda:<current>``), so one GPU has one cache key."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def gpu_limits(device: torch.device) -> GpuLimits | None:
    """The limits of the CUDA device ``device``, read from the device (``torch.cuda.get_device_properties``,
    once per device); None off CUDA (the interpreter has no such limits)."""
    if device.type != "cuda":
        return None
    return _device_limits(_indexed(device))


@functools.lru_cache(maxsize=None)
def _device_limits(device: torch.device) -> GpuLimits:
    props = torch.cuda.get_device_properties(device)
    return GpuLimits(arch=10 * props.major + props.minor, smem_per_block=int(props.shared_memory_per_block_optin),
                     regs_per_block=min(65536, int(props.regs_per_multiprocessor)),
                     max_threads=int(getattr(props, "max_threads_per_block", 1024)))


def pipelined_smem(stages: int, stage_bytes: int, scratch_bytes: int = 0) -> int:
    """An upper bound of the shared memory of a Triton loop: every tile it loads is buffered once per
    pipeline stage (Triton keeps at most ``num_stages`` copies), plus ``scratch_bytes`` for layout
    conversions outside the pipeline. The static report checks the bound against the compiled kernels."""
    return max(1, stages) * stage_bytes + scratch_bytes


# ----------------------------------------------------------------------------- device guard
_ACTIVE = threading.local()


class on_device:  # noqa: N801 - used like torch.cuda.device
    """``with on_device(device):`` - kernel launches inside run on ``device``: Triton and the native
    library launch on the *current* CUDA device and its current stream, so a layer on ``cuda:1``
    must make ``cuda:1`` current first. The caller's current device is restored on exit. On the CPU
    (the interpreter) there is nothing to switch; the device is only recorded (``launch_device``)."""

    __slots__ = ("device", "_cuda")

    def __init__(self, device: torch.device):
        self.device = device
        self._cuda = None

    def __enter__(self) -> "on_device":
        stack = _active_stack()
        stack.append(self.device)
        if self.device.type == "cuda":
            self._cuda = torch.cuda.device(self.device)
            try:
                self._cuda.__enter__()
            except BaseException:
                stack.pop()
                raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._cuda is not None:
                self._cuda.__exit__(*exc)
                self._cuda = None
        finally:
            _active_stack().pop()


def _active_stack() -> list:
    stack = getattr(_ACTIVE, "stack", None)
    if stack is None:
        stack = _ACTIVE.stack = []
    return stack


def launch_device() -> torch.device | None:
    """The device of the innermost ``on_device`` of this thread (None outside every one): a test
    checks that every kernel launch happens inside the guard of its tensors' device."""
    stack = _active_stack()
    return stack[-1] if stack else None
