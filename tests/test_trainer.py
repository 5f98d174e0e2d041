"""Training through ``transformers.Trainer``: a tiny Llama with our layers trains a few steps (the
loss falls), with gradient checkpointing and with ``torch_compile=True``, and the checkpoint the
Trainer saves holds the adapter in PEFT's format, which reloads exactly (into our layers and into
PEFT). The recipe is the README's ("Training with the Hugging Face Trainer")."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("accelerate")  # the Trainer needs it
transformers = pytest.importorskip("transformers")

from lora_triton import inject_lora, load_adapter, save_adapter  # noqa: E402
from lora_triton.integration.peft_io import adapter_state_dict  # noqa: E402
from lora_triton.testing import LLAMA_PROJECTIONS, tiny_llama  # noqa: E402
from lora_triton.training import causal_lm_loss  # noqa: E402

STEPS = 6


class SaveAdapterCallback(transformers.TrainerCallback):
    """Write the adapter in PEFT's format into every checkpoint folder the Trainer saves."""

    def on_save(self, args, state, control, model=None, **kwargs):
        save_adapter(model, f"{args.output_dir}/checkpoint-{state.global_step}")


class Batches(torch.utils.data.Dataset):
    """The same few random sequences over and over: a task the loss must fall on in a few steps."""

    def __init__(self, vocab: int, rows: int = 4, seq: int = 24):
        self.ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i % len(self.ids)]
        return {"input_ids": ids, "labels": ids}


class ChunkedLossTrainer(transformers.Trainer):
    """The README's recipe: the Trainer's loss from ``causal_lm_loss`` (no full logits)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = causal_lm_loss(model, inputs["input_ids"], inputs.get("labels"), chunk_tokens=32,
                              num_items_in_batch=num_items_in_batch)
        return (loss, None) if return_outputs else loss


def _train(tmp_path, trainer_cls=transformers.Trainer, **arguments):
    model = tiny_llama()
    inject_lora(model, LLAMA_PROJECTIONS, r=8, lora_alpha=16)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=2e-2,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="steps", save_steps=STEPS, report_to="none",
        use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True, **arguments)
    trainer = trainer_cls(model=model, args=args, train_dataset=Batches(model.config.vocab_size),
                                   callbacks=[SaveAdapterCallback()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return model, losses, tmp_path / f"checkpoint-{STEPS}"


def _check_trained(model, losses, checkpoint) -> None:
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.95 * losses[0], losses
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8, config
    assert (checkpoint / "adapter_model.safetensors").is_file()

    model.eval()
    fresh = tiny_llama()  # same seed: the same base weights, hence the same NF4 bytes
    load_adapter(fresh, checkpoint)
    saved, loaded = adapter_state_dict(model), adapter_state_dict(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    ids = torch.arange(20).reshape(2, 10) % model.config.vocab_size
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_trainer_trains_and_checkpoint_reloads_exactly(tmp_path):
    model, losses, checkpoint = _train(tmp_path)
    _check_trained(model, losses, checkpoint)


def test_trainer_checkpoint_loads_in_peft(tmp_path):
    """PEFT itself reads the checkpoint: every LoRA weight lands, unchanged, in a PeftModel."""
    peft = pytest.importorskip("peft")
    model, _, checkpoint = _train(tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), str(checkpoint))
    ours = adapter_state_dict(model)
    theirs = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(theirs) == len(ours) == 2 * 7 * model.config.num_hidden_layers
    for key, value in ours.items():
        match = [v for k, v in theirs.items() if k.replace(".default", "") == key]
        assert len(match) == 1 and torch.equal(match[0], value), key


def test_trainer_with_gradient_checkpointing(tmp_path):
    model, losses, checkpoint = _train(tmp_path, gradient_checkpointing=True,
                                       gradient_checkpointing_kwargs={"use_reentrant": False})
    assert getattr(model, "is_activation_checkpointing", False) or model.is_gradient_checkpointing  # 5.x / 4.x name
    _check_trained(model, losses, checkpoint)


def test_trainer_with_torch_compile(tmp_path):
    model, losses, checkpoint = _train(tmp_path, torch_compile=True)
    _check_trained(model, losses, checkpoint)


def test_trainer_with_the_chunked_loss_follows_the_same_losses(tmp_path):
    """The same model, data and seed trained with causal_lm_loss: the same loss at every step."""
    torch.manual_seed(1234)
    _, plain, _ = _train(tmp_path / "plain")
    torch.manual_seed(1234)
    model, chunked, checkpoint = _train(tmp_path / "chunked", trainer_cls=ChunkedLossTrainer)
    assert torch.allclose(torch.tensor(chunked), torch.tensor(plain), rtol=1e-4), (chunked, plain)
    _check_trained(model, chunked, checkpoint)
