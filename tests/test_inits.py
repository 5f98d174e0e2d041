"""Warm starts: what each init does to the output at step 0 (exact statements), rsLoRA, LoRA+."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_triton.format import NF4Weight
from lora_triton.modules import LoRALinear4bit
from lora_triton.training.inits import init_adapter, init_model_adapters, loraplus_param_groups, set_rslora

N, K, R = 48, 96, 8


def float_weight() -> torch.Tensor:
    """A weight with a decaying spectrum (as trained weights have), so top-r directions matter."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(N, N, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(K, N, generator=gen))
    return (u * torch.logspace(0, -1.5, N)) @ v.T


def layer_for(w: torch.Tensor, **kwargs) -> LoRALinear4bit:
    linear = nn.Linear(K, N)
    with torch.no_grad():
        linear.weight.copy_(w)
    return LoRALinear4bit.from_linear(linear, r=R, lora_alpha=16, **kwargs)


def deq(layer: LoRALinear4bit) -> torch.Tensor:
    return layer.base_layer.nf4.dequantize(torch.float32)


def adapter_product(layer: LoRALinear4bit) -> torch.Tensor:
    name = layer.active_adapter
    return layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight


@pytest.mark.parametrize("method", ["kaiming", "gaussian"])
def test_zero_b_inits_leave_the_quantized_base_output(method):
    w = float_weight()
    layer = layer_for(w)
    base = NF4Weight.quantize(w).dequantize(torch.float32)
    init_adapter(layer, method)
    x = torch.randn(5, K)
    assert torch.equal(layer.lora_B["default"].weight, torch.zeros(N, R))
    assert layer.lora_A["default"].weight.abs().sum() > 0
    assert torch.allclose(layer(x), x @ base.T + layer.base_layer.bias, atol=1e-6)


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_principal_inits_equal_float_output_up_to_nf4_error_of_the_residual(method):
    w = float_weight()
    layer = layer_for(w)
    init_adapter(layer, method, weight=w)
    residual = w - adapter_product(layer).detach()
    assert torch.equal(layer.base_layer.nf4.packed, NF4Weight.quantize(residual).packed)  # base = NF4(W - sBA)
    x = torch.randn(5, K)
    bias = layer.base_layer.bias
    expected = x @ w.T + bias + x @ (deq(layer) - residual).T
    assert torch.allclose(layer(x), expected, atol=1e-5)
    # and the difference from the float output is exactly that residual error, not zero
    assert (layer(x) - (x @ w.T + bias)).abs().max() > 1e-4


def test_pissa_adapter_is_the_top_singular_part():
    w = float_weight()
    layer = layer_for(w)
    init_adapter(layer, "pissa", weight=w)
    u, s, vh = torch.linalg.svd(w.double())
    top = (u[:, :R] * s[:R]) @ vh[:R]
    assert torch.allclose(adapter_product(layer).detach().double(), top, atol=1e-5)


def test_olora_factors_are_orthonormal_q_and_upper_r():
    w = float_weight()
    layer = layer_for(w)
    init_adapter(layer, "olora", weight=w)
    s = layer.scaling["default"]
    q = layer.lora_B["default"].weight.detach() * s**0.5
    assert torch.allclose(q.T @ q, torch.eye(R), atol=1e-5)
    r_factor = layer.lora_A["default"].weight.detach() * s**0.5
    assert torch.allclose(r_factor[:, :R], torch.triu(r_factor[:, :R]), atol=1e-6)


def test_loftq_beats_plain_nf4_and_states_its_output():
    w = float_weight()
    layer = layer_for(w)
    plain_error = float((w - NF4Weight.quantize(w).dequantize(torch.float32)).norm())
    init_adapter(layer, "loftq", weight=w, loftq_iters=4)
    effective = deq(layer) + adapter_product(layer).detach()
    loftq_error = float((w - effective).norm())
    assert loftq_error < 0.9 * plain_error, (loftq_error, plain_error)
    x = torch.randn(5, K)
    assert torch.allclose(layer(x), x @ effective.T + layer.base_layer.bias, atol=1e-5)


def test_default_float_weight_is_the_dequantized_base():
    w = float_weight()
    layer = layer_for(w)
    before = deq(layer)
    init_adapter(layer, "pissa")
    x = torch.randn(3, K)
    residual = before - adapter_product(layer).detach()
    assert torch.allclose(layer(x), x @ before.T + layer.base_layer.bias + x @ (deq(layer) - residual).T, atol=1e-5)


def test_init_model_adapters_and_unknown_method():
    model = nn.Sequential(layer_for(float_weight()), nn.ReLU(), LoRALinear4bit.from_linear(nn.Linear(N, 16), r=4))
    init_model_adapters(model, "gaussian")
    assert all(torch.equal(m.lora_B["default"].weight, torch.zeros_like(m.lora_B["default"].weight))
               for m in (model[0], model[2]))
    with pytest.raises(ValueError, match="unknown init"):
        init_adapter(model[0], "svd-magic")


def test_rslora_scale_and_pissa_uses_the_current_scale():
    w = float_weight()
    layer = layer_for(w)
    assert set_rslora(layer) == pytest.approx(16 / R**0.5)
    init_adapter(layer, "pissa", weight=w)
    u, s, vh = torch.linalg.svd(w.double())
    assert torch.allclose(adapter_product(layer).detach().double(), (u[:, :R] * s[:R]) @ vh[:R], atol=1e-5)
    assert set_rslora(layer, enabled=False) == pytest.approx(16 / R)


def test_loraplus_groups_give_b_the_larger_rate():
    model = nn.Sequential(layer_for(float_weight()), nn.ReLU(), LoRALinear4bit.from_linear(nn.Linear(N, 16), r=4))
    groups = loraplus_param_groups(model, lr=1e-4)
    assert [g["lr"] for g in groups] == [1e-4, 1e-4 * 16]
    b_ids = {id(m.lora_B["default"].weight) for m in (model[0], model[2])}
    assert {id(p) for p in groups[1]["params"]} == b_ids
    assert {id(p) for p in groups[0]["params"]} == {id(m.lora_A["default"].weight) for m in (model[0], model[2])}
    torch.optim.AdamW(groups)  # accepted by an optimizer as is
