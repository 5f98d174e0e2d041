"""Benchmarks of lora-triton, installable with the package (``lora-triton bench``).

    timing       median timers: do_bench / CUDA graphs on a GPU, wall clock on CPU
    environment  device, versions, timestamp and the device's measured peaks for every row
    contenders   the layers compared: ours, bitsandbytes + PEFT, dequantize + F.linear + LoRA
    forward      GPU table: every forward kernel candidate against the baselines
    layer        GPU table: forward, backward, forward+backward per layer, with peak memory
    cpu          CPU table: the torch-backend layer against bitsandbytes' CPU backend + PEFT
    overhead     host time of one layer call at tiny shapes: ours (eager, compiled, mixed batch) vs PEFT
    report       CSV, console tables, PNG plots of speed-up vs M
    cli          ``add_bench_parser`` (the ``bench`` subcommand) and ``python -m lora_triton.bench``
    static       the kernel-efficiency report (sm_90 compiles on CPU; ``--what static``)
    smoke        correctness smoke test of every kernel production launches, against float64 (GPU check, stage 1)
    gpu_check    the GPU check's driver (``bench/gpu_check.sh``): budgeted stages, summary, packaged outputs
    test_benchmarks  pytest-benchmark view of the CPU table: ``pytest lora_triton/bench --benchmark-only``

Nothing here imports a kernel module at import time, so ``TRITON_INTERPRET`` can still be set
by ``cli`` for quick runs on CPU.
"""

from .cli import add_bench_parser, run_bench

__all__ = ["add_bench_parser", "run_bench"]
