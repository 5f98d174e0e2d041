"""The GPU check (``bench/gpu_check.sh``, ``lora_triton/bench/gpu_check.py``) on CPU: its dry run end to
end, its stage runner (budgets, process groups), its worst-case arithmetic and its packaging of OUT.

The dry run is the same driver and stages as the GPU run, through Triton's interpreter at toy sizes;
it is what keeps the script working between the rare lent GPUs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from lora_triton.bench import forward as forward_table
from lora_triton.bench import gpu_check as gc
from lora_triton.bench import layer as layer_table
from lora_triton.bench import smoke
from lora_triton.ops import dispatch
from lora_triton.testing import TORCH_FACTOR, TORCH_SLACK

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
SHIPPED_TABLE = REPO / "lora_triton" / "ops" / "dispatch_table.json"
OUT_FILES = {"summary.txt", gc.ARCHIVE, "smoke.csv", "forward.csv", "layer.csv", "dispatch_table.json"}


def _read(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of the script; yields (OUT, the completed process, the shipped table's bytes before it)."""
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    shipped = SHIPPED_TABLE.read_bytes()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=dict(env, OUT=str(out), PYTHON=sys.executable),
                          cwd=out.parent, capture_output=True, text=True,
                          timeout=gc.DRY_RUN_BUDGETS.total + 60)
    return out, done, shipped


def test_dry_run_passes_and_writes_at_most_eight_plain_files(dry_run):
    out, done, _ = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == OUT_FILES
    assert all(p.is_file() and gc.OUT_NAME.match(p.name) for p in out.iterdir())


def _stage_table(summary: str) -> dict[str, list[str]]:
    """The summary's stage table: stage name -> its line split into words."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows[line.split()[0]] = line.split()
    return rows


def test_dry_run_summary_names_every_stage_and_why_one_was_skipped(dry_run):
    out, done, _ = dry_run
    summary = (out / "summary.txt").read_text()
    assert "dry run" in summary and "no number in it is a measurement" in summary
    table = _stage_table(summary)
    assert list(table) == list(gc.STAGES), summary
    for name in ("smoke", "bench", "tests"):
        assert table[name][1] == "ok", table[name]
    assert table["wheels"][1] == table["native_smoke"][1] == "skipped", summary  # GPU-only stages
    checks = smoke.checks(torch.device("cpu"), smoke.TOY_SIZES, "triton")
    assert f"smoke: {len(checks)} of {len(checks)} checks ran, {len(checks)} passed, 0 failed" in summary
    assert summary in done.stdout  # the device tool shows the end of the output


def test_dry_run_smoke_rows_are_one_per_check_and_within_their_bounds(dry_run):
    out, _, _ = dry_run
    fields, rows = _read(out / "smoke.csv")
    assert fields == smoke.FIELDS
    expected = smoke.checks(torch.device("cpu"), smoke.TOY_SIZES, "triton")
    assert [(r["check"], r["shape"], r["dtype"]) for r in rows] == \
        [(c.name, c.shape, str(c.dtype).removeprefix("torch.")) for c in expected]
    for row in rows:
        assert row["ok"] == "1" and "interpreter" in row["device"], row
        assert float(row["error"]) <= float(row["bound"]), row


def test_dry_run_tables_and_dispatch_table(dry_run):
    out, _, shipped = dry_run
    fields, forward_rows = _read(out / "forward.csv")
    assert fields == forward_table.FIELDS and forward_rows
    assert {r["M"] for r in forward_rows} == {str(m) for m in forward_table.QUICK["ms"]}
    fields, layer_rows = _read(out / "layer.csv")
    assert fields == layer_table.FIELDS and layer_rows
    table = dispatch.parse_table((out / "dispatch_table.json").read_text())
    device = forward_rows[0]["device"]
    assert {p["m_bucket"] for p in table["gpus"][device]["forward"]} == \
        {dispatch.m_bucket(m) for m in forward_table.QUICK["ms"]}
    old = json.loads(shipped)
    for gpu, ops in old["gpus"].items():  # merged into the shipped points, which stay
        assert table["gpus"][gpu] == ops
    assert SHIPPED_TABLE.read_bytes() == shipped, "the dry run must never write the shipped dispatch table"


def test_dry_run_archive_holds_every_log_and_not_the_build_tree(dry_run):
    out, _, _ = dry_run
    with tarfile.open(out / gc.ARCHIVE) as archive:
        names = set(archive.getnames())
    table = _stage_table((out / "summary.txt").read_text())
    ran = {name for name, words in table.items() if words[1] != "skipped"}
    assert {"smoke", "bench", "tests"} <= ran
    assert {f"gpu_check/{name}.log" for name in ran} <= names, names
    assert {"gpu_check/summary.txt", "gpu_check/smoke.csv", "gpu_check/bench/forward.csv",
            "gpu_check/bench/forward.png", "gpu_check/environment.txt"} <= names
    assert not any("native-build" in name for name in names)


# ----------------------------------------------------------------------------- the stage runner
def _state(pid: int) -> str:
    """``/proc`` state letter of ``pid``, "" when it is gone (a zombie, ``Z``, has ended too)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _gone(pid: int, within_s: float = 5.0) -> bool:
    end = time.monotonic() + within_s
    while _state(pid) not in ("", "Z"):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


