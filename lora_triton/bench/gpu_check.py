"""The GPU check: everything a lent GPU should tell the package, in one call of at most 8 minutes.

``bench/gpu_check.sh`` sets up the import path and runs this driver (``python -m
lora_triton.bench.gpu_check --repo ROOT --out OUT``). Stages, in order of value, each a child
process in its own process group with its own time budget (``Budgets``):

1. in one lane ``wheels`` (the carried wheels of ``bench/fetch_gpu_wheels.sh``, bitsandbytes, installed
   into a private folder of the run, never the image) and ``smoke`` (``bench/smoke.py``: every kernel
   production launches against float64, fixed configs); beside them in a second lane ``nvidia_smi``
   (the GPU, its driver) and the native library: ``native_configure`` and ``native_build`` (CMake,
   sm_90) and ``native_smoke`` (its kernels against float64, when it was built);
2. ``bench``: the forward and layer tables at the points that decide dispatch (``--plan dispatch``),
   each point's rows appended to its CSV as measured, the dispatch table merged point by point into
   the repository's ``lora_triton/ops/dispatch_table.json`` (``--write-dispatch``); ``--tables`` adds
   the ``model`` or ``adapters`` table (full size), sharing the stage's budget;
3. ``tests``: the GPU tests (``LORA_TRITON_AUTOTUNE=0``: fixed configs) in the time left, files
   in order of value.

A stage that outlives its budget gets SIGINT (Python unwinds, pytest prints its summary), then
SIGKILL after a grace period, sent to its own process group only; whatever a finished stage left
running in its group is killed too, so no stray worker shares the GPU with the timings. The tests
end by ``total - packaging`` seconds after the start, and the other stages' budgets (the two lanes
side by side) leave them at least ``tests_min``: ``Budgets.check`` verifies that before anything
runs, so the call ends within ``total`` by construction.

``OUT`` receives ``summary.txt`` (what ran, what was skipped and why, per-stage wall time and exit
status, then the smoke, bench and test outcomes), ``gpu_check.tar.gz`` (every log, CSV and plot), and
beside it ``smoke.csv``, each bench table's CSV (``forward.csv``, ``layer.csv``) and
``dispatch_table.json``: at most ``MAX_OUT_FILES`` plain files, written even when a stage timed out
or the driver was interrupted.

``--dry-run`` runs the same stages on the CPU through Triton's interpreter at toy sizes (the
``--quick`` tables, a few test files), with its own budgets, into the same files: CI runs it.
``--sweep crossover`` is a measurement run instead: the forward table's crossover plan (dx rows
too) with the whole budget, no smoke, native or tests stage.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

#: What the device tool brings back from OUT: at most 8 plain files, names of these characters.
MAX_OUT_FILES = 8
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
ARCHIVE = "gpu_check.tar.gz"
#: The GPU test files in order of value (the production paths first); any other test file that takes
#: the ``device`` fixture or touches CUDA runs after them.
GPU_TESTS = ("tests/test_forward_kernel.py", "tests/test_gpu_safety.py", "tests/test_dx_kernel.py", "tests/test_ops.py",
             "tests/test_multi_lora_kernel.py", "tests/test_mixed_batch.py", "tests/test_nf4_decode.py",
             "tests/test_native.py", "tests/test_dispatch.py", "tests/test_module.py", "tests/test_memory.py",
             "tests/test_format_container.py", "tests/test_skinny_kernel.py")
#: Never on the GPU list: the dry run's own test (it would run this driver again), and the quick benchmark
#: tables, which the bench stage has just run at full size.
NOT_GPU_TESTS = ("tests/test_gpu_check.py", "tests/test_bench_quick.py")
DRY_RUN_TESTS = ("tests/test_dispatch.py",)
#: What ``--tables`` may name (the bench stage's ``--what``).
BENCH_TABLES = ("forward", "layer", "model", "adapters", "overhead")
TEST_WORKERS = 14  # Triton compiles bound the run, one CPU core each; the GPU machine has 16
TEST_TIMEOUT_S = 90  # per test (pytest-timeout), so one hung test cannot take the stage


@dataclass(frozen=True)
class Budgets:
    """Seconds each stage may run (``bench_slack``: the bench stops starting points that long before
    its limit, to finish the point in progress and write its plots). The tests get what is left of
    ``total`` after ``packaging`` and one ``grace``, and run only when at least ``tests_min`` is left.
    ``grace``: between SIGINT and SIGKILL of a stage that outlived its budget."""

    wheels: float
    nvidia_smi: float
    smoke: float
    native_configure: float
    native_build: float
    native_smoke: float
    bench: float
    bench_slack: float
    tests_min: float
    packaging: float
    grace: float
    total: float

    def worst_case_s(self, stages: set[str]) -> float:
        """The longest the call can take when ``stages`` run: every fixed stage to its budget and
        grace (the two lanes of stage 1 side by side), the tests at least ``tests_min``, packaging."""
        def lane(names: tuple[str, ...]) -> float:
            return sum(getattr(self, name) + self.grace for name in names if name in stages)

        first = max(lane(lane_stages) for lane_stages in LANES)
        tests = self.tests_min + self.grace if "tests" in stages else 0.0
        return first + lane(("bench",)) + tests + self.packaging

    def check(self, stages: set[str]) -> None:
        """ValueError unless ``stages`` fit ``total`` even when every one runs to its budget."""
        worst = self.worst_case_s(stages)
        if worst > self.total:
            raise ValueError(f"stage budgets add up to {worst:.0f} s in the worst case, over the {self.total:.0f} s "
                             "limit of one call")


#: One device call: 8 minutes by construction, the tool's 10-minute limit leaves room for the start.
GPU_BUDGETS = Budgets(wheels=30, nvidia_smi=10, smoke=105, native_configure=20, native_build=70, native_smoke=25,
                      bench=230, bench_slack=40, tests_min=45, packaging=20, grace=8, total=480)
#: The crossover sweep: the bench stage takes what the smoke, native and tests stages leave.
CROSSOVER_BUDGETS = dataclasses.replace(GPU_BUDGETS, bench=410)
#: The dry run on a 2-core CI machine: the interpreter is slow, the sizes are toys.
DRY_RUN_BUDGETS = Budgets(wheels=30, nvidia_smi=10, smoke=90, native_configure=30, native_build=60, native_smoke=20,
                          bench=120, bench_slack=45, tests_min=20, packaging=15, grace=5, total=360)
STAGES = ("wheels", "nvidia_smi", "smoke", "native_configure", "native_build", "native_smoke", "bench", "tests")
#: The first stages run in two lanes side by side (the Python lane and the native one), then the rest in turn.
LANES = (("wheels", "smoke"), ("nvidia_smi", "native_configure", "native_build", "native_smoke"))


@dataclass
class Result:
    """How a stage went: ``status`` is ``ok``, ``failed`` (non-zero exit), ``timed out`` (stopped at its
    budget), ``stopped`` (the driver was interrupted while it ran), ``skipped`` or ``not run`` (the
    driver stopped before it); ``detail`` says why or how, ``rc`` is the exit status, ``wall_s`` its
    wall time, ``budget_s`` its limit."""

    name: str
    status: str
    rc: int | None = None
    wall_s: float = 0.0
    budget_s: float = 0.0
    detail: str = ""


# ----------------------------------------------------------------------------- running one stage
class Stages:
    """Runs stages as children, each in a new session (so its own process group, id = its pid), and
    ends a group by that id alone. Keeps every ``Result`` in ``results``, in the order they ended.
    ``stop`` (set by the driver's SIGINT/SIGTERM handler) ends the stage running in each lane at once
    and starts no other."""

    def __init__(self, work: Path, grace_s: float):
        self.work, self.grace_s = work, grace_s
        self.results: list[Result] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def skip(self, name: str, why: str) -> Result:
        with self._lock:
            self.results.append(Result(name, "skipped", detail=why))
            return self.results[-1]

    def run(self, name: str, argv: list[str], budget_s: float, env: dict[str, str], cwd: Path) -> Result:
        """Run ``argv`` with stdout and stderr to ``WORK/<name>.log``; at most ``budget_s`` seconds,
        then SIGINT, SIGKILL ``grace_s`` later. Prints a line when it starts and when it ends."""
        if self.stop.is_set():
            return self.skip(name, "the driver was interrupted")
        print(f"[{_clock()}] {name}: start (budget {budget_s:.0f} s): {' '.join(argv)}", flush=True)
        start = time.monotonic()
        with open(self.work / f"{name}.log", "w") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=cwd, start_new_session=True)
        try:
            ended = _wait(proc.pid, budget_s, self.stop)
            if ended == "budget":
                _signal_group(proc.pid, signal.SIGINT)
                _wait(proc.pid, self.grace_s, self.stop)
        finally:
            _signal_group(proc.pid, signal.SIGKILL)  # what it left behind; the leader is still unreaped
            rc = proc.wait()
        wall = time.monotonic() - start
        status, detail = {"exited": ("ok" if rc == 0 else "failed", ""),
                          "budget": ("timed out", f"stopped at its budget: SIGINT, SIGKILL {self.grace_s:.0f} s later"),
                          "stop": ("stopped", "the driver was interrupted")}[ended]
        print(f"[{_clock()}] {name}: {status} (exit {rc}) after {wall:.1f} s", flush=True)
        with self._lock:
            self.results.append(Result(name, status, rc, wall, budget_s, detail))
            return self.results[-1]


def _wait(pid: int, timeout_s: float, stop: threading.Event) -> str:
    """Wait for child ``pid`` to exit (``"exited"``), for ``timeout_s`` (``"budget"``) or for ``stop``
    (``"stop"``), leaving the child unreaped (``WNOWAIT``): while it is a zombie its process-group id
    cannot be reused, so signalling that group afterwards stays safe."""
    end = time.monotonic() + timeout_s
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if stop.is_set():
            return "stop"
        if time.monotonic() >= end:
            return "budget"
        time.sleep(0.1)
    return "exited"


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the group is empty
        pass


def _clock() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")


# ----------------------------------------------------------------------------- the plan
@dataclass
class Context:
    """Everything the stages share: folders, interpreter, mode, the environment of the children."""

    repo: Path
    out: Path
    work: Path
    python: str
    dry_run: bool
    sweep: str | None
    skip: frozenset[str]
    tables: tuple[str, ...]
    budgets: Budgets
    start: float
    env: dict[str, str]

    @property
    def site(self) -> Path:
        """Where the carried wheels are installed (first on the stages' ``PYTHONPATH`` when they are)."""
        return self.work / "site"

    @property
    def build(self) -> Path:
        return self.work / "native-build"

    @property
    def library(self) -> Path:
        return self.build / "liblora_triton_native.so"

    @property
    def dispatch_path(self) -> Path:
        """Where the bench merges its dispatch points: the repository's table on a GPU, a copy in the
        dry run (interpreter timings never enter the shipped table)."""
        shipped = self.repo / "lora_triton" / "ops" / "dispatch_table.json"
        return self.work / "dispatch_table.json" if self.dry_run else shipped

    def child_env(self, native: bool, **extra: str) -> dict[str, str]:
        """The children's environment plus ``extra``; with ``native`` and a built library, its path."""
        env = dict(self.env, **extra)
        if self.site.is_dir():
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.site), env.get("PYTHONPATH")]))
        if native and self.library.is_file():
            env["LORA_TRITON_NATIVE_LIB"] = str(self.library)
        return env


