"""Measure the peak memory of real training steps at small scale and set it beside
``memory_estimate``'s numbers for the same model and setup (needs transformers and peft).

Each method runs one step (forward, backward, AdamW step; Adam's moments are created in
that step) of a small LLaMA built from a config with random weights, in bf16 on the given
device. Peak = bytes held before the step (weights) + ``PeakTensorMemory`` of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .estimate import METHODS, ModelShape, TrainingSetup, estimate
from .profiling import PeakTensorMemory, tensor_bytes

SMALL_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=8, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=False)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MeasuredStep:
    method: str
    measured_bytes: int
    estimated_bytes: int

    @property
    def ratio(self) -> float:
        """measured / estimated."""
        return self.measured_bytes / self.estimated_bytes


def _small_llama(device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SMALL_LLAMA)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype), config


def _prepare(method: str, model, rank: int):
    if method == "full":
        return model
    if method == "lora":
        import peft

        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(PROJECTIONS))
        return peft.get_peft_model(model, config)
    from ..modules import LoRALinear4bit

    for param in model.parameters():
        param.requires_grad_(False)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in PROJECTIONS and isinstance(child, torch.nn.Linear):
                setattr(module, child_name, LoRALinear4bit.from_linear(child, r=rank, lora_alpha=2 * rank))
    return model


def measure_step(method: str, setup: TrainingSetup, device: str = "cpu") -> MeasuredStep:
    """Peak bytes of one training step of ``method`` on the small LLaMA, and the estimate."""
    device = torch.device(device)
    model, config = _small_llama(device, torch.bfloat16)
    model = _prepare(method, model, setup.rank)
    if setup.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    tokens = torch.randint(0, config.vocab_size, (setup.batch, setup.seq), device=device)
    before = tensor_bytes([*model.parameters(), *model.buffers()])
    with PeakTensorMemory() as peak:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
    # The measured run keeps Adam's moments in the parameters' dtype and has no master copy.
    state_bytes = {"full": 2 * setup.compute_bytes, "lora": 2 * setup.adapter_bytes, "qlora": 2 * setup.adapter_bytes}
    as_run = TrainingSetup(**{**setup.__dict__, "optimizer_bytes": state_bytes[method], "master_bytes": 0})
    estimated = estimate(ModelShape.from_config(config.to_dict()), as_run, method).total
    return MeasuredStep(method, before + peak.peak_bytes, estimated)


def measure_all(setup: TrainingSetup, device: str = "cpu") -> list[MeasuredStep]:
    return [measure_step(method, setup, device) for method in METHODS]
