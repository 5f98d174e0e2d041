"""What every benchmark row carries: the machine, the software versions, a timestamp and the
device's peaks measured in the same run (copy bandwidth, dense matmul rate), so a row's
GB/s and TFLOP/s can be read as a fraction of what this device actually reaches."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform

import torch

from .timing import cpu_ms, do_bench_ms

META_FIELDS = ["device", "threads", "torch", "triton", "bitsandbytes", "peft", "timestamp", "peak_copy_gbps",
               "peak_matmul_tflops", "peak_matmul_dtype"]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (else ``platform.processor()``) and its core count."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{model or platform.processor() or 'unknown CPU'} ({os.cpu_count()} cores)"


def device_name(device: torch.device, interpreted: bool = False) -> str:
    """The GPU's name, or the CPU's (``interpreted``: saying that kernels run through Triton's
    interpreter, so their times say nothing about a GPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}{' [triton interpreter]' if interpreted else ''}"


def version(package: str) -> str:
    """Installed version of ``package``, or "" when it is absent."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def import_bitsandbytes():
    """bitsandbytes, or None when it is absent or its native library does not load here."""
    try:
        import bitsandbytes
    except Exception:
        return None
    return bitsandbytes


def measure_peaks(device: torch.device, quick: bool = False) -> dict:
    """Copy bandwidth (GB/s, read + write bytes) and dense matmul rate (TFLOP/s) of ``device``.

    GPU: a 1 GiB device-to-device copy and an 8192^3 bf16 matmul, timed with do_bench.
    CPU: a 64 MiB copy and a 1024^3 fp32 matmul (the dtype CPUs run fastest), wall clock.
    ``quick`` shrinks both (CI smoke runs).
    """
    if device.type == "cuda":
        nbytes, n, dtype = (2**26, 2048, torch.bfloat16) if quick else (2**30, 8192, torch.bfloat16)
        timer = do_bench_ms
    else:
        nbytes, n, dtype = (2**22, 256, torch.float32) if quick else (2**26, 1024, torch.float32)
        timer = cpu_ms
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    matmul_ms = timer(lambda: a @ b)
    del src, dst, a, b
    return {"peak_copy_gbps": f"{2 * nbytes / copy_ms / 1e6:.4g}",
            "peak_matmul_tflops": f"{2 * n**3 / matmul_ms / 1e9:.4g}",
            "peak_matmul_dtype": str(dtype).removeprefix("torch.")}


def environment(device: torch.device, quick: bool = False, interpreted: bool = False) -> dict:
    """The ``META_FIELDS`` of every row: device, versions, UTC timestamp, measured peaks."""
    bnb = import_bitsandbytes()
    return {"device": device_name(device, interpreted), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": version("triton"),
            "bitsandbytes": getattr(bnb, "__version__", "") if bnb else "", "peft": version("peft"),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **measure_peaks(device, quick)}
