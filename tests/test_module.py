"""LoRALinear4bit: construction from nn.Linear / bitsandbytes / NF4 data, PEFT shapes and
init, state-dict keys of both ecosystems, adapters, backends."""

from __future__ import annotations

import pytest
import torch

from lora_triton.format import NF4Weight
from lora_triton.modules import LoRALinear4bit, NF4Linear
from lora_triton.testing import REL_TOL, relative_error

BNB_KEYS = ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4"]


def test_from_linear_has_peft_shapes_and_default_init():
    linear = torch.nn.Linear(96, 40)
    layer = LoRALinear4bit.from_linear(linear, r=8, lora_alpha=16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (8, 96) and b.shape == (40, 8)
    assert a.abs().sum() > 0 and torch.equal(b, torch.zeros_like(b))  # Kaiming A, zero B
    assert layer.scaling["default"] == 2.0
    x = torch.randn(3, 7, 96)
    base = x @ layer.base_layer.nf4.dequantize(torch.float32).t() + linear.bias
    assert torch.allclose(layer(x), base, atol=1e-6)  # B = 0: the adapter starts as a no-op


def test_rslora_scale():
    layer = LoRALinear4bit.from_linear(torch.nn.Linear(64, 32), r=16, lora_alpha=8, use_rslora=True)
    assert layer.scaling["default"] == pytest.approx(8 / 4)


def test_base_weight_is_frozen_and_packed():
    layer = LoRALinear4bit.from_linear(torch.nn.Linear(128, 64, bias=True), r=4)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.default.weight", "lora_B.default.weight"}
    for tensor in list(layer.parameters()) + list(layer.buffers()):
        assert tensor.numel() < 64 * 128  # no [N, K] float copy of the weight anywhere
    assert layer.base_layer.nf4.packed.numel() == 64 * 128 // 2


def test_state_dict_uses_bitsandbytes_and_peft_keys():
    layer = LoRALinear4bit.from_linear(torch.nn.Linear(64, 32), r=4)
    keys = list(layer.state_dict())
    assert keys == ["base_layer.bias"] + [f"base_layer.{k}" for k in BNB_KEYS] + \
        ["lora_A.default.weight", "lora_B.default.weight"]
    fresh = LoRALinear4bit.from_linear(torch.nn.Linear(64, 32), r=4)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.base_layer.nf4.packed, layer.base_layer.nf4.packed)
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), layer(x))


def test_load_state_dict_rejects_a_different_shape():
    layer = LoRALinear4bit.from_linear(torch.nn.Linear(64, 32), r=4)
    other = LoRALinear4bit.from_linear(torch.nn.Linear(64, 48), r=4)
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict(other.state_dict())


def _bnb_linear4bit(in_f, out_f, dtype=torch.bfloat16, double_quant=True):
    bnb = pytest.importorskip("bitsandbytes")
    dense = torch.nn.Linear(in_f, out_f, dtype=dtype)
    layer = bnb.nn.Linear4bit(in_f, out_f, compute_dtype=dtype, compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant)
    layer.bias = torch.nn.Parameter(dense.bias.data, requires_grad=False)
    return layer.to("cpu")


@pytest.mark.parametrize("double_quant", [True, False])
def test_from_bnb_shares_bytes_and_matches_its_output(double_quant):
    bnb_layer = _bnb_linear4bit(128, 64, double_quant=double_quant)
    layer = LoRALinear4bit.from_bnb(bnb_layer, r=8)
    assert layer.base_layer.nf4.packed.data_ptr() == bnb_layer.weight.data.data_ptr()  # no re-quantization
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    assert relative_error(layer(x), bnb_layer(x)) < REL_TOL[torch.bfloat16]


def test_nf4_linear_loads_a_bitsandbytes_state_dict():
    bnb_layer = _bnb_linear4bit(128, 64)
    base = NF4Linear(NF4Weight.quantize(torch.randn(64, 128)), torch.zeros(64))
    base.load_state_dict(bnb_layer.state_dict())
    expected = bnb_layer.weight.data.view(-1)
    assert torch.equal(base.nf4.packed, expected)
    assert list(base.state_dict()) == ["bias"] + BNB_KEYS


def test_from_nf4_data():
    weight = NF4Weight.quantize(torch.randn(32, 64), blocksize=32, double_quant=False)
    layer = LoRALinear4bit.from_nf4(weight, None, r=2, lora_alpha=4)
    assert layer(torch.randn(2, 64)).shape == (2, 32)
    text = repr(layer)
    for part in ["in_features=64", "out_features=32", "r=2", "lora_alpha=4", "blocksize=32", "double_quant=False"]:
        assert part in text


def test_adapters_add_set_delete_disable():
    layer = LoRALinear4bit.from_linear(torch.nn.Linear(64, 32), r=4, init_lora_weights=False)
    x = torch.randn(3, 64)
    y_default = layer(x)
    layer.add_adapter("code", r=8, lora_alpha=8, init_lora_weights=False)
    assert layer.active_adapter == "code"
    assert not layer.lora_A["default"].weight.requires_grad and layer.lora_A["code"].weight.requires_grad
    assert not torch.allclose(layer(x), y_default)
    layer.set_adapter("default")
    assert torch.equal(layer(x), y_default)
    with layer.disable_adapter():
        base = layer(x)
    assert torch.allclose(base, layer.base_layer(x)) and not torch.allclose(base, y_default)
    layer.delete_adapter("code")
    assert list(layer.lora_A) == ["default"]
    with pytest.raises(KeyError, match="no adapter named 'code'"):
        layer.set_adapter("code")
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default")


