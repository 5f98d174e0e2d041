"""``lora-triton bench --quick --what model`` runs every contender and setting and writes the
table it promises (schema only: no assert depends on a timing)."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
import torch

from lora_triton.bench import model as model_table
from lora_triton.bench.cli import selected_tables

pytest.importorskip("transformers")


def _bnb_and_peft() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def quick_model_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "model"
    # cwd outside the repository keeps its top-level kernels/ folder off sys.path.
    done = subprocess.run([sys.executable, "-m", "lora_triton.bench", "--quick", "--what", "model", "--out", str(out)],
                          cwd=out.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert ": failed (" not in done.stderr, done.stderr[-3000:]
    with open(out / "model.csv", newline="") as f:
        reader = csv.DictReader(f)
        return out, done.stdout, reader.fieldnames, list(reader)


def _number(value: str) -> float:
    number = float(value)
    assert math.isfinite(number) and number >= 0, value
    return number


def test_model_table_schema(quick_model_run):
    out, stdout, fields, rows = quick_model_run
    assert fields == model_table.FIELDS
    impls = {"ours", "ours_chunked", "peft_lora"} | ({"bnb_peft"} if _bnb_and_peft() else set())
    assert {row["impl"] for row in rows} == impls
    settings = {(row["compile"], row["checkpointing"]) for row in rows}
    assert settings == {("0", "0"), ("0", "1")}  # --quick: eager only, checkpointing off and on
    assert len(rows) == len(impls) * len(settings)
    for row in rows:
        assert row["device"] and row["torch"] and row["timestamp"], row
        assert row["dtype"] == "float32" and row["batch"] == "2" and row["seq"] == "32", row
        assert _number(row["tokens_per_s"]) > 0 and _number(row["step_ms"]) > 0, row
        assert _number(row["peak_alloc_mib"]) > 0 and row["peak_reserved_mib"] == "", row  # CPU: nothing reserved
        assert row["peak_what"].startswith("cpu:"), row
        assert math.isfinite(float(row["loss"])), row
        shares = [_number(row[f"share_{kind}_pct"]) for kind in ("ours", "matmul", "other")]
        assert abs(sum(shares) - 100) < 0.5, row
        assert (shares[0] > 0) == row["impl"].startswith("ours"), row  # only ours runs our ops
        assert row["profile_top"].count("%") == 3, row
        assert _number(row["x_vs_peft_lora"]) > 0, row
        assert (row["x_vs_bnb_peft"] != "") == ("bnb_peft" in impls), row
        assert row["note"], row
    assert all(row["x_vs_peft_lora"] == "1.000" for row in rows if row["impl"] == "peft_lora")
    for ckpt in ("0", "1"):  # the chunked loss is the model's loss: same weights, data and steps, same loss
        loss = {row["impl"]: float(row["loss"]) for row in rows if row["checkpointing"] == ckpt}
        assert abs(loss["ours_chunked"] - loss["ours"]) < 1e-4 * abs(loss["ours"]), loss
    assert f"model: wrote {len(rows)} rows" in stdout
    assert (out / "model.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_table_settings_and_selection():
    plan = model_table.PLANS[("cpu", False)]
    full = model_table.settings(plan, "cpu")
    assert full[:2] == [(False, False, model_table.IMPLS), (False, True, model_table.IMPLS)]  # eager first
    assert {c for c, _, _ in full} == {False, True}
    gpu = model_table.settings(plan, "cuda")  # one contender at a time: CUDA's peak counters are global
    assert len(gpu) == len(full) * len(model_table.IMPLS) and all(len(group) == 1 for _, _, group in gpu)
    assert selected_tables("model", cuda=False) == ["model"]
    with pytest.raises(ValueError, match="impl must be one of"):
        model_table.build_model("nope", model_table.PLANS[("cpu", True)], torch.device("cpu"), False)


def test_smollm2_plans_have_its_real_shapes():
    """``--model smollm2`` times SmolLM2-135M's shapes (checked against the GGUF file in
    tests/test_real_model.py); ``--quick`` keeps its widths and vocabulary with two layers."""
    from lora_triton.demos.smollm2 import CONFIG

    for device in ("cpu", "cuda"):
        assert model_table.plan_for(device, False, "smollm2")["config"] == CONFIG
        assert model_table.plan_for(device, True, "smollm2")["config"] == {**CONFIG, "num_hidden_layers": 2}
        assert model_table.plan_for(device, False)["config"] == model_table.PLANS[(device, False)]["config"]
    with pytest.raises(ValueError, match="model must be one of"):
        model_table.plan_for("cpu", True, "smollm3")


def test_quick_smollm2_table(capsys):
    """The quick SmolLM2-shaped table's first setting (a 1 s budget is spent by it, so the others
    are skipped, and named): every contender runs, the model is named, the embedding stays tied, and the chunked
    loss equals the model's own."""
    from lora_triton.bench.environment import environment

    device = torch.device("cpu")
    rows = model_table.run(device, environment(device, True), quick=True, budget_s=1, model="smollm2")
    assert "budget of 1s spent, skipping" in capsys.readouterr().err
    impls = {"ours", "ours_chunked", "peft_lora"} | ({"bnb_peft"} if _bnb_and_peft() else set())
    assert sorted(row["impl"] for row in rows) == sorted(impls)
    for row in rows:
        assert row["model"] == "smollm2-135m shapes h=576 L=2 ff=1536 V=49152", row["model"]
        assert (row["compile"], row["checkpointing"], row["dtype"], row["seq"]) == (0, 0, "float32", 32), row
        assert _number(row["tokens_per_s"]) > 0 and _number(row["peak_alloc_mib"]) > 0, row
        assert row["params_m"] == "35.4", row  # 2 layers of 3.54 M + the 28.3 M embedding once (tied), + norms
    loss = {row["impl"]: float(row["loss"]) for row in rows}
    assert abs(loss["ours_chunked"] - loss["ours"]) < 1e-4 * abs(loss["ours"]), loss
