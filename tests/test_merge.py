"""Merging: 16-bit merge keeps what the adapter learned (error = running the adapter model in
16 bits), NF4 re-quantization loses about all of it (and says so), unmerge is exact.

The adapters here carry an update ``s*B@A`` of 1% of each base weight's norm (fine-tuning
updates are small; the NF4 step is ~10% of a weight), on every projection of a tiny Llama.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_triton.integration import (disable_adapters, inject_lora, lora_layers, merge_into_nf4, merge_to_linear,
                                     unmerge)
from lora_triton.testing import LLAMA_PROJECTIONS, relative_error, tiny_llama

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
UPDATE = 0.01


@pytest.fixture(scope="module")
def adapted():
    """(model, fp64 logits with the adapter, fp64 logits of the base alone)."""
    model = tiny_llama()
    inject_lora(model, LLAMA_PROJECTIONS, r=8, init_lora_weights=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen))
            b.mul_(UPDATE * layer.base_layer.nf4.dequantize(torch.float32).norm() / layer.delta_weight().norm())
        logits = model(IDS).logits.double()
        with disable_adapters(model):
            base = model(IDS).logits.double()
    return model, logits, base


def test_merge_to_fp32_linear_is_exact(adapted):
    model, logits, _ = adapted
    merged = copy.deepcopy(model)
    report = merge_to_linear(merged, torch.float32)
    assert not lora_layers(merged) and type(merged.model.layers[0].mlp.up_proj) is nn.Linear
    assert len(report.layers) == 14 and report.max_update_error == 0.0
    assert relative_error(merged(IDS).logits, logits) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_to_16bit_is_as_good_as_running_the_adapter_in_16bit(adapted, dtype):
    model, logits, _ = adapted
    adapter_16 = copy.deepcopy(model).to(dtype)(IDS).logits
    merged = copy.deepcopy(model)
    report = merge_to_linear(merged, dtype)
    assert merged.model.layers[1].self_attn.o_proj.weight.dtype == dtype
    merged_16 = merged.to(dtype)(IDS).logits
    # flash-attention-style bound: the merge adds nothing beyond 16-bit rounding itself.
    assert relative_error(merged_16, logits) <= 1.25 * relative_error(adapter_16, logits)
    unit = {torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    assert report.max_weight_error < unit  # one rounding of dequant(W) + s*B@A
    # fp16 keeps the learned update to a few percent; bf16's 8-bit mantissa rounds ~17% of a
    # 1% update away (unbiased noise, measured: the same as running the adapter model in bf16).
    assert report.max_update_error < {torch.bfloat16: 0.3, torch.float16: 0.05}[dtype]


def test_merge_into_nf4_loses_the_update_and_says_so(adapted):
    model, logits, base = adapted
    merged = copy.deepcopy(model)
    packed = {n: layer.base_layer.nf4.packed.clone() for n, layer in lora_layers(merged).items()}
    report = merge_into_nf4(merged)
    assert report.path == "nf4" and "fraction of the adapter update lost" in str(report)
    assert report.max_update_error > 0.9  # measured 1.13: re-quantizing rounds the update away
    out = merged(IDS).logits.double()
    lost = float((out - logits).norm() / (logits - base).norm())
    assert lost > 0.9  # measured 1.13 of the adapter's effect on the logits
    with pytest.raises(RuntimeError, match="unmerge"):
        merged.model.layers[0].self_attn.q_proj.set_adapter("default")
    with pytest.raises(ValueError, match="already merged"):
        merge_into_nf4(merged)
    assert unmerge(merged) == 14
    for name, layer in lora_layers(merged).items():
        assert torch.equal(layer.base_layer.nf4.packed, packed[name])
    assert torch.equal(merged(IDS).logits.double(), logits)


def test_merge_needs_adapters():
    with pytest.raises(ValueError, match="no LoRALinear4bit"):
        merge_to_linear(tiny_llama())
    with pytest.raises(TypeError, match="merge dtype"):
        merge_to_linear(tiny_llama(), torch.int8)


def test_merge_to_linear_of_a_bare_layer_points_to_the_layer_method():
    """The model-wide merge replaces layers inside a model; given the layer itself it used to
    report "1 layers merged" and add a child named ''."""
    from lora_triton.modules import LoRALinear4bit

    layer = LoRALinear4bit.from_linear(nn.Linear(64, 16), r=2, init_lora_weights=False)
    with pytest.raises(TypeError, match=r"layer.merge_to_linear\(dtype\)"):
        merge_to_linear(layer)
    assert dict(layer.named_children()).keys() == {"base_layer", "lora_A", "lora_B"}
    linear = layer.merge_to_linear(torch.float32)
    x = torch.randn(3, 64)
    assert relative_error(linear(x), layer(x)) < 1e-6
