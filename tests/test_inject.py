"""inject_lora: PEFT's target-module rules, conversion of nn.Linear and bitsandbytes layers,
freezing, the report, model-wide adapters, and errors for bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_triton.integration import (delete_adapter, disable_adapters, find_targets, inject_lora, lora_layers,
                                     memory_bytes, quantize_with_bnb, set_adapter)
from lora_triton.testing import LLAMA_PROJECTIONS, relative_error, tiny_llama
from lora_triton.format import NF4Weight
from lora_triton.modules import LoRALinear4bit

peft = pytest.importorskip("peft")


def _peft_targets(target_modules, exclude_modules=None) -> set[str]:
    """Names of the layers PEFT itself adapts for this spec (the oracle for our matching)."""
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=target_modules,
                                                              exclude_modules=exclude_modules))
    return {name.removeprefix("base_model.model.") for name, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("target, exclude", [
    (["q_proj", "v_proj"], None),
    ("all-linear", None),
    ("all-linear", ["down_proj"]),
    (r"model\.layers\.1\..*_proj", None),
    (["self_attn.o_proj", "mlp.up_proj"], r".*layers\.0\..*"),
])
def test_targets_match_peft(target, exclude):
    assert set(find_targets(tiny_llama(), target, exclude)) == _peft_targets(target, exclude)


def test_inject_converts_freezes_and_reports():
    model = tiny_llama()
    x = torch.randint(0, 128, (2, 9))
    before_logits = model(x).logits
    report = inject_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)
    layers = lora_layers(model)
    assert sorted(layers) == sorted(report.converted) and len(layers) == 6
    assert isinstance(model.lm_head, nn.Linear)
    expected = 2 * sum(4 * (n_in + n_out) for n_in, n_out in [(64, 64), (64, 32), (128, 64)])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert report.trainable_params == expected == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.total_params == sum(p.numel() for p in tiny_llama().parameters()) + expected
    assert report.trainable_percent == pytest.approx(100 * expected / report.total_params)
    assert report.memory_after == memory_bytes(model) < report.memory_before == memory_bytes(tiny_llama())
    assert "6 layers" in str(report) and "trainable params" in str(report) and "353.31 KiB" in str(report)
    # B = 0 at init: the model computes the original one with the converted weights rounded to NF4.
    rounded = tiny_llama()
    with torch.no_grad():
        for name in report.converted:
            w = rounded.get_submodule(name).weight
            w.copy_(NF4Weight.quantize(w).dequantize(torch.float32))
    assert relative_error(model(x).logits, rounded(x).logits) < 1e-6
    assert relative_error(model(x).logits, before_logits) > 1e-3  # the rounding is visible


def test_lm_head_only_on_request():
    assert "lm_head" not in find_targets(tiny_llama(), ".*")
    assert "lm_head" in find_targets(tiny_llama(), ".*_proj|lm_head", include_lm_head=True)


def test_bitsandbytes_layers_are_wrapped_without_requantizing():
    model = tiny_llama()
    quantize_with_bnb(model, ["q_proj"])
    packed = model.model.layers[0].self_attn.q_proj.weight.data
    inject_lora(model, ["q_proj", "k_proj"])
    assert model.model.layers[0].self_attn.q_proj.base_layer.nf4.packed.data_ptr() == packed.data_ptr()


def test_second_injection_adds_a_named_adapter_and_model_wide_switches():
    model = tiny_llama()
    inject_lora(model, ["q_proj"], r=2, init_lora_weights=False)
    inject_lora(model, ["q_proj"], r=6, lora_alpha=3, adapter_name="other", init_lora_weights=False)
    q = model.model.layers[1].self_attn.q_proj
    assert list(q.lora_A) == ["default", "other"] and q.active_adapter == "other" and q.r["other"] == 6
    assert not q.lora_A["default"].weight.requires_grad and q.lora_A["other"].weight.requires_grad
    x = torch.randint(0, 128, (1, 7))
    other = model(x).logits
    set_adapter(model, "default")
    default = model(x).logits
    with disable_adapters(model):
        base = model(x).logits
    assert not torch.allclose(other, default) and not torch.allclose(default, base)
    assert torch.equal(model(x).logits, default)  # the context manager restores the adapters
    delete_adapter(model, "other")
    assert list(q.lora_A) == ["default"]
    with pytest.raises(KeyError, match="other"):
        set_adapter(model, "other")


def test_bad_targets_raise_clear_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"\['qproj'\] match no module"):
        inject_lora(model, ["q_proj", "qproj"])
    with pytest.raises(ValueError, match="matched no module"):
        inject_lora(model, r"nothing\..*")
    with pytest.raises(ValueError, match="matched no module"):
        inject_lora(model, ["q_proj"], exclude_modules=["q_proj"])
    with pytest.raises(TypeError, match="embed_tokens.*expected torch.nn.Linear"):
        inject_lora(model, ["q_proj", "embed_tokens"])
    with pytest.raises(TypeError, match="target_modules must be"):
        inject_lora(model, [3])
    assert not lora_layers(model)  # nothing changed by the failed calls
    assert all(p.requires_grad for p in model.parameters())


def test_unsupported_bitsandbytes_layers_are_refused():
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential(bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False), nn.Linear(64, 8))
    with pytest.raises(TypeError, match="Linear8bitLt"):
        inject_lora(model, ["0"])
    fp4 = bnb.nn.Linear4bit(64, 32, quant_type="fp4")
    fp4.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="fp4")
    with pytest.raises(ValueError, match="only NF4"):
        inject_lora(nn.Sequential(fp4.to("cpu")), ["0"])


def test_all_projections_of_llama():
    model = tiny_llama()
    report = inject_lora(model, LLAMA_PROJECTIONS)
    assert len(report.converted) == 14
    assert all(isinstance(m, LoRALinear4bit) for m in lora_layers(model).values())


def _state(model) -> dict:
    """Everything inject_lora may change: module types and every parameter's requires_grad."""
    return {name: (type(m).__name__, tuple(p.requires_grad for p in m.parameters(recurse=False)))
            for name, m in model.named_modules()}