#: The stages of a crossover sweep, a measurement run.
CROSSOVER_STAGES = ("wheels", "nvidia_smi", "bench")


def stages_to_run(sweep: str | None, skip: frozenset[str]) -> set[str]:
    """The stages a run starts (a crossover sweep: ``CROSSOVER_STAGES``)."""
    chosen = set(CROSSOVER_STAGES) if sweep == "crossover" else set(STAGES)
    return chosen - skip


def why_not(ctx: Context, name: str) -> str:
    """Why stage ``name`` does not run in this mode ("" when it does)."""
    if name in ctx.skip:
        return "--skip"
    if ctx.sweep == "crossover" and name not in CROSSOVER_STAGES:
        return "crossover sweep: a measurement run (the bench alone)"
    if ctx.dry_run and name == "wheels":
        return "dry run: the carried wheels are for the GPU machine's Python"
    return ""


def gpu_test_files(repo: Path) -> list[str]:
    """``GPU_TESTS``, then every other test file that takes the ``device`` fixture or touches CUDA."""
    device_test = re.compile(r"def test_\w+\([^)]*\bdevice\b|torch\.cuda|--device")
    others = sorted(str(p.relative_to(repo)) for p in (repo / "tests").glob("test_*.py")
                    if device_test.search(p.read_text(encoding="utf-8")))
    chosen = [f for f in GPU_TESTS if (repo / f).is_file()]
    return chosen + [f for f in others if f not in chosen and f not in NOT_GPU_TESTS]