def test_bad_construction_arguments():
    with pytest.raises(TypeError, match="NF4Linear"):
        LoRALinear4bit(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="rank r must be a positive int"):
        LoRALinear4bit.from_linear(torch.nn.Linear(64, 8), r=0)
    with pytest.raises(ValueError, match="lora_dropout must be a number in"):
        LoRALinear4bit.from_linear(torch.nn.Linear(64, 8), lora_dropout=1.0)


@pytest.mark.parametrize("field, value, message", [
    ("lora_alpha", float("nan"), "lora_alpha must be a finite number, got nan"),
    ("lora_alpha", float("inf"), "lora_alpha must be a finite number"),
    ("lora_alpha", "16", "lora_alpha must be a finite number"),
    ("r", True, "rank r must be a positive int, got True"),
    ("r", 4.0, "rank r must be a positive int"),
    ("lora_dropout", float("nan"), "lora_dropout must be a number in"),
    ("lora_dropout", None, "lora_dropout must be a number in"),
    ("init_lora_weights", "pissa", "unknown init_lora_weights 'pissa'"),
])
def test_bad_adapter_hyperparameters_are_refused(field, value, message):
    """Each would otherwise give NaN outputs (alpha=nan) or fail far from the cause."""
    layer = LoRALinear4bit.from_linear(torch.nn.Linear(64, 8))
    with pytest.raises(ValueError, match=message):
        LoRALinear4bit.from_linear(torch.nn.Linear(64, 8), **{field: value})
    with pytest.raises(ValueError, match=message):
        layer.add_adapter("second", **{field: value})
    assert list(layer.lora_A) == ["default"]  # nothing half-added


def test_triton_backend_matches_reference_backend(device):
    torch.manual_seed(0)
    layer = LoRALinear4bit.from_linear(torch.nn.Linear(128, 48), r=8, init_lora_weights=False).to(device)
    x = torch.randn(2, 9, 128, device=device)
    layer.backend = "torch"
    ref = layer(x)
    layer.backend = "triton"
    out = layer(x)
    assert relative_error(out, ref) < REL_TOL[torch.float32]


def test_dtype_conversion_keeps_the_packed_weight():
    layer = LoRALinear4bit.from_linear(torch.nn.Linear(64, 32), r=4)
    packed = layer.base_layer.nf4.packed
    layer.half()
    assert layer.base_layer.nf4.packed is packed and layer.lora_A["default"].weight.dtype == torch.float16


def test_state_dict_of_several_layers_saves_and_loads_with_safetensors(tmp_path):
    """Each weight owns its code tables (as in bitsandbytes), so safetensors accepts the state
    dict (no "tensors share memory") and save_model / load_model round-trip a model."""
    from safetensors.torch import load_model, save_file, save_model

    def model():
        return torch.nn.Sequential(LoRALinear4bit.from_linear(torch.nn.Linear(64, 32), r=2, init_lora_weights=False),
                                   LoRALinear4bit.from_linear(torch.nn.Linear(32, 64), r=2, init_lora_weights=False))

    src = model()
    save_file(src.state_dict(), str(tmp_path / "sd.safetensors"))
    save_model(src, str(tmp_path / "model.safetensors"))
    dst = model()
    load_model(dst, str(tmp_path / "model.safetensors"))
    x = torch.randn(5, 64)
    assert torch.equal(dst(x), src(x))
    tables = [m.base_layer.nf4.nested_code for m in dst]
    assert tables[0].data_ptr() != tables[1].data_ptr()


def test_peft_layer_names_follow_a_peft_lora_layer_through_the_same_steps():
    """``update_layer`` / ``active_adapters`` / ``disable_adapters`` / ``enable_adapters`` /
    ``merged_adapters`` read as on a real PEFT ``LoraLayer`` after the same calls."""
    peft = pytest.importorskip("peft")
    linear = torch.nn.Linear(64, 32)
    wrapped = peft.get_peft_model(torch.nn.Sequential(linear), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    theirs = wrapped.base_model.model[0]
    ours = LoRALinear4bit.from_linear(linear, adapter_name=None)
    assert ours.active_adapters == [] and not ours.lora_A  # no placeholder adapter
    ours.update_layer("default", r=4, lora_alpha=8)
    names = ("active_adapters", "disable_adapters", "merged_adapters", "merged")
    assert [getattr(ours, n) for n in names] == [getattr(theirs, n) for n in names] == [["default"], False, [], False]
    config = peft.LoraConfig(r=2, lora_alpha=4, use_rslora=True)
    for layer in (ours, theirs):
        layer.update_layer("other", r=2, lora_alpha=4, config=config)
        layer.set_adapter("other")
    assert ours.active_adapters == theirs.active_adapters == ["other"]
    assert ours.r == {"default": 4, "other": 2} and ours.scaling == theirs.scaling
    x = torch.randn(3, 64)
    for layer in (ours, theirs):
        layer.lora_B["other"].weight.data.normal_()
    adapted = ours(x)
    ours.enable_adapters(False)
    theirs.enable_adapters(False)
    assert ours.disable_adapters is theirs.disable_adapters is True
    torch.testing.assert_close(ours(x), ours.base_layer(x))
    ours.enable_adapters(True)
    torch.testing.assert_close(ours(x), adapted)
    ours.merge_nf4()
    assert ours.merged_adapters == ["other"] and ours.merged
    with pytest.raises(ValueError, match="use_dora"):
        ours.update_layer("dora", r=2, lora_alpha=4, config=peft.LoraConfig(use_dora=True))
    assert "dora" not in ours.lora_A
