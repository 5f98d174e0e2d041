"""The memory model of `lora-triton memory`: its arithmetic, and a check against measured
training steps of a small LLaMA (one bf16 step on CPU per method)."""

from __future__ import annotations

import pytest

from lora_triton.memory.estimate import METHODS, PRESETS, ModelShape, TrainingSetup, adapter_params, estimate

GIB = 2**30


def test_llama_parameter_counts():
    assert PRESETS["7b"].params == pytest.approx(6.74e9, rel=2e-3)
    assert PRESETS["13b"].params == pytest.approx(13.02e9, rel=3e-3)
    assert PRESETS["70b"].params == pytest.approx(68.98e9, rel=3e-3)


def test_components_follow_the_bookkeeping():
    shape, setup = PRESETS["7b"], TrainingSetup()
    full, lora, qlora = (estimate(shape, setup, m) for m in METHODS)
    assert full.optimizer == shape.params * 12  # fp32 Adam moments + fp32 master weights
    assert full.gradients == full.weights == shape.params * 2
    assert lora.gradients == lora.adapter == adapter_params(shape, 16) * 4
    assert qlora.weights < lora.weights / 3.4  # 4.127-bit projections, 16-bit embeddings
    assert full.total > lora.total > qlora.total
    assert full.total > 80e9  # the "80 GB+" of full fp16 fine-tuning with Adam
    assert 3.3 * GIB < qlora.weights < 3.9 * GIB


def test_checkpointing_shrinks_activations():
    shape = PRESETS["13b"]
    with_ckpt = estimate(shape, TrainingSetup(batch=4, seq=1024), "qlora").activations
    without = estimate(shape, TrainingSetup(batch=4, seq=1024, gradient_checkpointing=False), "qlora").activations
    assert with_ckpt < without / 5


def test_config_dict_round_trip():
    shape = ModelShape.from_config({"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
                                    "vocab_size": 100, "num_attention_heads": 4, "num_key_value_heads": 2})
    assert shape.kv_dim == 32
    with pytest.raises(ValueError, match="method must be one of"):
        estimate(shape, TrainingSetup(), "adapter")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_against_measured_steps(checkpointing):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from lora_triton.memory.measure import measure_all

    rows = measure_all(TrainingSetup(batch=2, seq=128, rank=8, gradient_checkpointing=checkpointing))
    for row in rows:
        print(f"{row.method}: measured {row.measured_bytes} B, estimated {row.estimated_bytes} B, ratio {row.ratio:.2f}")
        assert 0.5 < row.ratio < 2.0, row
    measured = {row.method: row.measured_bytes for row in rows}
    assert measured["full"] > measured["lora"] > measured["qlora"]
