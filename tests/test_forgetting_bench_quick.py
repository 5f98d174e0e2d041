"""``lora-triton forgetting --quick`` runs end to end and writes its table, CSV and plot."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

COMMAND = Path(sys.executable).with_name("lora-triton")


def test_quick_forgetting_benchmark(tmp_path):
    # cwd=tmp_path keeps the repository root (and its top-level kernels/ folder) off sys.path.
    done = subprocess.run([str(COMMAND), "forgetting", "--quick", "--out-dir", str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "forgetting.csv").open()))
    assert {r["method"] for r in rows} == {"naive", "stacked", "ours"}
    assert {r["domain"] for r in rows} == {"code", "prose"}  # the earlier domains
    for row in rows:
        assert all(math.isfinite(float(row[k])) for k in ("loss_before", "loss_after", "rel_drift_pct", "bwt"))
    drift = {m: [float(r["rel_drift_pct"]) for r in rows if r["method"] == m] for m in ("naive", "ours")}
    assert min(drift["naive"]) > 10  # even the quick run shows naive forgetting
    assert max(abs(v) for v in drift["ours"]) < max(drift["naive"])
    table = (tmp_path / "forgetting.md").read_text()
    assert "| ours |" in table and "| naive |" in table
    assert (tmp_path / "forgetting.png").exists() or "no plot" in done.stdout
