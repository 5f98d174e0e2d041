"""The plain-PyTorch reference: its hand-written backward against autograd and finite
differences (gradcheck, float64), and its forward/backward against nn.Linear + PEFT LoRA."""

from __future__ import annotations

import itertools

import pytest
import torch

from lora_triton.format import NF4Weight
from lora_triton.reference import LoRAReferenceFunction, lora_backward, lora_forward, lora_linear_reference
from lora_triton.testing import random_lora_problem, relative_error


def _dropout_mask(m, k, p, dtype):
    return (torch.rand(m, k) >= p).to(dtype) / (1 - p)


@pytest.mark.parametrize("need_x, need_a, need_b, bias_mode", [
    combo for combo in itertools.product([True, False], [True, False], [True, False], ["none", "frozen", "train"])
    if combo[0] or combo[1] or combo[2] or combo[3] == "train"
])
@pytest.mark.parametrize("dropout", [False, True])
def test_gradcheck_every_requires_grad_combination(need_x, need_a, need_b, bias_mode, dropout):
    p = random_lora_problem(5, 7, 64, 3, dtype=torch.float64, bias=bias_mode != "none", seed=11)
    x = p["x"].requires_grad_(need_x)
    a = p["lora_a"].requires_grad_(need_a)
    b = p["lora_b"].requires_grad_(need_b)
    bias = p["bias"]
    if bias is not None:
        bias.requires_grad_(bias_mode == "train")
    mask = _dropout_mask(5, 64, 0.3, torch.float64) if dropout else None
    fn = lambda x, a, b, bias: LoRAReferenceFunction.apply(x, p["weight"], a, b, p["scale"], bias, mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a, b, bias), eps=1e-6, atol=1e-8)


def _peft_lora_model(weight: NF4Weight, a, b, alpha, r, bias, dropout):
    peft = pytest.importorskip("peft")
    n, k = weight.shape
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(k, n, bias=bias is not None, dtype=torch.float64))
    with torch.no_grad():
        base.proj.weight.copy_(weight.dequantize(torch.float64))
        if bias is not None:
            base.proj.bias.copy_(bias)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=dropout,
                             init_lora_weights=False, bias="all" if bias is not None else "none")
    model = peft.get_peft_model(base, config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return model, layer


@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_peft_lora_on_the_dequantized_weight(with_bias):
    r, alpha = 4, 8
    p = random_lora_problem(9, 24, 128, r, dtype=torch.float64, bias=with_bias, seed=3)
    model, layer = _peft_lora_model(p["weight"], p["lora_a"], p["lora_b"], alpha, r, p["bias"], 0.0)
    x = torch.randn(2, 9, 128, dtype=torch.float64, requires_grad=True)
    y_peft = model(x)
    y_peft.square().sum().backward()

    x_ours = x.detach().clone().requires_grad_()
    a = p["lora_a"].clone().requires_grad_()
    b = p["lora_b"].clone().requires_grad_()
    bias = None if p["bias"] is None else p["bias"].clone().requires_grad_()
    y = lora_linear_reference(x_ours, p["weight"], a, b, alpha / r, bias)
    y.square().sum().backward()

    assert relative_error(y, y_peft) < 1e-13
    assert relative_error(x_ours.grad, x.grad) < 1e-13
    assert relative_error(a.grad, layer.lora_A["default"].weight.grad) < 1e-13
    assert relative_error(b.grad, layer.lora_B["default"].weight.grad) < 1e-13
    if with_bias:
        assert relative_error(bias.grad, layer.base_layer.bias.grad) < 1e-13


def test_dropout_applies_to_the_lora_branch_only():
    p = random_lora_problem(6, 16, 64, 2, dtype=torch.float64, seed=5)
    zero_mask = torch.zeros(6, 64, dtype=torch.float64)
    y, s = lora_forward(p["x"], p["weight"], p["lora_a"], p["lora_b"], p["scale"], dropout_mask=zero_mask)
    base = p["x"] @ p["weight"].dequantize(torch.float64).t()
    assert torch.equal(s, torch.zeros_like(s))
    assert torch.allclose(y, base, rtol=0, atol=1e-14)


def test_backward_computes_only_what_is_asked():
    p = random_lora_problem(4, 8, 64, 2, dtype=torch.float64, bias=True, seed=9)
    _, s = lora_forward(p["x"], p["weight"], p["lora_a"], p["lora_b"], p["scale"], p["bias"])
    dy = torch.randn(4, 8, dtype=torch.float64)
    grads = lora_backward(dy, p["x"], p["weight"], p["lora_a"], p["lora_b"], p["scale"], s,
                          needs=(False, True, False, False))
    assert grads.dx is None and grads.dB is None and grads.dbias is None
    assert grads.dA.shape == p["lora_a"].shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_reference_stays_close_to_float64(dtype):
    p = random_lora_problem(17, 40, 256, 8, dtype=dtype, bias=True, seed=1)
    y, _ = lora_forward(p["x"], p["weight"], p["lora_a"], p["lora_b"], p["scale"], p["bias"])
    as64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in p.items()}
    y64, _ = lora_forward(as64["x"], p["weight"], as64["lora_a"], as64["lora_b"], p["scale"], as64["bias"])
    bound = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert y.dtype == dtype and relative_error(y, y64) < bound
