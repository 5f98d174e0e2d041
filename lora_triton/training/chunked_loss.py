"""A causal LM's training loss without materializing its ``[B, T, vocab]`` logits.

``model(input_ids, labels=labels).loss`` on a ``transformers`` causal LM computes the logits of
every token (``[B, T, V]`` in the model dtype), upcasts them to float32 and takes their log-softmax:
three ``[B, T, V]`` tensors at the loss, and the float32 ones are kept for backward. At a 32k
vocabulary and 4096 tokens that is 0.5 GiB per float32 copy - more than a QLoRA model's NF4
weights, and usually the step's peak once activations are checkpointed.

``causal_lm_loss`` runs the decoder body once, then the output head and the cross-entropy over
chunks of ``chunk_tokens`` tokens, each chunk under ``torch.utils.checkpoint``: only one chunk's
float32 logits exist at a time, in the forward and again in the backward. The price is one more
forward of the head's matmul per step (``2 H V`` flops a token: about 3% of a training step's
flops on a 1B Llama, H = 2048, V = 32000, 16 layers). The value is the model's own loss: labels shifted by one, ``-100`` ignored, the mean over
the counted tokens (or the sum over ``num_items_in_batch``, as ``transformers`` does under
gradient accumulation).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ..integration.mixed_batch import routed_call

IGNORE_INDEX = -100


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (returns hidden states) and the output head of a causal LM."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if not isinstance(head, nn.Module) or not isinstance(body, nn.Module) or body is model:
        raise TypeError(f"expected a transformers causal LM with an output head and a decoder body, got "
                        f"{type(model).__name__}")
    config = getattr(model, "config", None)
    for field in ("final_logit_softcapping", "logit_scale"):  # heads that transform logits after the matmul
        if getattr(config, field, None) not in (None, 0, 1, 1.0):
            raise ValueError(f"{type(model).__name__} applies config.{field}={getattr(config, field)!r} to its "
                             "logits; causal_lm_loss computes plain head(hidden) logits and would differ")
    return body, head


def _chunk_loss(head: nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    """Summed cross-entropy of one chunk (``hidden [n, H]``, ``labels [n]``), logits in float32."""
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm_loss(model: nn.Module, input_ids: Tensor, labels: Tensor | None = None, chunk_tokens: int = 1024,
                   num_items_in_batch: int | Tensor | None = None, **model_kwargs) -> Tensor:
    """The loss ``model(input_ids, labels=labels, ...).loss`` would give, computed with the
    output head and the cross-entropy in chunks of ``chunk_tokens`` tokens (module docstring).

    Args:
        model: a ``transformers`` causal LM (``LlamaForCausalLM`` and its kin, ours injected or not).
        input_ids: int64 ``[B, T]``; labels: ``[B, T]`` (default: ``input_ids``), ``-100`` ignored.
        chunk_tokens: tokens per chunk (>= 1); num_items_in_batch: divide the summed loss by this
            instead of the number of counted tokens (transformers' gradient-accumulation rule).
        model_kwargs: passed to the decoder body (``attention_mask``, ``position_ids``, ...);
            ``adapter_names`` (one adapter name per sequence) routes this call's mixed batch as
            ``model(..., adapter_names=...)`` does (``integration.mixed_batch``).
    Returns: a float32 scalar. Raises ``TypeError`` / ``ValueError`` for a model it cannot
    reproduce, bad shapes, or a batch with no counted token.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, seq] tensor, got "
                         f"{list(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
    labels = input_ids if labels is None else labels
    if not isinstance(labels, Tensor) or labels.shape != input_ids.shape:
        raise ValueError(f"labels must have input_ids' shape {list(input_ids.shape)}, got "
                         f"{list(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    body, head = _body_and_head(model)
    adapter_names = model_kwargs.pop("adapter_names", None)
    with routed_call(model, adapter_names, input_ids.shape[0], input_ids.device, "causal_lm_loss"):
        hidden = body(input_ids=input_ids, **model_kwargs).last_hidden_state  # [B, T, H]
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1).to(hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    count = num_items_in_batch if num_items_in_batch is not None else (shifted != IGNORE_INDEX).sum()
    if not torch.compiler.is_compiling() and int(count) == 0:
        raise ValueError("no label to learn from: every label is -100 (or the sequences have one token)")
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, hidden[part], shifted[part], use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hidden[part], shifted[part])
    return total / count