CHILD = """
import subprocess, sys, time
helper = subprocess.Popen(["sleep", "60"])
open(sys.argv[1], "w").write(str(helper.pid))
try:
    time.sleep(float(sys.argv[2]))
except KeyboardInterrupt:
    print("unwound", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def sigint_delivered():
    """Python's SIGINT handler in this process, so its children start with SIGINT at its default (a
    test run launched as a shell's background job inherits it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def bystander():
    """A process outside every stage's group, running the same program as the stages' helpers: ending
    processes by name would take it too."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def test_a_stage_past_its_budget_gets_sigint_then_sigkill_with_its_whole_group(tmp_path, bystander,
                                                                                sigint_delivered):
    stages = gc.Stages(tmp_path, grace_s=0.5)
    pid_file = tmp_path / "helper.pid"
    result = stages.run("slow", [sys.executable, "-c", CHILD, str(pid_file), "60"], 1.0, dict(os.environ), tmp_path)
    assert result.status == "timed out" and result.rc == -signal.SIGKILL, result
    assert "unwound" in (tmp_path / "slow.log").read_text()  # SIGINT came first: Python ran its handlers
    assert _gone(int(pid_file.read_text()))
    assert bystander.poll() is None
    assert stages.results == [result]


def test_a_finished_stage_leaves_nothing_running(tmp_path, bystander):
    stages = gc.Stages(tmp_path, grace_s=0.5)
    pid_file = tmp_path / "helper.pid"
    result = stages.run("quick", [sys.executable, "-c", CHILD, str(pid_file), "0"], 30.0, dict(os.environ), tmp_path)
    assert (result.status, result.rc) == ("ok", 0), result
    assert result.wall_s < 30.0
    assert _gone(int(pid_file.read_text()))
    assert bystander.poll() is None


def test_a_failing_stage_and_a_stopped_runner(tmp_path):
    stages = gc.Stages(tmp_path, grace_s=0.5)
    failed = stages.run("bad", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 10.0,
                        dict(os.environ), tmp_path)
    assert (failed.status, failed.rc) == ("failed", 3) and "boom" in (tmp_path / "bad.log").read_text()
    stages.stop.set()
    after = stages.run("late", [sys.executable, "-c", "pass"], 10.0, dict(os.environ), tmp_path)
    assert after.status == "skipped" and "interrupted" in after.detail


# ----------------------------------------------------------------------------- budgets
def test_every_mode_fits_its_limit_by_construction():
    assert gc.GPU_BUDGETS.total <= 8 * 60
    for budgets, sweep in ((gc.GPU_BUDGETS, None), (gc.CROSSOVER_BUDGETS, "crossover"), (gc.DRY_RUN_BUDGETS, None)):
        chosen = gc.stages_to_run(sweep, frozenset())
        budgets.check(chosen)
        assert budgets.worst_case_s(chosen) <= budgets.total
        assert budgets.bench > budgets.bench_slack > 0


def test_worst_case_adds_the_lanes_side_by_side():
    b = gc.Budgets(wheels=6, nvidia_smi=1, smoke=10, native_configure=2, native_build=20, native_smoke=3, bench=50,
                   bench_slack=5, tests_min=7, packaging=4, grace=1, total=1000)
    everything = set(gc.STAGES)
    # lanes: wheels and smoke (6+1)+(10+1)=18 beside nvidia-smi and native (1+1)+(2+1)+(20+1)+(3+1)=30;
    # then bench 51, tests 8, packaging 4
    assert b.worst_case_s(everything) == 30 + 51 + 8 + 4
    assert b.worst_case_s(gc.stages_to_run("crossover", frozenset())) == 7 + 51 + 4
    assert b.worst_case_s(everything - {"native_build"}) == 18 + 51 + 8 + 4  # the native lane is now 9
    with pytest.raises(ValueError, match="over the 80 s limit"):
        gc.dataclasses.replace(b, total=80).check(everything)


# ----------------------------------------------------------------------------- summary and packaging
def _context(tmp_path: Path) -> gc.Context:
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "bench").mkdir(parents=True)
    return gc.Context(repo=REPO, out=out, work=work, python=sys.executable, dry_run=True, sweep=None,
                      skip=frozenset(), tables=("forward", "layer"), budgets=gc.DRY_RUN_BUDGETS,
                      start=time.monotonic(), env={})


def test_summary_and_out_after_a_run_cut_short(tmp_path):
    """Logs as the stages write them: a failed check, budget-skipped points, a failed candidate, an xdist
    test log stopped part-way; many files in the work folder, at most eight in OUT."""
    ctx = _context(tmp_path)
    row = dict.fromkeys(smoke.FIELDS, "x")
    with open(ctx.work / "smoke.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=smoke.FIELDS)
        writer.writeheader()
        writer.writerows([dict(row, check="forward/dequant", ok="1"), dict(row, check="forward/fused", ok="0",
                                                                           note="y: 3.1e-01 > 4.0e-03")])
    (ctx.work / "smoke.log").write_text("3 checks: forward/dequant, forward/fused, forward/split\n")
    (ctx.work / "bench.log").write_text("forward: budget of 120s spent, skipping (16, 8192, (4096, 4096))\n"
                                        "K=4096 N=4096 r=16 M=1 native: failed (RuntimeError: no)\n")
    (ctx.work / "tests.log").write_text(
        "14 workers [1324 items]\n"
        "[gw0] [  1%] PASSED tests/test_ops.py::test_a[x-y] \n"
        "[gw1] [  2%] FAILED tests/test_native.py::test_b \n"
        "[gw2] [  3%] SKIPPED tests/test_memory.py::test_c \n"
        "______ ERROR collecting tests/test_new.py ______\n"
        "FAILED tests/test_native.py::test_b - ValueError\n"
        "ERROR tests/test_new.py - ImportError\n")
    for i in range(12):
        (ctx.work / f"extra{i}.log").write_text("x")
    results = [gc.Result("smoke", "failed", 1, 30.0, 90.0),
               gc.Result("tests", "timed out", -9, 120.0, 120.0, "stopped at its budget"),
               gc.Result("native_smoke", "skipped", detail="no library")]
    summary = gc.write_summary(ctx, results, set(gc.STAGES), {}, "")
    assert "smoke: 2 of 3 checks ran, 1 passed, 1 failed" in summary
    assert "FAILED forward/fused" in summary and "1 check not reached" in summary
    assert "forward table: 0 rows, 1 point skipped by the budget" in summary
    assert "layer table" not in summary
    assert "candidate failed: K=4096 N=4096 r=16 M=1 native: failed" in summary
    assert "tests: 3 of 1324 ran: 1 failed, 1 passed, 1 skipped" in summary
    assert "FAILED tests/test_native.py::test_b" in summary and "ERROR collecting tests/test_new.py" in summary
    assert _stage_table(summary)["tests"][1:3] == ["timed", "out"]
    written = gc.package(ctx, summary)
    assert written == sorted([gc.ARCHIVE, "smoke.csv", "summary.txt"])
    assert (ctx.out / "summary.txt").read_text() == summary
    with tarfile.open(ctx.out / gc.ARCHIVE) as archive:
        assert {f"gpu_check/extra{i}.log" for i in range(12)} | {"gpu_check/summary.txt"} <= set(archive.getnames())


def test_an_interrupted_driver_still_packages_out(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONSAFEPATH="1")
    skip = "native_configure,native_build,native_smoke"
    driver = subprocess.Popen([sys.executable, "-m", "lora_triton.bench.gpu_check", "--repo", str(REPO), "--out",
                               str(out), "--dry-run", "--skip", skip], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in driver.stdout:
        if "smoke: start" in line:
            break
    driver.send_signal(signal.SIGTERM)
    rest, _ = driver.communicate(timeout=60)
    assert driver.returncode == 1, rest
    summary = (out / "summary.txt").read_text()
    statuses = _stage_table(summary)
    assert "INTERRUPTED by SIGTERM" in summary and list(statuses) == list(gc.STAGES), summary
    assert statuses["smoke"][1] == "stopped", summary
    for name in ("bench", "tests"):  # never started
        assert statuses[name][1] == "skipped" and "interrupted" in statuses[name], summary
    assert statuses["native_build"][-1] == "--skip", summary
    assert (out / gc.ARCHIVE).is_file()


# ----------------------------------------------------------------------------- the smoke rule
def test_smoke_rule_bounds_each_output_by_plain_torchs_error():
    ref = {"y": torch.ones(4, 4, dtype=torch.float64), "S": torch.ones(4, 2, dtype=torch.float64)}
    plain = {"y": ref["y"] * (1 + 1e-3), "S": ref["S"] * (1 + 1e-2)}  # torch's own errors: 1e-3 and 1e-2
    good = smoke.compare({"y": ref["y"] * (1 - 1.5e-3), "S": ref["S"] * (1 + 1.9e-2)}, plain, ref)
    assert good.ok and good.note.startswith("worst output S")
    assert good.bound == pytest.approx(TORCH_FACTOR * 1e-2 + TORCH_SLACK)
    bad = smoke.compare({"y": ref["y"] * (1 + 2.5e-3), "S": ref["S"] * (1 + 1.9e-2)}, plain, ref)  # y: 2.5x torch's
    assert not bad.ok and "y: 2.50e-03 > 2.00e-03" in bad.note and bad.note.startswith("worst output y")
    nan = smoke.compare({"y": ref["y"] * float("nan"), "S": ref["S"]}, plain, ref)
    assert not nan.ok and nan.error == float("inf") and "non-finite" in nan.note
    short = smoke.compare({"y": ref["y"][:3], "S": ref["S"]}, plain, ref)
    assert not short.ok and "y: shape [3, 4], expected [4, 4]" in short.note


def test_a_check_that_raises_is_a_failed_row_and_the_rest_still_run(tmp_path):
    def broken() -> smoke.Outcome:
        raise RuntimeError("out of resources: shared memory\nmore detail")

    todo = [smoke.Check("broken", "1x2x3 r1", torch.bfloat16, broken),
            smoke.Check("fine", "1x2x3 r1", torch.float32, lambda: smoke.Outcome(1e-7, 1e-7, 1.2e-6, True))]
    with smoke.CsvRows(str(tmp_path / "s.csv"), smoke.FIELDS) as out:
        failed = smoke.run_checks(todo, torch.device("cpu"), "cpu", out)
    assert failed == 1
    fields, rows = _read(tmp_path / "s.csv")
    assert fields == smoke.FIELDS and [r["ok"] for r in rows] == ["0", "1"]
    assert rows[0]["note"].startswith("RuntimeError: out of resources: shared memory (test_gpu_check.py:")


def test_the_gpu_runs_commands(tmp_path):
    """What only a GPU run executes, checked here: the bench's and the tests' commands."""
    ctx = gc.Context(repo=REPO, out=tmp_path / "out", work=tmp_path, python="python3", dry_run=False, sweep=None,
                     skip=frozenset(), tables=("forward", "layer"), budgets=gc.GPU_BUDGETS, start=time.monotonic(),
                     env={"PATH": "/bin"})
    bench = gc.bench_command(ctx)
    assert bench[:3] == ["python3", "-m", "lora_triton.bench"] and "--quick" not in bench
    assert bench[bench.index("--write-dispatch") + 1] == str(SHIPPED_TABLE)
    assert bench[bench.index("--plan") + 1] == "dispatch" and bench[bench.index("--what") + 1] == "forward,layer"
    assert float(bench[bench.index("--budget-s") + 1]) == gc.GPU_BUDGETS.bench - gc.GPU_BUDGETS.bench_slack
    more = gc.bench_command(gc.dataclasses.replace(ctx, tables=("forward", "layer", "model")))
    assert more[more.index("--what") + 1] == "forward,layer,model"
    crossover = gc.bench_command(gc.dataclasses.replace(ctx, sweep="crossover"))
    assert crossover[crossover.index("--plan") + 1] == "crossover"
    assert crossover[crossover.index("--what") + 1] == "forward"
    argv, env = gc.tests_command(ctx)
    files = [a for a in argv if a.startswith("tests/")]
    assert files[:len(gc.GPU_TESTS)] == list(gc.GPU_TESTS) and all((REPO / f).is_file() for f in files)
    assert not set(gc.NOT_GPU_TESTS) & set(files)
    assert argv[argv.index("--device") + 1] == "cuda" and env["LORA_TRITON_AUTOTUNE"] == "0"
    assert "TRITON_INTERPRET" not in env and "LORA_TRITON_NATIVE_LIB" not in env  # no library built here
    (tmp_path / "native-build").mkdir()
    (tmp_path / "native-build" / "liblora_triton_native.so").write_bytes(b"")
    (tmp_path / "site").mkdir()
    _, env = gc.tests_command(ctx)
    assert env["LORA_TRITON_NATIVE_LIB"] == str(ctx.library) and env["LORA_TRITON_REQUIRE_NATIVE"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ctx.site)  # the carried wheels come first
