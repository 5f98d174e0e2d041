"""Adapters in PEFT's file format, checked both ways against the real peft package on a
bitsandbytes NF4 base with the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_triton.integration import (adapter_config, inject_lora, load_adapter, lora_layers, quantize_with_bnb,
                                     save_adapter)
from lora_triton.format import NF4Weight
from lora_triton.testing import LLAMA_PROJECTIONS, relative_error, tiny_llama

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5))


def _peft_bnb_base(targets=LLAMA_PROJECTIONS):
    """The tiny model with these layers quantized by bitsandbytes (the others stay fp32)."""
    model = tiny_llama()
    quantize_with_bnb(model, targets)
    return model


def _ours_with_random_adapter(**kwargs):
    model = tiny_llama()
    inject_lora(model, TARGETS, r=4, lora_alpha=8, init_lora_weights=False, **kwargs)
    return model


def test_files_use_peft_keys_and_config(tmp_path):
    model = _ours_with_random_adapter()
    model.model.layers[1].mlp.down_proj.add_adapter("extra", r=3)  # only the default adapter is saved
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    assert len(tensors) == 12
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["rank_pattern"]) == ("LORA", 4, 8, {})
    assert peft.LoraConfig.from_pretrained(str(tmp_path)).r == 4  # PEFT parses it


def test_adapter_trained_here_loads_in_peft(tmp_path):
    ours = _ours_with_random_adapter(use_rslora=True)
    ours.model.layers[0].self_attn.q_proj.delete_adapter("default")  # one layer with another rank
    ours.model.layers[0].self_attn.q_proj.add_adapter("default", r=2, lora_alpha=5, use_rslora=True,
                                                      init_lora_weights=False)
    save_adapter(ours, tmp_path)
    config = adapter_config(ours)
    assert config["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 2}
    assert config["alpha_pattern"] == {"model.layers.0.self_attn.q_proj": 5}
    # Same base: ours quantized exactly these layers, bitsandbytes quantizes them to the same bytes.
    theirs = peft.PeftModel.from_pretrained(_peft_bnb_base(TARGETS), str(tmp_path))
    layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and layer.r["default"] == 2
    assert relative_error(theirs(IDS).logits, ours(IDS).logits) < 1e-6


def test_adapter_saved_by_peft_loads_here(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "up_proj"], init_lora_weights=False,
                             rank_pattern={"up_proj": 2}, alpha_pattern={"layers.1.self_attn.k_proj": 3})
    theirs = peft.get_peft_model(_peft_bnb_base(), config)
    theirs.save_pretrained(str(tmp_path))
    ours = _peft_bnb_base()  # the same base: PEFT's layers keep bitsandbytes, ours wrap its bytes
    loaded = load_adapter(ours, tmp_path)
    assert len(loaded) == 4 and sorted(lora_layers(ours)) == loaded
    k1 = ours.model.layers[1].self_attn.k_proj
    assert (k1.r["default"], k1.lora_alpha["default"], ours.model.layers[0].mlp.up_proj.r["default"]) == (4, 3, 2)
    assert relative_error(ours(IDS).logits, theirs(IDS).logits) < 1e-6
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{w}.default.weight" for n in loaded for w in "AB"}


def test_round_trip_into_another_adapter_name(tmp_path):
    ours = _ours_with_random_adapter()
    save_adapter(ours, tmp_path)
    expected = ours(IDS).logits
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            layer.lora_B["default"].weight.zero_()
    load_adapter(ours, tmp_path, adapter_name="reloaded")
    assert ours.model.layers[0].self_attn.q_proj.active_adapter == "reloaded"
    assert torch.equal(ours(IDS).logits, expected)


def _corrupt(tmp_path, config_edit=None, tensors_edit=None):
    save_adapter(_ours_with_random_adapter(), tmp_path)
    if config_edit:
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        config.update(config_edit)
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    if tensors_edit:
        tensors = load_file(tmp_path / "adapter_model.safetensors")
        tensors_edit(tensors)
        save_file(tensors, tmp_path / "adapter_model.safetensors")
    return tmp_path


@pytest.mark.parametrize("config_edit, tensors_edit, error, match", [
    ({"r": 8}, None, ValueError, "config says r=8"),
    ({"use_dora": True}, None, ValueError, "use_dora"),
    ({"peft_type": "IA3"}, None, ValueError, "peft_type"),
    (None, lambda t: t.update({"base_model.model.model.layers.7.mlp.up_proj.lora_A.weight": torch.zeros(4, 64),
                               "base_model.model.model.layers.7.mlp.up_proj.lora_B.weight": torch.zeros(128, 4)}),
     ValueError, "does not have"),
    (None, lambda t: t.pop("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"), ValueError, "lacks"),
    (None, lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(64)}), ValueError, "unexpected key"),
    (None, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}),
     ValueError, "do not fit"),
])
def test_bad_adapters_are_refused_before_changing_the_model(tmp_path, config_edit, tensors_edit, error, match):
    directory = _corrupt(tmp_path, config_edit, tensors_edit)
    model = tiny_llama()
    with pytest.raises(error, match=match):
        load_adapter(model, directory)
    assert not lora_layers(model)


@pytest.mark.parametrize("config_edit", [{"lora_alpha": float("nan")}, {"lora_dropout": 1.5}])
def test_bad_hyperparameters_in_the_file_are_refused(tmp_path, config_edit):
    directory = _corrupt(tmp_path, config_edit, None)
    model = tiny_llama()
    with pytest.raises(ValueError, match=next(iter(config_edit))):
        load_adapter(model, directory)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_load_is_atomic_when_a_later_weight_cannot_be_quantized(tmp_path):
    save_adapter(_ours_with_random_adapter(), tmp_path)
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        load_adapter(model, tmp_path)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_existing_adapter_with_other_rank_is_a_mismatch(tmp_path):
    save_adapter(_ours_with_random_adapter(), tmp_path)
    model = tiny_llama()
    inject_lora(model, ["q_proj"], r=2)
    with pytest.raises(ValueError, match=r"exists with \(r, lora_alpha, use_rslora\)=\(2, 16, False\)"):
        load_adapter(model, tmp_path)


def test_config_refuses_per_layer_dropout():
    model = _ours_with_random_adapter()
    model.model.layers[0].self_attn.q_proj.lora_dropout["default"] = 0.1
    with pytest.raises(ValueError, match="different lora_dropout per layer"):
        adapter_config(model)


def test_auto_peft_model_loads_our_adapter(tmp_path):
    """save_adapter fills task_type and base_model_name_or_path from a transformers model, so
    PEFT's AutoPeftModelForCausalLM finds the base and the task by itself."""
    base = tiny_llama()
    with torch.no_grad():  # target weights already NF4 values (NF4 without double quant re-quantizes exactly)
        for name in TARGETS:
            for layer in (m for n, m in base.named_modules() if n.endswith(name)):
                layer.weight.copy_(NF4Weight.quantize(layer.weight, double_quant=False).dequantize(torch.float32))
    base.save_pretrained(tmp_path / "base")
    ours = type(base).from_pretrained(tmp_path / "base")
    inject_lora(ours, TARGETS, r=4, lora_alpha=8, init_lora_weights=False, double_quant=False)
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(tmp_path / "base")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert relative_error(theirs(IDS).logits, ours(IDS).logits) < 1e-5


def test_task_type_given_to_inject_is_saved(tmp_path):
    model = tiny_llama()
    inject_lora(model, TARGETS, r=2, task_type="FEATURE_EXTRACTION")
    assert adapter_config(model)["task_type"] == "FEATURE_EXTRACTION"
    assert adapter_config(model, task_type="CAUSAL_LM")["task_type"] == "CAUSAL_LM"  # an explicit value wins
    assert adapter_config(torch.nn.Sequential(model.model.layers[0].self_attn.q_proj))["task_type"] is None