def wheels(ctx: Context, stages: Stages) -> None:
    """Install the carried wheels (``.whl/``, bitsandbytes) into ``ctx.site``: no registry, no dependencies."""
    found = sorted((ctx.repo / ".whl").glob("*.whl"))
    if why_not(ctx, "wheels") or not found:
        stages.skip("wheels", why_not(ctx, "wheels") or "no .whl/*.whl carried (bitsandbytes' rows left out)")
        return
    stages.run("wheels", [ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--no-cache-dir", "--target", str(ctx.site), *map(str, found)],
               ctx.budgets.wheels, ctx.env, ctx.work)


def nvidia_smi(ctx: Context, stages: Stages) -> None:
    if why_not(ctx, "nvidia_smi"):
        stages.skip("nvidia_smi", why_not(ctx, "nvidia_smi"))
    elif shutil.which("nvidia-smi") is None:
        stages.skip("nvidia_smi", "nvidia-smi not found")
    else:
        stages.run("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], ctx.budgets.nvidia_smi, ctx.env, ctx.work)


def smoke(ctx: Context, stages: Stages, part: str = "triton") -> None:
    """The smoke checks of ``part`` (``bench/smoke.py``), fixed kernel configs."""
    name = "smoke" if part == "triton" else "native_smoke"
    if why_not(ctx, name):
        stages.skip(name, why_not(ctx, name))
        return
    argv = [ctx.python, "-m", "lora_triton.bench.smoke", "--csv", str(ctx.work / f"{name}.csv"), "--part", part]
    argv += ["--environment", str(ctx.work / "environment.txt")] if part == "triton" else []
    argv += ["--toy"] if ctx.dry_run else []
    env = ctx.child_env(native=part == "native", LORA_TRITON_AUTOTUNE="0")
    stages.run(name, argv, getattr(ctx.budgets, name), env, ctx.work)


def native_lane(ctx: Context, stages: Stages) -> None:
    """nvidia-smi; configure and build the native library (sm_90), then check its kernels when it was built."""
    nvidia_smi(ctx, stages)
    if why_not(ctx, "native_configure") or shutil.which("cmake") is None:
        stages.skip("native_configure", why_not(ctx, "native_configure") or "cmake not found")
    else:
        configure = ["cmake", "-S", str(ctx.repo), "-B", str(ctx.build), "-DCMAKE_BUILD_TYPE=Release",
                     "-DLORA_TRITON_CUDA_ARCHS=90", "-DLORA_TRITON_PTXAS_VERBOSE=ON"]
        stages.run("native_configure", configure, ctx.budgets.native_configure, ctx.env, ctx.work)
    built = None
    if why_not(ctx, "native_build") or not (ctx.build / "CMakeCache.txt").is_file():
        stages.skip("native_build", why_not(ctx, "native_build") or "not configured")
    else:
        built = stages.run("native_build", ["cmake", "--build", str(ctx.build), "-j", str(os.cpu_count() or 1)],
                           ctx.budgets.native_build, ctx.env, ctx.work)
    if not ctx.library.is_file() and not why_not(ctx, "native_smoke"):
        reason = "no CUDA compiler: CMake built nothing" if built is not None and built.status == "ok" else "no build"
        stages.skip("native_smoke", f"library not built ({reason}; see the native logs)")
    elif ctx.dry_run and not why_not(ctx, "native_smoke"):
        stages.skip("native_smoke", "dry run: the native kernels run on CUDA only")
    else:
        smoke(ctx, stages, "native")


def bench_command(ctx: Context) -> list[str]:
    """The bench stage's command: the forward and layer tables at the dispatch points (crossover: the
    forward table's sweep), stopping new points ``bench_slack`` before the stage's budget."""
    argv = [ctx.python, "-m", "lora_triton.bench", "--out", str(ctx.work / "bench"),
            "--budget-s", f"{ctx.budgets.bench - ctx.budgets.bench_slack:.0f}",
            "--write-dispatch", str(ctx.dispatch_path)]
    argv += ["--what", "forward", "--plan", "crossover"] if ctx.sweep == "crossover" else \
        ["--what", ",".join(ctx.tables), "--plan", "dispatch"]
    return argv + (["--quick"] if ctx.dry_run else [])


def bench(ctx: Context, stages: Stages) -> None:
    if why_not(ctx, "bench"):
        stages.skip("bench", why_not(ctx, "bench"))
    else:
        stages.run("bench", bench_command(ctx), ctx.budgets.bench, ctx.child_env(native=True), ctx.work)


def tests_command(ctx: Context) -> tuple[list[str], dict[str, str]]:
    """``(argv, environment)`` of the tests stage: pytest on the GPU test files with ``--device cuda``
    and fixed kernel configs (the dry run: ``DRY_RUN_TESTS`` on the CPU), xdist and pytest-timeout
    where installed."""
    files = list(DRY_RUN_TESTS) if ctx.dry_run else gpu_test_files(ctx.repo)
    argv = [ctx.python, "-m", "pytest", *files, "--device", "cpu" if ctx.dry_run else "cuda", "-v", "-rfE",
            "--durations=15"]
    if not ctx.dry_run and importlib.util.find_spec("xdist") is not None:
        argv += ["-n", str(TEST_WORKERS)]
    if importlib.util.find_spec("pytest_timeout") is not None:
        argv += ["--timeout", str(TEST_TIMEOUT_S)]
    extra = {"LORA_TRITON_AUTOTUNE": "0"}
    if ctx.library.is_file() and not ctx.dry_run:
        extra["LORA_TRITON_REQUIRE_NATIVE"] = "1"  # test_native fails, not skips, if the library got lost
    return argv, ctx.child_env(native=True, **extra)


def tests(ctx: Context, stages: Stages) -> None:
    """The tests in the time left: they end by ``total - packaging`` after the start."""
    if why_not(ctx, "tests"):
        stages.skip("tests", why_not(ctx, "tests"))
        return
    b = ctx.budgets
    left = b.total - b.packaging - b.grace - (time.monotonic() - ctx.start)
    if left < b.tests_min:
        stages.skip("tests", f"only {left:.0f} s left, under the {b.tests_min:.0f} s the stage needs")
        return
    argv, env = tests_command(ctx)
    stages.run("tests", argv, left, env, ctx.repo)


def run_all(ctx: Context, stages: Stages) -> None:
    """Every stage in order; the native lane runs in a thread beside the wheels and the smoke test."""
    lane = threading.Thread(target=native_lane, args=(ctx, stages), name="native")
    lane.start()
    try:
        wheels(ctx, stages)
        smoke(ctx, stages)
    except BaseException:
        stages.stop.set()  # ends the lane's stage too, so the join below returns at once
        raise
    finally:
        lane.join()
    bench(ctx, stages)
    tests(ctx, stages)


# ----------------------------------------------------------------------------- summary and packaging
def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _log(ctx: Context, name: str) -> str:
    path = ctx.work / f"{name}.log"
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


def smoke_lines(ctx: Context) -> list[str]:
    """The smoke checks: how many ran and passed, every failure, the planned ones not reached."""
    rows = read_csv(ctx.work / "smoke.csv") + read_csv(ctx.work / "native_smoke.csv")
    planned = 0
    for name in ("smoke", "native_smoke"):
        found = re.search(r"^(\d+) checks: ", _log(ctx, name), re.M)
        planned += int(found.group(1)) if found else 0
    if not planned and not rows:
        return []
    failed = [r for r in rows if r["ok"] != "1"]
    lines = [f"smoke: {len(rows)} of {planned} checks ran, {len(rows) - len(failed)} passed, {len(failed)} failed"]
    lines += [f"  FAILED {r['check']} {r['shape']} {r['dtype']}: error {r['error']} (torch {r['torch_error']}, "
              f"bound {r['bound']}) {r['note']}" for r in failed]
    if len(rows) < planned:
        lines.append(f"  {_count(planned - len(rows), 'check')} not reached (the stage stopped first)")
    return lines


def bench_lines(ctx: Context, before: dict) -> list[str]:
    """Rows and points per table, points the budget skipped, candidates that failed, dispatch points."""
    log = _log(ctx, "bench")
    lines = []
    for table in ctx.tables:
        rows = read_csv(ctx.work / "bench" / f"{table}.csv")
        skipped_points = len(re.findall(rf"^{table}: budget of \d+s spent, skipping", log, re.M))
        if rows or skipped_points:
            lines.append(f"{table} table: {_count(len(rows), 'row')}"
                         + (f", {_count(skipped_points, 'point')} skipped by the budget" if skipped_points else ""))
    failures = re.findall(r"^(.*: failed \(.*)$", log, re.M)
    lines += [f"  candidate failed: {line}" for line in failures[:20]]
    if len(failures) > 20:
        lines.append(f"  ... {len(failures) - 20} more failures in bench.log")
    after = _read_table(ctx.dispatch_path)
    for gpu, ops in after.get("gpus", {}).items():
        for op, points in ops.items():
            old = before.get("gpus", {}).get(gpu, {}).get(op, [])
            if points != old:
                lines.append(f"dispatch table: {gpu} {op}: {len(old)} -> {len(points)} points "
                             f"({', '.join(sorted({p['candidate'] for p in points}))})")
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _read_table(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def outcome_lines(ctx: Context) -> list[str]:
    """Test outcomes from the ``-v`` log (complete even when the stage was stopped), failures and
    files that failed to import named."""
    log = _log(ctx, "tests")
    if not log:
        return []
    counts: dict[str, int] = {}
    failed = []
    for line in log.splitlines():
        found = OUTCOME.search(line)
        test = re.search(r"(tests/\S+::\S+)", line)
        if not found or not test or line.startswith(("FAILED ", "ERROR ")):  # -rfE repeats failures at the end
            continue
        counts[found.group(1)] = counts.get(found.group(1), 0) + 1
        if found.group(1) in ("FAILED", "ERROR"):
            failed.append(f"  {found.group(1)} {test.group(1)}")
    failed += [f"  ERROR collecting {name}" for name in dict.fromkeys(re.findall(r"ERROR collecting (\S+)", log))]
    collected = re.search(r"\[(\d+) items?\]|collected (\d+) items?", log)
    total = next((int(g) for g in collected.groups() if g), 0) if collected else 0
    ran = sum(counts.values())
    lines = [f"tests: {ran} of {total} ran: " + ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items()))]
    lines += failed[:60] + ([f"  ... {len(failed) - 60} more in tests.log"] if len(failed) > 60 else [])
    return lines


def write_summary(ctx: Context, results: list[Result], stages: set[str], before: dict, end_note: str) -> str:
    """``summary.txt``: mode, wall time against the limit, the environment, one line per stage (status,
    exit, wall time, budget, why skipped or how stopped), then the smoke, bench and test outcomes."""
    b = ctx.budgets
    mode = "dry run: CPU through Triton's interpreter at toy sizes; no number in it is a measurement" \
        if ctx.dry_run else f"GPU run{', crossover sweep' if ctx.sweep else ''}"
    env_path = ctx.work / "environment.txt"
    wall = time.monotonic() - ctx.start
    lines = [f"lora-triton GPU check ({mode})",
             f"ended {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} after {wall:.0f} s; "
             f"limit {b.total:.0f} s, worst case of these stages {b.worst_case_s(stages):.0f} s" + end_note, ""]
    lines += [line.strip() for line in _log(ctx, "nvidia_smi").splitlines() if line.strip()]
    lines += env_path.read_text(encoding="utf-8").splitlines() if env_path.is_file() else []
    lines += ["", f"{'stage':<18}{'status':<11}{'exit':>5}{'wall s':>8}{'budget s':>10}  detail"]
    for r in results:
        ran = r.status not in ("skipped", "not run")
        budget, wall_s = (f"{r.budget_s:.0f}", f"{r.wall_s:.1f}") if ran else ("-", "-")
        rc = "-" if r.rc is None else str(r.rc)
        lines.append(f"{r.name:<18}{r.status:<11}{rc:>5}{wall_s:>8}{budget:>10}  {r.detail}")
    lines.append("")
    lines += smoke_lines(ctx) + bench_lines(ctx, before) + outcome_lines(ctx)
    return "\n".join(lines) + "\n"


def package(ctx: Context, summary: str) -> list[str]:
    """Write OUT: the summary, the archive of the work folder (the native build tree left out), and the
    main CSVs and dispatch table beside it. Returns the file names written."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "summary.txt").write_text(summary, encoding="utf-8")
    smoke_rows = read_csv(ctx.work / "smoke.csv") + read_csv(ctx.work / "native_smoke.csv")
    if smoke_rows:
        with open(ctx.out / "smoke.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(smoke_rows[0]))
            writer.writeheader()
            writer.writerows(smoke_rows)
    for path in [ctx.work / "bench" / f"{table}.csv" for table in ctx.tables] + [ctx.dispatch_path]:
        if path.is_file():
            shutil.copyfile(path, ctx.out / path.name)
    with tarfile.open(ctx.out / ARCHIVE, "w:gz") as archive:
        build_tree = f"gpu_check/{ctx.build.name}"  # object files: megabytes that say nothing the build log does not
        archive.add(ctx.work, arcname="gpu_check", filter=lambda info: None if info.name == build_tree else info)
        archive.add(ctx.out / "summary.txt", arcname="gpu_check/summary.txt")
    written = sorted(p.name for p in ctx.out.iterdir())
    bad = [n for n in written if not OUT_NAME.match(n) or not (ctx.out / n).is_file()]
    if len(written) > MAX_OUT_FILES or bad:
        raise RuntimeError(f"OUT must hold at most {MAX_OUT_FILES} plain files with plain names; got {written}")
    return written


# ----------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    """``python -m lora_triton.bench.gpu_check``; 0 when every stage that ran ended well."""
    parser = argparse.ArgumentParser(prog="python -m lora_triton.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, type=Path, help="the repository checkout (tests, CMakeLists.txt)")
    parser.add_argument("--out", required=True, type=Path, help="the folder the device tool brings back (empty)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, toy sizes, own budgets")
    parser.add_argument("--sweep", choices=("crossover",), default=None, help="a measurement run instead")
    parser.add_argument("--tables", default="forward,layer", metavar="TABLES",
                        help=f"the bench stage's tables out of {','.join(BENCH_TABLES)} (default: %(default)s)")
    parser.add_argument("--skip", default="", metavar="STAGES",
                        help=f"comma-separated stages out of {','.join(STAGES)} (a rerun of the rest)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter of the stages (default: this one)")
    args = parser.parse_args(argv)
    skip = frozenset(s for s in args.skip.split(",") if s)
    if skip - set(STAGES):
        parser.error(f"--skip: unknown stages {sorted(skip - set(STAGES))}; choose from {','.join(STAGES)}")
    tables = tuple(t for t in args.tables.split(",") if t)
    if not tables or set(tables) - set(BENCH_TABLES):
        parser.error(f"--tables: a comma-separated subset of {','.join(BENCH_TABLES)}, got {args.tables!r}")
    budgets = DRY_RUN_BUDGETS if args.dry_run else CROSSOVER_BUDGETS if args.sweep else GPU_BUDGETS
    chosen = stages_to_run(args.sweep, skip)
    budgets.check(chosen)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} is not empty: the device tool brings back at most {MAX_OUT_FILES} files")

    env = dict(os.environ, PYTHONSAFEPATH="1", PYTHONUNBUFFERED="1")  # the repository root stays off sys.path
    env.pop("TRITON_INTERPRET", None)
    if args.dry_run:  # the CPU even where a GPU is present: the interpreter runs on CPU tensors only
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ctx = Context(repo=args.repo.resolve(), out=args.out, work=work, python=args.python, dry_run=args.dry_run,
                  sweep=args.sweep, skip=skip, tables=tables, budgets=budgets, start=time.monotonic(), env=env)
    if ctx.dry_run:
        shutil.copyfile(ctx.repo / "lora_triton" / "ops" / "dispatch_table.json", ctx.dispatch_path)
    before = _read_table(ctx.dispatch_path)
    stages = Stages(work, budgets.grace)
    interrupted = []

    def interrupt(signum, frame):
        interrupted.append(signal.Signals(signum).name)
        stages.stop.set()

    # A handler, not SIG_IGN: the stages (exec'd) start with SIGINT at its default, which their own
    # SIGINT at the budget relies on, even when this driver was started with SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        run_all(ctx, stages)
    finally:
        stages.stop.set()  # also on an error of this driver: no lane starts another stage
        end_note = f"; INTERRUPTED by {interrupted[0]}" if interrupted else ""
        done = {r.name for r in stages.results}
        results = sorted(stages.results + [Result(name, "not run", detail="the driver stopped before it")
                                           for name in STAGES if name not in done],
                         key=lambda r: STAGES.index(r.name))
        summary = write_summary(ctx, results, chosen, before, end_note)
        written = package(ctx, summary)
        shutil.rmtree(work, ignore_errors=True)
        print("\n" + summary + f"OUT: {', '.join(written)}", flush=True)
    return 0 if all(r.status in ("ok", "skipped") for r in results) and not end_note else 1


if __name__ == "__main__":
    sys.exit(main())
