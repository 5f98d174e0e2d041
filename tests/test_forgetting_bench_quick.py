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


def test_worker_processes_do_not_change_the_numbers():
    """``--jobs`` only spreads the (method, seed) runs over processes: every loss is identical."""
    from dataclasses import replace

    import torch

    from lora_triton.demos import forgetting as fb
    from lora_triton.demos.text_domains import build_corpora

    cfg = replace(fb.QUICK, pretrain_steps=4, task_steps=3, calib_batches=2, eval_windows=4, domain_bytes=20_000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark and its workers run
    try:
        text, domains = build_corpora(cfg.domain_bytes)
        base = fb.pretrain(cfg, text)
        in_process = fb.run_all(base, domains, cfg, [0, 1], jobs=1)
        in_workers = fb.run_all(base, domains, cfg, [0, 1], jobs=2)
    finally:
        torch.set_num_threads(threads)
    assert list(in_process) == list(in_workers) == [(m, s) for s in (0, 1) for m in fb.METHODS]
    assert in_process == in_workers
    assert in_process[("naive", 0)] != in_process[("naive", 1)]  # the seeds differ, so equality above is no accident
