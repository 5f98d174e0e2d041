"""inject_lora: PEFT's target-module rules, conversion of nn.Linear and bitsandbytes layers,
freezing, the report, model-wide adapters, and errors for bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_triton.integration import (delete_adapter, disable_adapters, find_targets, inject_lora, lora_layers,
                                     memory_bytes, quantize_with_bnb, set_adapter)
from lora_triton.integration.testing import LLAMA_PROJECTIONS, tiny_llama
from lora_triton.format import NF4Weight
from lora_triton.modules import LoRALinear4bit
from lora_triton.testing import relative_error

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
    assert "6 layers" in str(report) and "trainable params" in str(report) and "MiB" in str(report)
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
