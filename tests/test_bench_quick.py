"""``lora-triton bench --quick`` still runs every table and writes what it promises (CI keeps
the benchmarks from rotting). One subprocess runs the forward, layer and CPU tables; on CPU
the forward and layer tables go through Triton's interpreter at tiny shapes."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from lora_triton.bench import add_bench_parser
from lora_triton.bench import adapters as adapters_table
from lora_triton.bench import cpu as cpu_table
from lora_triton.bench import forward as forward_table
from lora_triton.bench import layer as layer_table

from lora_triton.ops import candidates  # noqa: E402

CANDIDATES = set(candidates.FORWARD)  # the rows dispatch may choose from
TIMED = {"dequant", "merged", "skinny", "fused"}  # every Triton candidate on the interpreter, experimental "fused" too
from lora_triton.testing import BENCH_META as META, bnb_and_peft_installed as _bnb_and_peft  # noqa: E402




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
                           "--out", str(out), "--write-dispatch", str(out / "dispatch.json")], cwd=out.parent, env=env,
                          capture_output=True, text=True, timeout=300)
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
    assert TIMED | {"dense", "dequant_linear"} <= methods, methods
    assert {row["note"] for row in rows if row["method"] == "fused"} == {"experimental"}
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
    from lora_triton.ops import dispatch

    table = dispatch.parse_table((out / "dispatch.json").read_text())  # started by --write-dispatch
    assert set(table["gpus"]) == {rows[0]["device"]}
    points = table["gpus"][rows[0]["device"]]["forward"]
    assert sorted(p["m_bucket"] for p in points) == sorted({dispatch.m_bucket(int(r["M"])) for r in rows})
    for point in points:  # the fastest correct candidate of its point
        same = [r for r in rows if dispatch.m_bucket(int(r["M"])) == point["m_bucket"]
                and r["method"] in CANDIDATES and not r["note"]]
        assert point["candidate"] == min(same, key=lambda r: float(r["ms"]))["method"], (point, same)


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
    args = parser.parse_args(["bench", "--quick", "--out", "somewhere", "--budget-s", "12", "--what", "cpu",
                              "--write-dispatch", "table.json", "--plan", "dispatch"])
    assert (args.command, args.quick, args.out, args.budget_s, args.what) == ("bench", True, "somewhere", 12.0, "cpu")
    assert (args.write_dispatch, args.plan) == ("table.json", "dispatch")
    assert callable(args.func)
    defaults = parser.parse_args(["bench"])
    assert not defaults.quick and defaults.what is None and defaults.budget_s > 0
    assert defaults.write_dispatch is None and defaults.plan is None  # nothing is written unless a path is named
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--write-dispatch"])  # a path, not a switch
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--plan", "everything"])


def test_plans_and_budget_shares():
    from lora_triton.bench import cli

    assert forward_table.plan_for(False, "dispatch") is forward_table.DISPATCH
    assert forward_table.DISPATCH["ms"] == [1, 16, 128, 1024, 8192] and forward_table.DISPATCH["ranks"] == [16]
    assert forward_table.DISPATCH["shapes"] == forward_table.LLAMA7B_SHAPES
    assert layer_table.plan_for(False, "dispatch")["ms"] == forward_table.DISPATCH["ms"]
    assert layer_table.plan_for(True, "dispatch") is layer_table.QUICK
    with pytest.raises(ValueError, match="layer table's plan"):
        layer_table.plan_for(False, "crossover")
    with pytest.raises(SystemExit, match="no such plan for the layer table"):
        cli.check_plan("crossover", ["forward", "layer"])
    cli.check_plan("crossover", ["forward"])
    assert cli.budget_share(["forward", "layer"], 90.0) == pytest.approx(60.0)
    assert cli.budget_share(["layer"], 30.0) == pytest.approx(30.0)
    assert cli.budget_share(["forward", "layer"], -5.0) == 0.0


def _forward_row(device: str, m: int, method: str, ms: float) -> dict:
    return {"device": device, "K": 128, "N": 96, "r": 8, "M": m, "op": "forward", "method": method, "config": "",
            "ms": ms, "note": ""}


def test_dispatch_writer_merges_each_point_and_keeps_other_gpus(tmp_path):
    from lora_triton.bench.cli import dispatch_writer
    from lora_triton.ops import dispatch

    path = tmp_path / "table.json"
    other = {"format": dispatch.TABLE_FORMAT, "gpus": {"Other GPU": {"forward": [
        {"m_bucket": 1, "n": 96, "k": 128, "r": 8, "candidate": "skinny", "config": None}]}}}
    path.write_text(json.dumps(other))
    merge = dispatch_writer(str(path), torch.device("cuda"))
    merge([_forward_row("G", 1, "dequant", 2.0), _forward_row("G", 1, "skinny", 1.0),
           _forward_row("G", 1, "fused", 0.5)])  # the experimental kernel is no dispatch candidate
    after_first = dispatch.parse_table(path.read_text())  # written at once, not at the end of the table
    assert [p["candidate"] for p in after_first["gpus"]["G"]["forward"]] == ["skinny"]
    merge([_forward_row("G", 1024, "dequant", 1.0)])
    table = dispatch.parse_table(path.read_text())
    assert table["gpus"]["Other GPU"] == other["gpus"]["Other GPU"]
    assert {(p["m_bucket"], p["candidate"]) for p in table["gpus"]["G"]["forward"]} == {(1, "skinny"), (1024, "dequant")}


def test_dispatch_writer_refuses_what_it_must_not_write(tmp_path):
    from lora_triton.bench.cli import dispatch_writer
    from lora_triton.ops import dispatch

    with pytest.raises(SystemExit, match="takes GPU timings only"):
        dispatch_writer(dispatch.TABLE_PATH, torch.device("cpu"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="not a dispatch table"):
        dispatch_writer(str(bad), torch.device("cpu"))
    assert bad.read_text() == "{not json"
    dispatch_writer(str(tmp_path / "new.json"), torch.device("cpu"))([])  # no rows: nothing written
    assert not (tmp_path / "new.json").exists()


def test_csv_rows_are_on_disk_as_soon_as_appended(tmp_path):
    from lora_triton.bench.report import CsvRows

    path = tmp_path / "deep" / "t.csv"
    with CsvRows(str(path), ["a", "b"]) as out:
        assert _read(path) == (["a", "b"], [])
        out.append([{"a": 1, "b": 2}])
        assert _read(path)[1] == [{"a": "1", "b": "2"}]  # a run stopped here keeps the row
        out.append([{"a": 3, "b": 4}, {"a": 5, "b": 6}])
    assert [row["a"] for row in _read(path)[1]] == ["1", "3", "5"]


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
    """The GPU script's GPU_SWEEP=crossover plan, here its quick twin through the
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
