"""causal_lm_loss: the model's own training loss and gradients, without the [B, T, vocab] logits."""

from __future__ import annotations

import pytest
import torch

from lora_triton import inject_lora
from lora_triton.memory.profiling import PeakTensorMemory
from lora_triton.testing import relative_error, tiny_llama
from lora_triton.training import causal_lm_loss

IDS = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(4))


def _model():
    model = tiny_llama(seed=5)
    inject_lora(model, r=4, init_lora_weights=False)
    return model.train()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_equals_the_models_loss_and_gradients(chunk):
    labels = IDS.clone()
    labels[0, :4] = -100  # ignored tokens: not counted in the mean
    labels[2, -1] = -100
    mask = torch.ones_like(IDS)
    mask[1, :2] = 0  # left padding
    model = _model()
    want = model(input_ids=IDS, labels=labels, attention_mask=mask).loss
    want.backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    got = causal_lm_loss(model, IDS, labels, chunk_tokens=chunk, attention_mask=mask)
    got.backward()
    assert got.dtype == torch.float32 and relative_error(got, want) < 1e-6
    got_grads = _grads(model)
    assert got_grads.keys() == want_grads.keys() and got_grads
    for name in want_grads:
        assert relative_error(got_grads[name], want_grads[name]) < 1e-5, name


def test_num_items_in_batch_and_no_grad():
    model = _model()
    with torch.no_grad():
        want = model(input_ids=IDS, labels=IDS, num_items_in_batch=50).loss
        got = causal_lm_loss(model, IDS, num_items_in_batch=50, chunk_tokens=5)
    assert relative_error(got, want) < 1e-6


def test_peak_memory_is_below_the_full_logits():
    """A 4096-word vocabulary: the full path holds [B, T, V] float32 logits (and their log-softmax);
    the chunked one a chunk of them at a time."""
    model = tiny_llama(seed=6, vocab=4096)
    inject_lora(model, r=4)
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(1))
    logits_bytes = ids.numel() * 4096 * 4
    with PeakTensorMemory() as full:
        model(input_ids=ids, labels=ids).loss.backward()
    with PeakTensorMemory() as chunked:
        causal_lm_loss(model, ids, chunk_tokens=16).backward()
    assert chunked.peak_bytes < full.peak_bytes - logits_bytes, (chunked.peak_bytes, full.peak_bytes)


def test_bad_input():
    model = _model()
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
        causal_lm_loss(model, IDS, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"labels must have input_ids' shape \[3, 11\]"):
        causal_lm_loss(model, IDS, IDS[:, :5])
    with pytest.raises(ValueError, match="input_ids must be a \\[batch, seq\\] tensor"):
        causal_lm_loss(model, IDS[0])
    with pytest.raises(ValueError, match="every label is -100"):
        causal_lm_loss(model, IDS, torch.full_like(IDS, -100))
    with pytest.raises(TypeError, match="expected a transformers causal LM"):
        causal_lm_loss(torch.nn.Linear(3, 3), IDS)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_loss(model, IDS)
