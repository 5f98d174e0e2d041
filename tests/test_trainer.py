"""Training through a plain ``transformers.Trainer``, no callback: a tiny Llama with our layers
trains a few steps (the loss falls), with gradient checkpointing and with ``torch_compile=True``;
every checkpoint holds the adapter in PEFT's format and no NF4 bytes (``inject_lora`` gave the
model an adapter-only ``save_pretrained``, ``integration/trainer.py``), reloads exactly into our
layers and into PEFT, and ``resume_from_checkpoint`` continues to the same weights and losses as
an uninterrupted run. The recipes are docs/integration.md's."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("accelerate")  # the Trainer needs it
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from lora_triton import inject_lora, load_adapter  # noqa: E402
from lora_triton.integration import disable_adapter_checkpoints  # noqa: E402
from lora_triton.integration.peft_io import adapter_config, adapter_state_dict  # noqa: E402
from lora_triton.integration.trainer import MARKER  # noqa: E402
from lora_triton.testing import LLAMA_PROJECTIONS, tiny_llama  # noqa: E402
from lora_triton.training import causal_lm_loss  # noqa: E402

STEPS = 6


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
    """The recipe of docs/integration.md: the Trainer's loss from ``causal_lm_loss`` (no full logits)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = causal_lm_loss(model, inputs["input_ids"], inputs.get("labels"), chunk_tokens=32,
                              num_items_in_batch=num_items_in_batch)
        return (loss, None) if return_outputs else loss


def _model(adapter_seed: int = 0, r: int = 8, lora_dropout: float = 0.0):
    model = tiny_llama()
    torch.manual_seed(adapter_seed)  # the adapters' initial values
    inject_lora(model, LLAMA_PROJECTIONS, r=r, lora_alpha=16, lora_dropout=lora_dropout)
    return model


def _arguments(output_dir, save_steps: int = STEPS, **arguments):
    return transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=2e-2,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="steps", save_steps=save_steps,
        report_to="none", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True, **arguments)


def _losses(trainer, after_step: int = 0) -> list[float]:
    """The logged training losses of the steps after ``after_step``."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry and entry["step"] > after_step]


def _train(tmp_path, trainer_cls=transformers.Trainer, **arguments):
    model = _model()
    trainer = trainer_cls(model=model, args=_arguments(tmp_path, **arguments),
                          train_dataset=Batches(model.config.vocab_size))
    trainer.train()
    return model, _losses(trainer), tmp_path / f"checkpoint-{STEPS}"


def _check_checkpoint_layout(model, checkpoint) -> None:
    """PEFT's two files, equal to the model's adapter; the resume file holds the same tensors
    under the model's keys and nothing of the base (no NF4 bytes, no embeddings)."""
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config == json.loads(json.dumps(adapter_config(model))), config
    saved, ours = load_file(checkpoint / "adapter_model.safetensors"), adapter_state_dict(model)
    assert saved.keys() == ours.keys() and all(torch.equal(saved[k], ours[k]) for k in ours)
    resume = load_file(checkpoint / "model.safetensors")
    trainable = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert set(resume) == set(trainable) | {MARKER}, sorted(set(resume) ^ set(trainable))
    assert all(torch.equal(resume[k], p.detach()) for k, p in trainable.items())
    assert not any(k.endswith(("absmax", "quant_map", "quant_state.bitsandbytes__nf4")) for k in resume)
    files = {path.name for path in checkpoint.iterdir()}
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files, files


