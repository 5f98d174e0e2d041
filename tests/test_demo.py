"""``lora-triton demo --quick`` runs end to end: NF4 + LoRA on a small Llama, two domains with
and without forgetting protection, the adapter saved in PEFT's format and reloaded exactly."""

from __future__ import annotations

import json
import math

import pytest


def test_quick_demo(tmp_path, capsys):
    pytest.importorskip("transformers")
    from lora_triton.demos.end_to_end import run_demo

    result = run_demo(str(tmp_path), quick=True, device="cpu", show_progress=False)
    out = capsys.readouterr().out
    for value in (*result["naive"], *result["protected"]):
        assert math.isfinite(value) and value > 0  # held-out losses
    assert math.isfinite(result["tokens_per_s"]) and result["tokens_per_s"] >= 0  # a timing: schema only
    assert result["reload_err"] < 1e-5  # the PEFT-format adapter reproduces the protected model
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16  # two stacked rank-8 blocks as one adapter
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    for needle in ("backend 'torch'", "trainable params", "NF4", "held-out loss", "tokens/s"):
        assert needle in out
