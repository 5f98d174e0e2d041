"""End to end on a real transformers causal LM (tiny Llama from a config, random init):
inject, train, generate, save, reload, and agree with PEFT on a bitsandbytes NF4 base.

Tolerance against PEFT: both sides dequantize the same NF4 bytes to the same fp32 weights
(bit-exact, tests/test_format_bnb.py) and compute the same products; only the order of fp32
summations may differ. One fp32 dot product of length K <= 128 then differs by at most about
K * 2^-24 ~ 1e-5 relative, usually far less, and two layers of attention and MLP do not amplify
that beyond a small factor: logits within 1e-5 and LoRA gradients (sums over all tokens too)
within 1e-4, relative in the Frobenius norm. Measured on this machine: logits bit-identical,
gradients 3.6e-7.
"""

from __future__ import annotations

import pytest
import torch

from lora_triton.integration import inject_lora, load_adapter, lora_layers, quantize_with_bnb, save_adapter
from lora_triton.testing import relative_error, tiny_llama

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
SEED = 7
LOGITS_TOL, GRAD_TOL = 1e-5, 1e-4


def _batch():
    gen = torch.Generator().manual_seed(11)
    return torch.randint(0, 128, (4, 16), generator=gen)


def _train(model, ids, steps=8):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _lora_grads(model, ids, prefix=""):
    """{layer path + '.lora_A' / '.lora_B': gradient} of the LM loss (eval mode: no dropout)."""
    model.eval()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {name.removeprefix(prefix).replace(".default", ""): p.grad for name, p in model.named_parameters()
            if p.requires_grad}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(trained model, its losses, adapter directory)."""
    model = tiny_llama(SEED)
    report = inject_lora(model, "all-linear", r=8, lora_alpha=16, lora_dropout=0.1)
    assert len(report.converted) == 14
    losses = _train(model, _batch())
    directory = save_adapter(model, tmp_path_factory.mktemp("adapter"))
    return model.eval(), losses, directory


def test_training_lowers_the_loss(trained):
    _, losses, _ = trained
    assert losses[-1] < 0.9 * losses[0], losses


def test_generate_and_reload_give_identical_results(trained):
    model, _, directory = trained
    prompt = _batch()[:2, :5]
    fresh = tiny_llama(SEED)  # same base weights, adapter from the files only
    load_adapter(fresh, directory)
    fresh.eval()
    ids = _batch()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        generated = model.generate(prompt, **kwargs)
        assert generated.shape == (2, 11) and torch.equal(generated[:, :5], prompt)
        assert torch.equal(fresh.generate(prompt, **kwargs), generated)


def test_peft_on_bitsandbytes_gives_the_same_logits_and_gradients(trained):
    model, _, directory = trained
    base = tiny_llama(SEED)
    quantize_with_bnb(base, "all-linear")
    theirs = peft.PeftModel.from_pretrained(base, str(directory), is_trainable=True)
    assert type(theirs.base_model.model.model.layers[1].mlp.up_proj).__name__ == "Linear4bit"
    ids = _batch()
    theirs.eval()
    with torch.no_grad():
        assert relative_error(theirs(ids).logits, model(ids).logits) <= LOGITS_TOL
    ours_grads = _lora_grads(model, ids)
    peft_grads = _lora_grads(theirs, ids, prefix="base_model.model.")
    assert set(ours_grads) == set(peft_grads) and len(ours_grads) == 2 * len(lora_layers(model))
    for name, grad in ours_grads.items():
        assert relative_error(grad, peft_grads[name]) <= GRAD_TOL, name