def _check_trained(model, losses, checkpoint) -> None:
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.95 * losses[0], losses
    _check_checkpoint_layout(model, checkpoint)

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


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    """Stopped at step 3 and resumed in a fresh process's way (a new model whose adapters start
    elsewhere, a new Trainer): the same losses for steps 4-6 and the same final adapter, bit for
    bit, as one uninterrupted run. Dropout is on, so the RNG state must come back too."""
    straight = _model(lora_dropout=0.1)
    trainer = transformers.Trainer(model=straight, args=_arguments(tmp_path / "straight", save_steps=3),
                                   train_dataset=Batches(straight.config.vocab_size))
    trainer.train()
    first = _losses(trainer)
    _check_checkpoint_layout(straight, tmp_path / "straight" / "checkpoint-6")

    resumed = _model(adapter_seed=99, lora_dropout=0.1)  # other initial adapters: the checkpoint must overwrite them
    start = adapter_state_dict(_model(lora_dropout=0.1))
    assert any(not torch.equal(value, start[key]) for key, value in adapter_state_dict(resumed).items())
    trainer = transformers.Trainer(model=resumed, args=_arguments(tmp_path / "resumed", save_steps=3),
                                   train_dataset=Batches(resumed.config.vocab_size))
    trainer.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-3"))
    assert len(first) == STEPS and _losses(trainer, after_step=3) == first[3:], (_losses(trainer), first)
    final, ours = adapter_state_dict(straight), adapter_state_dict(resumed)
    assert final.keys() == ours.keys() and all(torch.equal(final[k], ours[k]) for k in final)


def test_resume_into_a_different_model_is_refused(tmp_path):
    """A checkpoint whose adapter does not fit the model (another rank) is an error, not a silent
    ``strict=False`` load that would leave the adapters untrained."""
    model, _, checkpoint = _train(tmp_path)
    other = _model(r=4)
    trainer = transformers.Trainer(model=other, args=_arguments(tmp_path / "other"),
                                   train_dataset=Batches(other.config.vocab_size))
    with pytest.raises(RuntimeError, match="does not fit the model .*other shapes"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_save_pretrained_options(tmp_path):
    """``state_dict=`` (what the Trainer passes under DeepSpeed / FSDP) gives the same files;
    only the main process writes; bad keywords fail before anything is written; asked for,
    transformers' own save_pretrained writes the whole state dict with the NF4 bytes."""
    model = _model()
    model.save_pretrained(tmp_path / "live")
    model.save_pretrained(tmp_path / "given", state_dict=model.state_dict())
    for name in ("adapter_model.safetensors", "model.safetensors"):
        live, given = load_file(tmp_path / "live" / name), load_file(tmp_path / "given" / name)
        assert live.keys() == given.keys() and all(torch.equal(live[k], given[k]) for k in live)
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(TypeError, match="variant"):
        model.save_pretrained(tmp_path / "bad", variant="fp16")
    with pytest.raises(ValueError, match="does not push"):
        model.save_pretrained(tmp_path / "bad", push_to_hub=True)
    with pytest.raises(ValueError, match="selected_adapters"):
        model.save_pretrained(tmp_path / "bad", selected_adapters=["nope"])
    assert not (tmp_path / "bad").exists()

    disable_adapter_checkpoints(model)
    model.save_pretrained(tmp_path / "whole")
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    assert any(k.endswith("q_proj.base_layer.weight.absmax") for k in whole) and MARKER not in whole


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    """``load_best_model_at_end`` reads the best checkpoint's resume file back: afterwards the
    model's adapter is that checkpoint's (PEFT file), not the last step's."""
    model = _model()
    data = Batches(model.config.vocab_size)
    args = _arguments(tmp_path, save_steps=2, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                      metric_for_best_model="loss", greater_is_better=True)  # "best" = highest loss: an early one
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith(f"checkpoint-{STEPS}"), best
    saved, ours = load_file(f"{best}/adapter_model.safetensors"), adapter_state_dict(model)
    assert saved.keys() == ours.keys() and all(torch.equal(saved[k], ours[k]) for k in ours)


def test_a_model_with_adapter_checkpoints_survives_pickle_deepcopy_and_torch_save(tmp_path):
    import copy
    import io
    import pickle

    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    for twin in copies:
        with torch.no_grad():
            torch.testing.assert_close(twin(ids).logits, want, rtol=0, atol=0)
        # the copy's save_pretrained writes the copy's adapters, not the original's
        twin.save_pretrained(tmp_path / "twin")
        assert (tmp_path / "twin" / "adapter_model.safetensors").exists()
        assert twin.save_pretrained.args[0] is twin
