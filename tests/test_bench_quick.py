"""``bench/bench_forward.py --quick`` still runs and writes the table it promises (CI keeps it from rotting)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_forward.py"
CANDIDATES = {"fused", "split", "decode", "dequant"}


def test_quick_bench_writes_a_complete_csv(tmp_path, device):
    out = tmp_path / "nested" / "forward.csv"
    env = dict(os.environ)
    if device.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    # cwd=tmp_path keeps the repository root (and its top-level kernels/ folder) off sys.path.
    done = subprocess.run([sys.executable, str(BENCH), "--quick", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ": failed (" not in done.stderr, done.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    methods = {row["method"] for row in rows}
    assert CANDIDATES | {"dense", "dequant_linear"} <= methods, methods
    assert {row["M"] for row in rows} == {"1", "17"}
    for row in rows:
        assert row["gpu"] and row["torch"] and row["triton"] and row["timestamp"], row
        assert float(row["ms"]) > 0 and math.isfinite(float(row["tflops"])) and float(row["gbps"]) > 0, row
        assert float(row["rel_err"]) < 2e-2, row  # bf16 output vs an fp32 product on the same weight
        assert row["dispatch"] in CANDIDATES, row
        assert float(row["x_vs_dense"]) > 0, row
    for m in ("1", "17"):
        assert sum(int(row["fastest_candidate"]) for row in rows if row["M"] == m) == 1
        assert {row["method"] for row in rows if row["M"] == m and row["fastest_candidate"] == "1"} <= CANDIDATES
    assert f"wrote {len(rows)} rows" in done.stdout
