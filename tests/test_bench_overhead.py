"""``lora-triton bench --quick --what overhead`` runs every contender it can here, both cases, and
writes the table it promises (schema only: no assert depends on a timing), and ``--model`` reaches
the model table."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import subprocess
import sys

import pytest
import torch

from lora_triton.bench import add_bench_parser
from lora_triton.bench import overhead as overhead_table

from lora_triton.testing import BENCH_META as META, bnb_and_peft_installed as _bnb_and_peft  # noqa: E402




def _expected_impls() -> set[str]:
    impls = {"ours", "ours_compiled", "ours_mixed4"}
    if importlib.util.find_spec("peft") is not None:
        impls.add("peft_lora16")
    if _bnb_and_peft():
        impls.add("bnb_peft")
    return impls


def _number(value: str) -> float:
    number = float(value)
    assert math.isfinite(number) and number >= 0, value
    return number


def _count(value: str) -> int:
    assert value.isdigit(), value  # a non-negative int, written as one
    return int(value)


@pytest.fixture(scope="module")
def quick_overhead(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "overhead"
    # cwd outside the repository keeps its top-level kernels/ folder off sys.path; no TRITON_INTERPRET:
    # the table times the layers' own CPU path.
    done = subprocess.run([sys.executable, "-m", "lora_triton.bench", "--quick", "--what", "overhead", "--out",
                           str(out)], cwd=out.parent, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert ": failed (" not in done.stderr, done.stderr[-3000:]
    with open(out / "overhead.csv", newline="") as f:
        reader = csv.DictReader(f)
        return out, done.stdout, reader.fieldnames, list(reader)


def test_overhead_table_schema(quick_overhead):
    out, stdout, fields, rows = quick_overhead
    assert fields == overhead_table.FIELDS
    impls = _expected_impls()
    assert {row["impl"] for row in rows} == impls
    points = {(row["in"], row["out"], row["M"]) for row in rows}
    assert points == {tuple(str(v) for v in p) for p in overhead_table.QUICK["points"]}
    dropouts = {float(p) for p in overhead_table.QUICK["dropouts"]}
    for impl in impls:  # every contender: both cases, every dropout setting (the mixed batch: dropout off)
        settings = {(row["case"], float(row["dropout"])) for row in rows if row["impl"] == impl}
        wanted = {0.0} if impl == "ours_mixed4" else dropouts
        assert settings == {(case, p) for case in overhead_table.CASES for p in wanted}, (impl, settings)
    assert len(rows) == len({(r["impl"], r["case"], r["dropout"], r["in"], r["out"], r["M"]) for r in rows})
    on_cuda = torch.cuda.is_available()  # the table runs on the GPU when there is one
    for row in rows:
        for name in META:
            assert row[name], (name, row)
        assert row["dtype"] == ("bfloat16" if on_cuda else "float32"), row
        assert row["r"] == str(overhead_table.QUICK["r"]), row
        assert row["adapters"] == ("4" if row["impl"] == "ours_mixed4" else "1"), row
        low, median, high = (_number(row[f"us_{q}"]) for q in ("p25", "median", "p75"))
        assert 0 < median and low <= median <= high, row
        assert _number(row["us_iqr"]) == pytest.approx(high - low, abs=0.11), row
        assert _count(row["samples"]) == overhead_table.QUICK["min_rounds"], row
        assert _count(row["aten_ops"]) > 0, row
        _count(row["host_reads"])
        if on_cuda:
            assert _count(row["launches"]) > 0, row
            _count(row["memcpy"])
        else:
            assert row["launches"] == row["memcpy"] == "", row  # no GPU: no kernel launches or copies to count
        assert row["timer"] and row["note"], row
    if "bnb_peft" in impls:
        assert all("peft.tuners.lora.bnb" in row["note"] for row in rows if row["impl"] == "bnb_peft")
    assert f"overhead: wrote {len(rows)} rows" in stdout
    assert (out / "overhead.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overhead_ratios_are_this_runs_medians(quick_overhead):
    """Each ratio is the row's median over its baseline's median from the same run (the mixed batch's
    baselines: their dropout-off rows; ``x_vs_ours_single``: ours with one adapter)."""
    _, stdout, _, rows = quick_overhead
    median = {(r["impl"], r["case"], float(r["dropout"]), r["M"]): float(r["us_median"]) for r in rows}
    checked = 0
    for row in rows:
        key = (row["case"], float(row["dropout"]), row["M"])
        bases = {"x_vs_peft_lora16": "peft_lora16", "x_vs_bnb_peft": "bnb_peft"}
        if row["impl"] == "ours_mixed4":
            bases["x_vs_ours_single"] = "ours"
        else:
            assert row["x_vs_ours_single"] == "", row
        for column, base in bases.items():
            if (base, *key) not in median:
                assert row[column] == "", (column, row)
                continue
            assert float(row[column]) == pytest.approx(median[(row["impl"], *key)] / median[(base, *key)],
                                                       rel=1e-3, abs=1e-4), (column, row)
            checked += 1
        if row["impl"] in bases.values() and f"x_vs_{row['impl']}" in bases:
            assert float(row[f"x_vs_{row['impl']}"]) == 1.0, row
    assert checked >= len(rows)  # at least one ratio per row (peft_lora16 needs PEFT: installed for the tests)
    assert "x_vs_* = us / baseline us" in stdout


def test_add_ratios_pairs_rows_by_point_case_and_dropout():
    row = lambda impl, us, p=0.0, case="forward": {"impl": impl, "us_median": us, "M": 4, "in": 64,  # noqa: E731
                                                   "out": 64, "case": case, "dropout": p}
    rows = [row("peft_lora16", "100.0"), row("bnb_peft", "400.0"), row("ours", "150.0"), row("ours_mixed4", "300.0"),
            row("ours", "90.0", 0.1), row("peft_lora16", "60.0", 0.1), row("ours", "50.0", case="forward_backward")]
    overhead_table.add_ratios(rows)
    ours, mixed, ours_p, ours_fb = rows[2], rows[3], rows[4], rows[6]
    assert (ours["x_vs_peft_lora16"], ours["x_vs_bnb_peft"], ours["x_vs_ours_single"]) == ("1.5000", "0.3750", "")
    assert (mixed["x_vs_peft_lora16"], mixed["x_vs_ours_single"]) == ("3.0000", "2.0000")
    assert (ours_p["x_vs_peft_lora16"], ours_p["x_vs_bnb_peft"]) == ("1.5000", "")  # no bnb row at p=0.1
    assert ours_fb["x_vs_peft_lora16"] == ""  # no baseline in that case


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-triton")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_overhead_and_model_options():
    from lora_triton.bench.cli import TABLES, selected_tables
    from lora_triton.bench.model import MODELS

    assert "overhead" in TABLES
    assert selected_tables("overhead", cuda=False) == ["overhead"]
    assert selected_tables("overhead,model", cuda=True) == ["model", "overhead"]
    args = _parser().parse_args(["bench", "--what", "model", "--model", "smollm2"])
    assert args.model == "smollm2"
    assert _parser().parse_args(["bench"]).model == "llama" == MODELS[0]
    with pytest.raises(SystemExit):
        _parser().parse_args(["bench", "--model", "gpt2"])


def test_model_option_reaches_the_model_table(monkeypatch, tmp_path):
    """``--what model --model smollm2`` runs the model table with ``model="smollm2"``; the other
    device tables get no such argument."""
    from lora_triton.bench import cli

    calls = []

    def fake_run(table):
        def run(device, meta, quick, budget_s, **options):
            calls.append((table, quick, options))
            return []
        return run

    monkeypatch.setattr(cli, "environment", lambda device, quick=False, interpreted=False: {"device": "cpu"})
    monkeypatch.setattr(cli.model, "run", fake_run("model"))
    monkeypatch.setattr(cli.overhead, "run", fake_run("overhead"))
    args = _parser().parse_args(["bench", "--quick", "--what", "model,overhead", "--model", "smollm2", "--out",
                                 str(tmp_path)])
    assert args.func(args) == 1  # no rows from the fakes: the run says so
    assert calls == [("model", True, {"model": "smollm2"}), ("overhead", True, {})]