@pytest.mark.parametrize("second_call, error, match", [
    (dict(target_modules=["q_proj", "k_proj"]), ValueError, "already has an adapter named 'default'"),
    (dict(target_modules=["q_proj", "k_proj"], r=0), ValueError, "rank r must be a positive int"),
    (dict(target_modules=["q_proj", "k_proj"], lora_alpha=float("nan")), ValueError,
     "lora_alpha must be a finite number"),
    (dict(target_modules=["q_proj", "k_proj"], blocksize=64.0), TypeError, "blocksize must be an int"),
    (dict(target_modules=["q_proj", "k_proj"], bias="all"), ValueError, "bias='all' is not supported"),
])
def test_inject_is_atomic(second_call, error, match):
    """A clash or bad value found anywhere leaves the model as it was: no layer replaced or frozen."""
    model = tiny_llama()
    inject_lora(model, ["layers.1.self_attn.q_proj"], r=2)  # a clash on a later layer only
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point())  # the packed NF4 bytes are integer parameters
    before = _state(model)
    with pytest.raises(error, match=match):
        inject_lora(model, **second_call)
    assert _state(model) == before


def test_inject_is_atomic_when_a_later_weight_cannot_be_quantized():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    before = _state(model)
    with pytest.raises(ValueError, match="NaN/Inf"):
        inject_lora(model)
    assert _state(model) == before


def test_inject_takes_peft_lora_config():
    """A PEFT user changes `get_peft_model(model, config)` to `inject_lora(model, config)`: the
    same layers get adapters of the same shapes and scales (PEFT itself is the oracle)."""
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                             rank_pattern={"layers.1.self_attn.v_proj": 2}, bias="none", task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(tiny_llama(), config)
    ours = tiny_llama()
    inject_lora(ours, config)
    peft_layers = {name.removeprefix("base_model.model."): m for name, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(peft_layers) == set(lora_layers(ours))
    for name, layer in lora_layers(ours).items():
        them = peft_layers[name]
        assert layer.r["default"] == them.r["default"] and layer.scaling["default"] == them.scaling["default"]
        assert layer.lora_dropout["default"] == them.lora_dropout["default"].p


def test_peft_config_with_default_targets_uses_peft_defaults():
    ours = tiny_llama()
    report = inject_lora(ours, peft.LoraConfig(r=2))  # target_modules=None: PEFT's defaults for llama
    assert {name.rsplit(".", 1)[1] for name in report.converted} == {"q_proj", "v_proj"}


@pytest.mark.parametrize("fields, match", [
    (dict(use_dora=True), "use_dora=True"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="lora_only"), "bias='lora_only'"),
    (dict(layers_to_transform=[0]), "layers_to_transform=\\[0\\]"),
    (dict(init_lora_weights="pissa"), "init_lora_weights 'pissa'"),
])
def test_unsupported_peft_config_fields_are_named(fields, match):
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        inject_lora(model, peft.LoraConfig(r=2, target_modules=["q_proj"], **fields))
    assert _state(model) == before


def test_peft_config_and_the_same_fields_as_keywords_are_refused_together():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"not both: got \['r'\]"):
        inject_lora(model, peft.LoraConfig(r=2, target_modules=["q_proj"]), r=4)
    assert not lora_layers(model)


def test_peft_keywords_are_accepted_and_checked():
    model = tiny_llama()
    inject_lora(model, ["q_proj"], r=2, bias="none", task_type="CAUSAL_LM", modules_to_save=None)
    with pytest.raises(ValueError, match="modules_to_save"):
        inject_lora(tiny_llama(), ["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="task_type must be one of"):
        inject_lora(tiny_llama(), ["q_proj"], task_type="causal")
