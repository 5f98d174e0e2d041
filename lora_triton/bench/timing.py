"""Timers: the median time of a zero-argument callable, after warm-up, on GPU or CPU.

* ``gpu_ms``  - ``triton.testing.do_bench`` (median, L2 flushed before every call), or for
  launch-bound work a CUDA graph of ``reps`` flushed calls, minus a graph of the flushes alone.
* ``cpu_ms``  - wall clock: warm-up calls, then the median of repeated calls;
  ``cpu_ms_interleaved`` the same for several callables in alternating rounds.
* ``time_ms`` - the right one for a device; returns ``(ms, timer name)`` so tables can say how
  each number was taken.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Iterable, Iterator

import torch

#: Bytes zeroed between timed calls to evict the L2 cache (H100/H200 L2: 50-60 MB).
L2_FLUSH_BYTES = 256 * 2**20


def cpu_ms(fn: Callable[[], object], warmup: int = 2, min_reps: int = 5, max_reps: int = 50,
           min_time_s: float = 0.3) -> float:
    """Median wall-clock milliseconds of ``fn`` on CPU: ``warmup`` untimed calls, then at least
    ``min_reps`` timed calls, more (up to ``max_reps``) until ``min_time_s`` has passed."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cpu_ms_interleaved(fns: dict[str, Callable[[], object]], warmup: int = 2, min_rounds: int = 7,
                       max_rounds: int = 60, min_time_s: float = 0.6) -> dict[str, float]:
    """Median wall-clock milliseconds of each of ``fns`` on CPU, timed in alternating rounds
    (one call of each per round, in turn), so a slow spell of a shared machine hits every
    contender alike instead of whichever was being timed: ``warmup`` untimed rounds, then at least
    ``min_rounds`` rounds, more (up to ``max_rounds``) until ``min_time_s`` has passed."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() - start < min_time_s):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {name: statistics.median(values) for name, values in times.items()}


def do_bench_ms(fn: Callable[[], object], warmup_ms: float = 10, rep_ms: float = 40) -> float:
    """Median milliseconds from ``triton.testing.do_bench`` (it flushes L2 before each call)."""
    import triton

    fn()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5]))


def cuda_graph_ms(fn: Callable[[], object], reps: int = 20, replays: int = 7) -> float:
    """Median milliseconds per call of ``fn`` replayed from a CUDA graph (no launch overhead).

    One graph holds ``reps`` x (zero an L2-sized buffer, ``fn``), a second the flushes alone;
    the per-call time is the difference of their median replay times over ``reps``. ``fn``
    must be capturable (no host synchronisation, no allocation that depends on data).
    """
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    fn()  # compile / autotune before capture: tuning cannot run inside a graph
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch's graph docs ask
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    def capture(with_fn: bool) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                flush.zero_()
                if with_fn:
                    fn()
        return graph

    work, flushes = capture(True), capture(False)

    def replay_ms(graph: torch.cuda.CUDAGraph) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    replay_ms(work), replay_ms(flushes)  # first replays upload the graphs
    work_ms = statistics.median(replay_ms(work) for _ in range(replays))
    flush_ms = statistics.median(replay_ms(flushes) for _ in range(replays))
    return max(work_ms - flush_ms, 1e-6) / reps


def gpu_ms(fn: Callable[[], object], use_cuda_graph: bool = False) -> tuple[float, str]:
    """``(median ms, timer)`` on a GPU: a CUDA graph when asked and capturable, else do_bench."""
    if use_cuda_graph:
        try:
            return cuda_graph_ms(fn), "cuda_graph"
        except Exception:  # not capturable (host sync, CPU-side work): fall back, and say so
            torch.cuda.synchronize()
    return do_bench_ms(fn), "do_bench"


def time_ms(fn: Callable[[], object], device: torch.device, use_cuda_graph: bool = False,
            quick: bool = False) -> tuple[float, str]:
    """``(median ms, timer)`` of ``fn`` on ``device`` (``quick``: fewer CPU repetitions)."""
    if device.type == "cuda":
        return gpu_ms(fn, use_cuda_graph)
    if quick:
        return cpu_ms(fn, warmup=1, min_reps=2, max_reps=3, min_time_s=0.0), "cpu_wall"
    return cpu_ms(fn), "cpu_wall"


def within_budget(points: Iterable[tuple], budget_s: float, table: str) -> Iterator[tuple]:
    """Yield ``points`` while less than ``budget_s`` seconds have passed since the first one;
    name every later point on stderr as skipped."""
    start = time.monotonic()
    for point in points:
        if time.monotonic() - start > budget_s:
            print(f"{table}: budget of {budget_s:.0f}s spent, skipping {point}", file=sys.stderr)
            continue
        yield point
