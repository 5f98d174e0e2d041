"""from_peft: a PEFT LoRA model on a bitsandbytes NF4 base becomes lora-triton layers with the
same bytes, the same adapters and the same outputs."""

from __future__ import annotations

import pytest
import torch

from lora_triton.integration import from_peft, lora_layers, quantize_with_bnb
from lora_triton.testing import LLAMA_PROJECTIONS, relative_error, tiny_llama
from lora_triton.modules import LoRALinear4bit

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))


def _peft_model(**config):
    model = tiny_llama()
    quantize_with_bnb(model, LLAMA_PROJECTIONS)
    return peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **config))


def test_converted_model_keeps_bytes_adapters_and_outputs():
    theirs = _peft_model(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"], use_rslora=True)
    theirs.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                 init_lora_weights=False))
    expected = theirs(IDS).logits
    bnb_q = theirs.base_model.model.model.layers[0].self_attn.q_proj
    packed_ptr = bnb_q.get_base_layer().weight.data.data_ptr()
    a_second = bnb_q.lora_A["second"].weight.detach().clone()

    ours = from_peft(theirs)
    q = ours.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear4bit) and len(lora_layers(ours)) == 4
    assert q.base_layer.nf4.packed.data_ptr() == packed_ptr  # shared, not re-quantized
    assert list(q.lora_A) == ["default", "second"] and q.active_adapter == "default"
    assert torch.equal(q.lora_A["second"].weight, a_second) and q.r["second"] == 2
    assert relative_error(ours(IDS).logits, expected) < 1e-6
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{w}.default.weight" for n in lora_layers(ours) for w in "AB"}


def test_refuses_what_it_cannot_reproduce():
    plain = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="expected a bitsandbytes Linear4bit"):
        from_peft(plain)
    dora = _peft_model(target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        from_peft(dora)
    with pytest.raises(TypeError, match="expected a peft.PeftModel"):
        from_peft(tiny_llama())
