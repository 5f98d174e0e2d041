"""``lora-triton demo``: ``run_demo`` runs the main job on a real pretrained model
(``smollm2_demo``), or with ``quick=True`` (``lora-triton demo --quick``, CI) this smoke test
of the whole package on a toy causal LM, in seconds on CPU:

1. Build a small Llama (``transformers``, random init, byte-level vocabulary: no download) and
   pretrain it briefly on Python's own source and docs (``text_domains``).
2. Quantize every projection to NF4 and attach LoRA adapters (``inject_lora``); report the
   weight memory (fp16 vs NF4) and the trainable parameters.
3. Fine-tune on two local domains in turn, code then English prose, twice from the same start:
   one LoRA trained on both (naive) and stacked blocks with forgetting protection
   (``ContinualLoRA``). Report held-out loss on the code domain before/after the prose domain,
   tokens/s, device and backend.
4. Save the protected adapter stack in PEFT's format (one adapter of the summed rank), load it
   into a fresh copy of the pretrained float model and check the logits match.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..integration import inject_lora, load_adapter, lora_layers, save_adapter
from ..integration.inject import replace_module
from ..modules import LoRALinear4bit
from ..ops import resolve_backend
from ..outputs import QUICK_NOTE, default_dir
from .text_domains import build_corpora, eval_windows, random_batch, to_tensor
from ..training import ContinualLoRA


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the toy demo (``--quick``)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    context: int = 32
    batch: int = 8
    pretrain_steps: int = 30
    task_steps: int = 8
    rank: int = 8
    lr: float = 2e-3
    energy: float = 0.999
    calib_batches: int = 2
    domain_bytes: int = 30_000
    eval_windows: int = 16


QUICK = DemoConfig()


def _small_llama(cfg: DemoConfig, device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=cfg.hidden, intermediate_size=int(cfg.hidden * 8 / 3) // 8 * 8,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=cfg.context, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(device)


def _loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=windows[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


@torch.no_grad()
def _held_out(model: nn.Module, windows: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    loss = float(_loss(model, windows))
    model.train(was_training)
    return loss


def _train(model, params, data, cfg, steps, lr, gen, label, show) -> int:
    """AdamW on ``params`` for ``steps`` random batches of ``data``; returns tokens seen."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc=label, disable=not show, leave=True, ncols=90)
    for _ in bar:
        loss = _loss(model, random_batch(data, cfg.batch, cfg.context, gen).to(data.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return steps * cfg.batch * cfg.context


def _as_single_adapter(model: nn.Module) -> nn.Module:
    """A copy whose stacked continual blocks are one plain adapter of the summed rank (scale 1):
    exactly the function the stack computes, in a form PEFT can load."""
    single = copy.deepcopy(model)
    for name, layer in lora_layers(single).items():
        a, b = layer.stacked_adapter()
        flat = LoRALinear4bit(layer.base_layer, r=a.shape[0], lora_alpha=a.shape[0], init_lora_weights=False,
                              backend=layer.backend)
        with torch.no_grad():
            flat.lora_A["default"].weight.copy_(a)
            flat.lora_B["default"].weight.copy_(b)
        replace_module(single, name, flat)
    return single


def run_demo(out_dir: str = default_dir("demo"), quick: bool = False, device: str | None = None,
             show_progress: bool = True) -> dict:
    """Run the demo, print what it finds, save the adapter(s) under ``out_dir``; returns the
    numbers. ``quick=False``: the main job on SmolLM2-135M-Instruct (``smollm2_demo``);
    ``quick=True``: the toy model (module docstring)."""
    if not quick:
        from .smollm2_demo import run_smollm2_demo

        return run_smollm2_demo(out_dir, device, show_progress)
    cfg = QUICK
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = resolve_backend(dev)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    start = time.perf_counter()
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), "
          f"lora-triton backend '{backend}'\n{QUICK_NOTE}")

    pretrain_text, domains = build_corpora(cfg.domain_bytes)
    data = {name: (to_tensor(train).to(dev), eval_windows(to_tensor(held), cfg.eval_windows, cfg.context).to(dev))
            for name, (train, held) in domains.items() if name in ("code", "prose")}

    model = _small_llama(cfg, dev)
    _train(model, list(model.parameters()), to_tensor(pretrain_text).to(dev), cfg, cfg.pretrain_steps, 3e-3, gen,
           "pretrain (fp32)", show_progress)
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m.out_features != 256)
    fresh = copy.deepcopy(model)  # the pretrained float model, to load the saved adapter into at the end

    report = inject_lora(model, target_modules="all-linear", r=cfg.rank, lora_alpha=2 * cfg.rank, backend=backend)
    # Packed bytes + block statistics; the 16- and 256-entry code books are shared constants.
    nf4_bytes = sum(nf4.bits_per_weight * nf4.numel / 8 for nf4 in (l.base_layer.nf4 for l in lora_layers(model).values()))
    print(f"\n{report}")
    print(f"  projection weights: fp16 {2 * n_linear / 2**20:.2f} MiB -> NF4 {nf4_bytes / 2**20:.2f} MiB "
          f"({8 * nf4_bytes / n_linear:.3f} bits/weight)")
    naive = copy.deepcopy(model)

    tokens, train_time = 0, time.perf_counter()
    # Forgetting protection: a block per domain, the prose block kept off the code inputs' subspace.
    protected = ContinualLoRA(model, energy=cfg.energy, r=cfg.rank, lora_alpha=2 * cfg.rank)
    code_train, code_held = data["code"]
    prose_train, prose_held = data["prose"]
    tokens += _train(model, protected.begin_task("code"), code_train, cfg, cfg.task_steps, cfg.lr, gen,
                     "protected: code ", show_progress)
    protected.end_task([random_batch(code_train, cfg.batch, cfg.context, gen)[:, :-1].to(dev)
                        for _ in range(cfg.calib_batches)],)
    code_before = _held_out(model, code_held)
    tokens += _train(model, protected.begin_task("prose"), prose_train, cfg, cfg.task_steps, cfg.lr, gen,
                     "protected: prose", show_progress)
    protected.end_task([random_batch(prose_train, cfg.batch, cfg.context, gen)[:, :-1].to(dev)
                        for _ in range(cfg.calib_batches)])
    protected_after, protected_prose = _held_out(model, code_held), _held_out(model, prose_held)

    # Naive: one adapter trained on code, then on prose.
    naive_params = [p for p in naive.parameters() if p.requires_grad]
    tokens += _train(naive, naive_params, code_train, cfg, cfg.task_steps, cfg.lr, gen, "naive:     code ",
                     show_progress)
    naive_before = _held_out(naive, code_held)
    tokens += _train(naive, naive_params, prose_train, cfg, cfg.task_steps, cfg.lr, gen, "naive:     prose",
                     show_progress)
    naive_after, naive_prose = _held_out(naive, code_held), _held_out(naive, prose_held)
    tokens_per_s = tokens / (time.perf_counter() - train_time)

    adapter_dir = Path(out_dir) / "adapter"
    save_adapter(_as_single_adapter(model), adapter_dir)
    load_adapter(fresh, adapter_dir, backend=backend)  # quantizes fresh's projections to the same NF4 bytes
    probe = code_held[:4, :-1]
    with torch.no_grad():
        model.eval(), fresh.eval()
        reload_err = float((model(input_ids=probe).logits - fresh(input_ids=probe).logits).abs().max())

    drift = lambda before, after: 100 * (after - before) / before  # noqa: E731
    print("\nheld-out loss (nats/byte)   code: after code -> after prose     prose (own)")
    print(f"  naive LoRA                      {naive_before:.3f} -> {naive_after:.3f} ({drift(naive_before, naive_after):+.1f}%)"
          f"   {naive_prose:.3f}")
    print(f"  protected (ContinualLoRA)       {code_before:.3f} -> {protected_after:.3f} "
          f"({drift(code_before, protected_after):+.1f}%)   {protected_prose:.3f}")
    print(f"\ntraining throughput: {tokens_per_s:,.0f} tokens/s on {dev} (backend '{backend}')")
    print(f"adapter saved in PEFT's format: {adapter_dir}/ (loaded into a fresh copy of the model: max |logit diff| "
          f"{reload_err:.2e})")
    print(f"total {time.perf_counter() - start:.0f} s ({QUICK_NOTE})")
    return {"naive": (naive_before, naive_after, naive_prose), "protected": (code_before, protected_after,
            protected_prose), "tokens_per_s": tokens_per_s, "reload_err": reload_err, "adapter_dir": adapter_dir,
            "trainable_params": report.trainable_params}
