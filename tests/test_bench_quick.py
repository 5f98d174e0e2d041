"""``lora-triton bench --quick`` still runs every table and writes what it promises (CI keeps
the benchmarks from rotting). One subprocess runs the forward, layer and CPU tables; on CPU
the forward and layer tables go through Triton's interpreter at tiny shapes."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import subprocess
import sys

import pytest

from lora_triton.bench import add_bench_parser
from lora_triton.bench import adapters as adapters_table
from lora_triton.bench import cpu as cpu_table
from lora_triton.bench import forward as forward_table
from lora_triton.bench import layer as layer_table

CANDIDATES = {"fused", "split", "decode", "dequant"}
META = ["device", "threads", "torch", "timestamp", "peak_copy_gbps", "peak_matmul_tflops", "peak_matmul_dtype"]


def _bnb_and_peft() -> bool:
    if importlib.util.find_spec("peft") is None:
        return False
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def _timing_number(value: str) -> bool:
    """A timing-derived field is a finite, non-negative number: schema only, never a speed
    (a loaded machine may make any ratio tiny)."""
    return math.isfinite(float(value)) and float(value) >= 0


def _read(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, request):
    """Run the quick forward, layer, cpu and adapters tables once; yield (output folder, stdout, stderr)."""
    device = request.config.getoption("--device")
    out = tmp_path_factory.mktemp("bench") / "nested"
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    # cwd outside the repository keeps its top-level kernels/ folder off sys.path.
    done = subprocess.run([sys.executable, "-m", "lora_triton.bench", "--quick", "--what", "forward,layer,cpu,adapters",
                           "--out", str(out)], cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert ": failed (" not in done.stderr, done.stderr[-3000:]
    return out, done.stdout, done.stderr


def _check_meta(row: dict) -> None:
    for field in META:
        assert row[field], (field, row)
    assert _timing_number(row["peak_copy_gbps"]) and _timing_number(row["peak_matmul_tflops"]), row


def test_forward_table(quick_run):
    out, stdout, _ = quick_run
    fields, rows = _read(out / "forward.csv")
    assert fields == forward_table.FIELDS
    methods = {row["method"] for row in rows}
    assert CANDIDATES | {"dense", "dequant_linear"} <= methods, methods
    assert {row["M"] for row in rows} == {"1", "17"}
    for row in rows:
        _check_meta(row)
        assert row["triton"], row
        for field in ("ms", "tflops", "gbps", "pct_peak_tflops", "pct_peak_gbps", "x_vs_dense",
                      "x_vs_dequant_linear"):
            assert _timing_number(row[field]), (field, row)
        if row["method"].startswith("dequant_only"):  # kernel-only rows: their output is W, not y
            assert row["note"] == "kernel only" and row["rel_err"] == "nan", row
        else:
            assert float(row["rel_err"]) < 2e-2, row  # bf16 output vs an fp32 product on the same weight
        assert row["dispatch"] in CANDIDATES, row
    for m in ("1", "17"):
        assert sum(int(row["fastest_candidate"]) for row in rows if row["M"] == m) == 1
        assert {row["method"] for row in rows if row["M"] == m and row["fastest_candidate"] == "1"} <= CANDIDATES
    assert f"forward: wrote {len(rows)} rows" in stdout
    assert (out / "forward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_layer_rows(rows: list[dict], passes: set[str], dtype_bound: float, on_cuda: bool) -> None:
    impls = {"ours", "dequant_linear"} | ({"bnb_peft"} if _bnb_and_peft() else set())
    assert {row["impl"] for row in rows} == impls
    assert {row["pass"] for row in rows} == passes
    assert len(rows) == len(impls) * len(passes) * len({(r["K"], r["N"], r["r"], r["M"], r["dtype"]) for r in rows})
    for row in rows:
        _check_meta(row)
        for field in ("ms", "tflops", "pct_peak_tflops", "x_vs_dequant_linear"):
            assert _timing_number(row[field]), (field, row)
        if "bnb_peft" in impls:
            assert _timing_number(row["x_vs_bnb_peft"]), row
        assert float(row["rel_err"]) < dtype_bound, row  # y, dx, dA, dB vs an fp32 reference
        assert bool(row["peak_mib"]) == (on_cuda and row["pass"] == "fwd+bwd"), row


def test_layer_table(quick_run, device):
    out, stdout, _ = quick_run
    fields, rows = _read(out / "layer.csv")
    assert fields == layer_table.FIELDS
    _check_layer_rows(rows, set(layer_table.PASSES), 3e-2, device.type == "cuda")
    assert {row["M"] for row in rows} == {"17"}
    assert f"layer: wrote {len(rows)} rows" in stdout
    assert (out / "layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_table(quick_run):
    out, stdout, _ = quick_run
    fields, rows = _read(out / "cpu.csv")
    assert fields == cpu_table.FIELDS
    _check_layer_rows(rows, set(cpu_table.PASSES), 1e-4, on_cuda=False)  # fp32
    assert all("interpreter" not in row["device"] for row in rows)  # the CPU path is plain torch
    assert {row["M"] for row in rows} == {"1", "16"}
    assert f"cpu: wrote {len(rows)} rows" in stdout
    assert (out / "cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_subcommand_options():
    parser = argparse.ArgumentParser(prog="lora-triton")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "--quick", "--out", "somewhere", "--budget-s", "12", "--what", "cpu"])
    assert (args.command, args.quick, args.out, args.budget_s, args.what) == ("bench", True, "somewhere", 12.0, "cpu")
    assert callable(args.func)
    defaults = parser.parse_args(["bench"])
    assert not defaults.quick and defaults.what is None and defaults.budget_s > 0


def test_interleaved_cpu_timer_alternates_and_takes_medians():
    from lora_triton.bench.timing import cpu_ms_interleaved

    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    ms = cpu_ms_interleaved(fns, warmup=1, min_rounds=5, max_rounds=5, min_time_s=0.0)
    assert order == ["a", "b"] * 6  # one warm-up round, then five timed rounds, always in turn
    assert set(ms) == {"a", "b"} and all(math.isfinite(v) and v >= 0 for v in ms.values())


def test_cpu_table_point_times_contenders_interleaved():
    """A full (non-quick) CPU point at a tiny shape: every contender, both passes, the
    interleaved timer, correct results, ratios against the baselines present."""
    import torch

    meta = {name: "x" for name in META} | {"peak_matmul_tflops": "1.0"}
    rows = layer_table.bench_point(3, 96, 128, 4, torch.float32, torch.device("cpu"), "torch", meta,
                                   quick=False, passes=cpu_table.PASSES)
    impls = {row["impl"] for row in rows}
    assert {"ours", "dequant_linear"} <= impls and (("bnb_peft" in impls) == _bnb_and_peft())
    assert len(rows) == 2 * len(impls) and all(row["timer"] == "cpu_wall_interleaved" for row in rows)
    for row in rows:
        assert _timing_number(row["ms"]) and float(row["rel_err"]) < 1e-5
        assert _timing_number(row["x_vs_dequant_linear"])


def test_adapters_table(quick_run):
    out, stdout, _ = quick_run
    fields, rows = _read(out / "adapters.csv")
    assert fields == adapters_table.FIELDS
    impls = {"ours_mixed", "ours_single", "ours_subbatches"} | ({"peft_mixed", "peft_single"} if _bnb_and_peft()
                                                                else set())
    points = {(r["pass"], r["B"], r["T"], r["distinct"]) for r in rows}
    assert {p[0] for p in points} == set(adapters_table.PASSES) and {p[3] for p in points} == {"1", "4"}
    assert len(rows) == len(points) * len(impls) and {row["impl"] for row in rows} == impls
    for row in rows:
        _check_meta(row)
        assert _timing_number(row["ms"]) and _timing_number(row["tokens_per_s"]), row
        if row["impl"] == "ours_mixed":
            assert _timing_number(row["x_vs_ours_single"]), row
            if _bnb_and_peft():  # the same NF4 bytes and adapters as PEFT's mixed batch: the same outputs
                assert float(row["rel_err_vs_peft"]) < 1e-5 and _timing_number(row["x_vs_peft_mixed"]), row
    assert f"adapters: wrote {len(rows)} rows" in stdout
    assert (out / "adapters.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_crossover_sweep_has_dx_rows_and_a_dispatch_table_for_both(tmp_path, request):
    """The GPU script's GPU_SWEEP=crossover plan (issue 14), here its quick twin through the
    interpreter: forward and dx rows, and a dispatch table with points for both operations."""
    from lora_triton.ops import dispatch

    env = dict(os.environ, LORA_TRITON_FORWARD_SWEEP="crossover")
    if request.config.getoption("--device") == "cpu":
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-m", "lora_triton.bench", "--quick", "--what", "forward",
                           "--out", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    _, rows = _read(tmp_path / "forward.csv")
    assert {row["op"] for row in rows} == {"forward", "dx"}
    assert all(row["method"].startswith("dx:") for row in rows if row["op"] == "dx")
    table = dispatch.table_from_rows(rows)
    ops = {op for gpu in table["gpus"].values() for op in gpu}
    assert ops == {"forward", "dx"}, table
