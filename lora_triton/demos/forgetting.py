"""Forgetting benchmark: one QLoRA model trained on domain after domain, in every order.

    lora-triton forgetting [--quick | --full] [--out-dir DIR] [--seeds N] [--jobs N]

A byte-level causal transformer is pretrained briefly here (on Python standard-library source
and Python's own documentation), NF4-quantized, and its linear layers get LoRA adapters. Three
domains follow in turn, all built from text any Python install ships (``text_domains``:
code, prose, arithmetic; held-out splits for each), in one of the six orders.

Methods: ``naive`` (one adapter trained on every domain in turn), ``ours`` (stacked blocks with
the orthogonal-complement constraint and the soft drift penalty: ``ContinualLoRA(energy=0.99,
exclude_top=True, drift_penalty=3, shrinkage=0.35)``, bases from 32 calibration batches of each
domain's TRAINING split, every block after the first warm-started from 16 batches of its
domain; ``Config.gradient_weighting`` switches on the gradient-weighted variants), ``oracle``
(a fresh adapter per domain trained from the NF4 base, each domain evaluated with its own
adapter: the task-routing upper bound that per-task-adapter methods rely on) and,
with ``--full``, ``stacked`` (a new frozen block per domain, no constraint). Every adapter
(block) has rank 16 and every method the same steps per domain.

The grid: seeds ``FIRST_SEED ...`` (100 on; seeds 0-14 were used to choose the settings in
rounds 1-3, 50-52 in rounds 4-5, and are never reported here). By default seed ``i`` trains the
domains in order ``ORDERS[i % 6]`` (5 seeds: 5 of the 6 orders), ``--full`` runs every order on
every seed. The first stage of a run depends only on its first domain and the seed (the first
block has nothing to protect), so it is trained once per (domain, seed) and shared by naive,
stacked, ours and the oracle (whose adapter for a domain IS that first stage): the default grid
trains 3 first stages, 2 naive and 2 ours stages per seed instead of 3 + 3 + 3.

Per run it records the held-out loss of every domain after every stage and reports
plasticity (a domain's loss right after its own stage; compared with naive's on the same order
and seed), the relative drift ``100 (L_final - L_own) / L_own`` of the earlier domains, BWT
(mean of ``L_own - L_final`` over the earlier domains; negative = forgetting) and the average
final loss over all domains (compared with naive's and the oracle's of the same seed). For
``ours`` it also records, per layer and stage, where plasticity goes
(``forgetting_layers.csv``): the fraction of the new domain's input energy (and of its
variation) outside the protected basis, and the task loss and penalty at the end of the stage.
Writes ``forgetting.csv`` (per run and domain), ``forgetting.md`` (the tables),
``forgetting_layers.csv`` and ``forgetting.png``; prints the tables.

``run_forgetting_benchmark(quick, out_dir, seeds, jobs, full)`` is the command line's entry point.
"""

from __future__ import annotations

import csv
import itertools
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..modules import LoRALinear4bit
from ..outputs import QUICK_NOTE, default_dir
from ..training import ContinualLoRA
from .text_domains import DOMAINS, build_corpora, eval_windows, random_batch, to_tensor

METHODS = ("naive", "stacked", "ours", "oracle")
DEFAULT_METHODS = ("naive", "ours", "oracle")
ORDERS = tuple(itertools.permutations(DOMAINS))
FIRST_SEED = 100  # seeds 0-14 chose the settings (rounds 1-3); 50-59 the round-4 and round-5 probes


@dataclass(frozen=True)
class Config:
    """Sizes and budgets of one run, and ours' settings (one setting for every order and seed)."""

    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    context: int = 64
    batch: int = 32
    pretrain_steps: int = 300
    task_steps: int = 120
    rank: int = 16
    lora_alpha: float = 32
    lr: float = 1e-3
    pretrain_lr: float = 3e-3
    energy: float = 0.99
    rel_threshold: float = 0.0
    exclude_top: bool = True
    drift_penalty: float = 3.0
    residual_rank: int = 512
    shrinkage: float = 0.35
    gradient_weighting: str = "none"
    output_shrinkage: float = 0.0
    eval_windows: int = 48
    calib_batches: int = 32
    warm_start_batches: int = 16
    domain_bytes: int = 240_000
    seeds: int = 5
    first_seed: int = FIRST_SEED
    methods: tuple = field(default=DEFAULT_METHODS)


FULL = Config()
QUICK = replace(FULL, d_model=64, n_layer=1, context=32, batch=16, pretrain_steps=40, task_steps=20, lr=3e-3,
                eval_windows=24, calib_batches=8, warm_start_batches=4, domain_bytes=40_000, seeds=2)


# =============================================================================== model
class Block(nn.Module):
    """Pre-LN transformer block with causal self-attention and a GELU MLP."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, d // self.n_head).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ByteLM(nn.Module):
    """Byte-level causal LM: ``[B, T]`` int64 bytes -> ``[B, T, 256]`` logits (tied head)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.embed = nn.Embedding(256, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.context, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln = nn.LayerNorm(cfg.d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.embed.weight.T


def lm_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of ``windows [B, T+1]``."""
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.reshape(-1, 256), windows[:, 1:].reshape(-1))


@torch.no_grad()
def held_out_loss(model: nn.Module, windows: torch.Tensor) -> float:
    model.eval()
    loss = float(lm_loss(model, windows))
    model.train()
    return loss


def pretrain(cfg: Config, text: bytes, seed: int = 0) -> ByteLM:
    """Train the float model from scratch on ``text`` (AdamW, cosine decay)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, data = ByteLM(cfg), to_tensor(text)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.pretrain_steps)
    for _ in range(cfg.pretrain_steps):
        loss = lm_loss(model, random_batch(data, cfg.batch, cfg.context, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model


def quantize_with_lora(float_model: ByteLM, cfg: Config) -> ByteLM:
    """A copy of ``float_model`` whose block linears are NF4 ``LoRALinear4bit`` layers; every
    other parameter frozen."""
    model = ByteLM(cfg)
    model.load_state_dict(float_model.state_dict())
    model.requires_grad_(False)
    for block in model.blocks:
        for name in ("qkv", "proj", "fc1", "fc2"):
            setattr(block, name, LoRALinear4bit.from_linear(getattr(block, name), r=cfg.rank,
                                                            lora_alpha=cfg.lora_alpha, backend="torch"))
    return model


# =============================================================================== methods
def train_steps(model: nn.Module, params: list, data: torch.Tensor, cfg: Config, gen: torch.Generator,
                penalty=None) -> tuple[float, float]:
    """``cfg.task_steps`` AdamW steps on ``data``; ``penalty()`` (if given) is added to each loss.
    Returns the mean task loss and mean penalty over the last quarter of the steps."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    tail = max(1, cfg.task_steps // 4)
    task_sum = penalty_sum = 0.0
    for step in range(cfg.task_steps):
        loss = lm_loss(model, random_batch(data, cfg.batch, cfg.context, gen))
        extra = penalty() if penalty is not None else None
        if step >= cfg.task_steps - tail:
            task_sum += float(loss.detach())
            penalty_sum += float(extra.detach()) if extra is not None else 0.0
        total = loss + extra if extra is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return task_sum / tail, penalty_sum / tail


def make_manager(model: nn.Module, method: str, cfg: Config) -> ContinualLoRA:
    """``ours``: the protected stack with ``cfg``'s settings; ``stacked``: the same without
    protection. ``model``'s trained first-stage adapter becomes the stack's first (frozen) block."""
    ours = method == "ours"
    return ContinualLoRA(model, energy=cfg.energy if ours else 0.0, rel_threshold=cfg.rel_threshold if ours else 0.0,
                         exclude_top=cfg.exclude_top and ours, drift_penalty=cfg.drift_penalty if ours else 0.0,
                         residual_rank=cfg.residual_rank, shrinkage=cfg.shrinkage, r=cfg.rank,
                         lora_alpha=cfg.lora_alpha, keep_adapters=True,
                         gradient_weighting=cfg.gradient_weighting if ours else "none", loss=lm_loss,
                         output_shrinkage=cfg.output_shrinkage,
                         forward=lambda m, windows: m(windows[:, :-1]))


def held_out_sets(domains: dict, cfg: Config) -> list[torch.Tensor]:
    """The fixed held-out windows of every domain, in ``DOMAINS`` order."""
    return [eval_windows(to_tensor(domains[d][1]), cfg.eval_windows, cfg.context) for d in DOMAINS]


def first_stage(base: ByteLM, domains: dict, cfg: Config, seed: int, domain: str) -> dict:
    """A fresh adapter trained on ``domain`` from the NF4 base: the first stage of every sequential
    run that starts with ``domain`` (the first block has nothing to protect, so naive's, stacked's
    and ours' first stages are this one run) and the oracle's adapter for ``domain``.

    Returns ``{"adapter": its state, "gen": the batch generator's state after it, "losses":
    [held-out losses before, after]}`` (each a list over ``DOMAINS``)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = quantize_with_lora(base, cfg)
    held_out = held_out_sets(domains, cfg)
    before = [held_out_loss(model, w) for w in held_out]
    train_steps(model, [p for p in model.parameters() if p.requires_grad], to_tensor(domains[domain][0]), cfg, gen)
    adapter = {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}
    return {"adapter": adapter, "gen": gen.get_state(), "losses": [before, [held_out_loss(model, w) for w in held_out]]}


def continue_run(method: str, base: ByteLM, domains: dict, cfg: Config, seed: int, order: tuple,
                 first: dict) -> dict:
    """Stages 2 on of ``method`` (naive, stacked or ours) on ``order``, from ``first`` (the
    ``first_stage`` of ``order[0]`` and ``seed``): the same run as training stage 1 here too.

    Returns ``{"losses": losses, "layers": rows}``: ``losses[stage][j]`` = held-out loss of
    ``DOMAINS[j]`` after training stage ``stage`` (stage 0 = the NF4 model before any adapter,
    stage k = after ``order[k-1]``); ``rows`` = ours' per-layer diagnostics (see the module
    docstring; empty for the other methods)."""
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.set_state(first["gen"])
    model = quantize_with_lora(base, cfg)
    model.load_state_dict(first["adapter"], strict=False)
    held_out = held_out_sets(domains, cfg)
    ours = method == "ours"
    manager = None if method == "naive" else make_manager(model, method, cfg)
    losses, rows = [list(first["losses"][0]), list(first["losses"][1])], []

    def calibrate(name: str, task: str | None = None) -> None:
        # stacked protects nothing (energy 0): its blocks are frozen without calibration data
        train = to_tensor(domains[name][0])
        calibration = [random_batch(train, cfg.batch, cfg.context, gen)
                       for _ in range(cfg.calib_batches if ours else 0)]
        manager.end_task(calibration, task=task)

    if manager is not None:
        calibrate(order[0], task=manager.tasks[0])
    for stage, name in enumerate(order[1:], start=1):
        train = to_tensor(domains[name][0])
        if manager is None:
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            # ours warm-starts every block after the first; its own generator, so the training
            # batches stay those of a run without a warm start
            warm_gen = torch.Generator().manual_seed(1000 * seed + stage)
            warm = [random_batch(train, cfg.batch, cfg.context, warm_gen)
                    for _ in range(cfg.warm_start_batches if ours else 0)]
            grams = manager.input_grams(warm) if warm else None
            free = manager.free_energy(grams=grams) if warm else {}
            params = manager.begin_task(name, warm_grams=grams)
        task_loss, penalty = train_steps(model, params, train, cfg, gen, manager.penalty if ours else None)
        if ours:
            rows += [{"stage": stage + 1, "domain": name, "layer": layer, **free.get(layer, {}),
                      "task_loss_end": task_loss, "penalty_end": penalty} for layer in manager.layers]
        if manager is not None:
            # the last domain's basis would protect it from tasks that never come: freeze only
            calibrate(name) if stage < len(order) - 1 else manager.end_task([])
        losses.append([held_out_loss(model, w) for w in held_out])
    return {"losses": losses, "layers": rows}


def oracle_run(firsts: dict, seed: int) -> dict:
    """Per-task adapters with routing, from the ``first_stage`` runs ``firsts[(domain, seed)]``:
    each domain evaluated with its own fresh adapter. ``losses`` has one row (as a one-stage run)."""
    return {"losses": [[firsts[(d, seed)]["losses"][1][j] for j, d in enumerate(DOMAINS)]], "layers": []}


def summarise(method: str, run: dict, order: tuple) -> dict:
    """Per domain: ``own`` (loss right after its own stage), ``final`` (after the last stage; the
    oracle: its own adapter's), relative drift % and absolute change for the earlier domains;
    BWT, mean drift and average final loss."""
    losses = run["losses"]
    if method == "oracle":
        own = dict(zip(DOMAINS, losses[0]))
        return {"own": own, "final": dict(own), "drift": {}, "abs_change": {}, "bwt": 0.0, "mean_drift": 0.0,
                "avg_final": statistics.mean(own.values()), "order": order}
    index = {d: j for j, d in enumerate(DOMAINS)}
    own = {d: losses[k + 1][index[d]] for k, d in enumerate(order)}
    final = {d: losses[-1][index[d]] for d in DOMAINS}
    earlier = order[:-1]
    drift = {d: 100 * (final[d] - own[d]) / own[d] for d in earlier}
    change = {d: final[d] - own[d] for d in earlier}
    return {"own": own, "final": final, "drift": drift, "abs_change": change,
            "bwt": statistics.mean(-change[d] for d in earlier), "mean_drift": statistics.mean(drift.values()),
            "avg_final": statistics.mean(final.values()), "order": order}


def grid(cfg: Config, full: bool) -> list[tuple]:
    """``(method, order, seed)`` runs: the oracle once per seed (it does not depend on the order)."""
    seeds = [cfg.first_seed + i for i in range(cfg.seeds)]
    keys = []
    for i, seed in enumerate(seeds):
        orders = ORDERS if full else (ORDERS[i % len(ORDERS)],)
        keys += [(m, order, seed) for order in orders for m in cfg.methods if m != "oracle"]
        if "oracle" in cfg.methods:
            keys.append(("oracle", DOMAINS, seed))
    return keys


# =============================================================================== tables
def compare(results: dict) -> dict:
    """Per non-oracle run: plasticity gap per domain (% vs naive's own-stage loss on the same order
    and seed) and the average final loss vs naive's and the oracle's (%)."""
    out = {}
    for (method, order, seed), s in results.items():
        if method == "oracle":
            continue
        naive, oracle = results.get(("naive", order, seed)), results.get(("oracle", DOMAINS, seed))
        out[(method, order, seed)] = {
            "gap": {d: 100 * (s["own"][d] / naive["own"][d] - 1) for d in DOMAINS} if naive else {},
            "vs_naive": 100 * (s["avg_final"] / naive["avg_final"] - 1) if naive else float("nan"),
            "vs_oracle": 100 * (s["avg_final"] / oracle["avg_final"] - 1) if oracle else float("nan")}
    return out


def _mean_std(values: list[float], digits: int = 3) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def _order_name(order: tuple) -> str:
    return " → ".join(order)


def method_table(results: dict) -> str:
    """One row per method, over every order and seed it ran."""
    cmp = compare(results)
    head = (["method", "runs", "mean drift % (earlier domains)", "max drift %"] +
            [f"{d}: own-stage loss (vs naive)" for d in DOMAINS] +
            ["worst plasticity gap %", "avg final loss", "vs naive %", "vs oracle %", "BWT"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in METHODS:
        keys = [k for k in results if k[0] == method]
        if not keys:
            continue
        runs = [results[k] for k in keys]
        seq = method != "oracle"
        cells = [method, str(len(runs)),
                 _mean_std([r["mean_drift"] for r in runs], 2) if seq else "— (routing)",
                 f"{max(r['mean_drift'] for r in runs):.2f}" if seq else "—"]
        for d in DOMAINS:
            own = statistics.mean(r["own"][d] for r in runs)
            gaps = [cmp[k]["gap"][d] for k in keys if seq and cmp[k]["gap"]]
            cells.append(f"{own:.3f}" + (f" ({statistics.mean(gaps):+.1f}%)" if gaps and method != "naive" else ""))
        worst = [max(cmp[k]["gap"].values()) for k in keys if seq and cmp[k]["gap"]]
        cells.append(f"{max(worst):+.1f}" if worst and method != "naive" else "—")
        cells.append(_mean_std([r["avg_final"] for r in runs]))
        vs_naive = [cmp[k]["vs_naive"] for k in keys if seq]
        vs_oracle = [cmp[k]["vs_oracle"] for k in keys if seq]
        cells.append(f"{statistics.mean(vs_naive):+.1f}" if vs_naive and method != "naive" else "—")
        cells.append(f"{statistics.mean(vs_oracle):+.1f}" if vs_oracle else "0")
        cells.append(_mean_std([r["bwt"] for r in runs]) if seq else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def order_table(results: dict, method: str = "ours") -> str:
    """``method`` against naive and the oracle, one row per order (mean over its seeds)."""
    cmp = compare(results)
    head = ["order", "seeds", f"{method} mean drift %", "naive mean drift %",
            "plasticity gap % (1st / 2nd / 3rd domain)", "avg final: naive / " + method + " / oracle",
            f"{method} vs oracle %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for order in ORDERS:
        keys = [k for k in results if k[0] == method and k[1] == order]
        if not keys:
            continue
        seeds = [k[2] for k in keys]
        naive = [results[("naive", order, s)] for s in seeds if ("naive", order, s) in results]
        oracle = [results[("oracle", DOMAINS, s)] for s in seeds if ("oracle", DOMAINS, s) in results]
        gaps = " / ".join(f"{statistics.mean(cmp[k]['gap'][d] for k in keys):+.1f}" for d in order) \
            if all(cmp[k]["gap"] for k in keys) else "—"
        finals = [statistics.mean(r["avg_final"] for r in rs) if rs else float("nan")
                  for rs in (naive, [results[k] for k in keys], oracle)]
        cells = [_order_name(order), ", ".join(map(str, seeds)),
                 f"{statistics.mean(results[k]['mean_drift'] for k in keys):+.2f}",
                 f"{statistics.mean(r['mean_drift'] for r in naive):+.1f}" if naive else "—", gaps,
                 " / ".join(f"{v:.3f}" for v in finals),
                 f"{statistics.mean(cmp[k]['vs_oracle'] for k in keys):+.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_table(layer_rows: list[dict]) -> str:
    """Where ours' plasticity goes, per stage position and domain (mean over layers, orders, seeds)."""
    head = ["stage", "domain", "new domain's input energy outside the basis %", "its variation outside %",
            "least free layer (variation %)", "task loss at stage end", "penalty at stage end"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict = {}
    for row in layer_rows:
        if "free_energy" in row:
            groups.setdefault((row["stage"], row["domain"]), []).append(row)
    for (stage, domain), rows in sorted(groups.items()):
        by_layer: dict = {}
        for row in rows:
            by_layer.setdefault(row["layer"], []).append(row["free_variation"])
        least = min(by_layer, key=lambda name: statistics.mean(by_layer[name]))
        lines.append(f"| {stage} | {domain} | {100 * statistics.mean(r['free_energy'] for r in rows):.1f} | "
                     f"{100 * statistics.mean(r['free_variation'] for r in rows):.1f} | "
                     f"{least} ({100 * statistics.mean(by_layer[least]):.1f}) | "
                     f"{statistics.mean(r['task_loss_end'] for r in rows):.3f} | "
                     f"{statistics.mean(r['penalty_end'] for r in rows):.3f} |")
    return "\n".join(lines)


def goal_lines(results: dict, method: str = "ours") -> list[str]:
    """The issue's three targets for ``method``, each with its number."""
    cmp = compare(results)
    keys = [k for k in results if k[0] == method]
    if not keys or not all(cmp[k]["gap"] for k in keys):
        return []
    drift = [results[k]["mean_drift"] for k in keys]
    gaps = {d: statistics.mean(cmp[k]["gap"][d] for k in keys) for d in DOMAINS}
    within = sum(g <= 5 for k in keys for g in cmp[k]["gap"].values())
    vs_oracle = statistics.mean(cmp[k]["vs_oracle"] for k in keys)
    vs_naive = statistics.mean(cmp[k]["vs_naive"] for k in keys)

    def met(value: float, target: float, ok: bool = True) -> str:
        """"met", or "MISSED by N points" (how far ``value`` is above ``target``)."""
        return "met" if ok and value <= target else f"MISSED by {value - target:.2f} points"

    mean_drift, worst_gap = statistics.mean(drift), max(gaps.values())
    return [f"* drift < 1%: mean {mean_drift:+.2f}%, {sum(d < 1 for d in drift)} of {len(drift)} runs "
            f"under 1% - {met(mean_drift, 1.0, mean_drift < 1)}",
            "* plasticity within 5% of naive, every domain: mean gap " +
            ", ".join(f"{d} {g:+.1f}%" for d, g in gaps.items()) +
            f"; {within} of {len(keys) * len(DOMAINS)} (run, domain) pairs within 5% - {met(worst_gap, 5.0)}",
            f"* average final loss: {vs_naive:+.1f}% vs naive (forgets), {vs_oracle:+.1f}% vs the oracle - "
            f"{met(vs_oracle, 5.0, vs_naive < 0)}"]


# =============================================================================== output
def write_csv(results: dict, path: Path) -> None:
    cmp = compare(results)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "order", "seed", "domain", "position", "loss_own_stage", "loss_final",
                         "rel_drift_pct", "abs_change", "plasticity_gap_pct", "bwt", "avg_final_loss",
                         "avg_final_vs_naive_pct", "avg_final_vs_oracle_pct"])
        for key in sorted(results, key=lambda k: (k[0], ORDERS.index(k[1]), k[2])):
            method, order, seed = key
            s, c = results[key], cmp.get(key, {})
            for d in DOMAINS:
                writer.writerow([method, "-".join(order) if method != "oracle" else "routing", seed, d,
                                 order.index(d) + 1 if method != "oracle" else "", f"{s['own'][d]:.5f}",
                                 f"{s['final'][d]:.5f}", f"{s['drift'][d]:.3f}" if d in s["drift"] else "",
                                 f"{s['abs_change'][d]:.5f}" if d in s["abs_change"] else "",
                                 f"{c['gap'][d]:.3f}" if c.get("gap") else "", f"{s['bwt']:.5f}",
                                 f"{s['avg_final']:.5f}", f"{c['vs_naive']:.3f}" if c else "",
                                 f"{c['vs_oracle']:.3f}" if c else ""])


def write_layers_csv(layer_rows: list[dict], path: Path) -> None:
    fields = ["order", "seed", "stage", "domain", "layer", "free_energy", "free_variation", "task_loss_end",
              "penalty_end"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in layer_rows:
            writer.writerow({k: (f"{v:.5f}" if isinstance(v, float) else v) for k, v in row.items()})


def plot(results: dict, path: Path, quick: bool = False) -> bool:
    """Three panels, colour = method in each: loss of each domain right after its own stage
    (plasticity), final loss of each domain (the oracle: its own adapter), and the mean drift of
    the earlier domains (each bar labelled, ours is near 0). Means over orders and seeds.
    Returns False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    methods = [m for m in METHODS if any(k[0] == m for k in results)]
    colours = {method: f"C{m}" for m, method in enumerate(METHODS)}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), layout="constrained")
    width = 0.8 / len(methods)
    for ax, what, title in ((axes[0], "own", "plasticity: loss right after the domain's own stage"),
                            (axes[1], "final", "final loss per domain (oracle: its own adapter)")):
        for m, method in enumerate(methods):
            runs = [s for k, s in results.items() if k[0] == method]
            values = [statistics.mean(r[what][d] for r in runs) for d in DOMAINS]
            ax.bar([i + m * width for i in range(len(DOMAINS))], values, width, label=method, color=colours[method])
        ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(DOMAINS))], DOMAINS)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("held-out loss (nats/byte)")
    sequential = [m for m in methods if m != "oracle"]
    drifts = [statistics.mean(s["mean_drift"] for k, s in results.items() if k[0] == m) for m in sequential]
    bars = axes[2].bar(sequential, drifts, color=[colours[m] for m in sequential], label=sequential)
    axes[2].bar_label(bars, fmt="%+.2f%%", fontsize=8, padding=2)
    axes[2].axhline(0, color="black", linewidth=0.5)
    axes[2].margins(y=0.15)
    axes[2].set_title("mean drift of the earlier domains", fontsize=10)
    axes[2].set_ylabel("relative drift (%)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[m]) for m in methods]
    fig.legend(handles, methods, loc="outside right upper", title="method")
    n_seeds = len({k[2] for k in results})
    n_orders = len({k[1] for k in results if k[0] != "oracle"})
    smoke = f" - {QUICK_NOTE}" if quick else ""
    fig.suptitle(f"Forgetting benchmark: {n_orders} domain order(s), {n_seeds} seed(s), mean over runs{smoke}")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


# =============================================================================== entry
def _run_job(job: tuple) -> dict:
    """One job, in this process or a worker: ``("first", (domain, seed), ...)`` runs
    ``first_stage``, ``("rest", (method, order, seed), ..., first)`` runs ``continue_run``. The
    base arrives as a state dict; every job runs in one thread."""
    kind, key, base_state, domains, cfg, first = job
    torch.set_num_threads(1)
    base = ByteLM(cfg)
    base.load_state_dict(base_state)
    if kind == "first":
        return first_stage(base, domains, cfg, key[1], key[0])
    method, order, seed = key
    return continue_run(method, base, domains, cfg, seed, order, first)


def run_all(base: ByteLM, domains: dict, cfg: Config, keys: list[tuple], jobs: int = 1,
            start: float | None = None) -> dict:
    """``{(method, order, seed): run}`` for every key (``grid``), in ``jobs`` processes.

    The work is split into jobs: one ``first_stage`` per (domain, seed) that a run starts with or
    the oracle needs, then one ``continue_run`` per sequential run once its first stage is done.
    Each job is independent and single-threaded (it seeds its own generators), so the numbers are
    the same for any ``jobs``: ``jobs > 1`` only spreads them over the cores. Ready jobs start in
    the order that keeps the cores busy: first stages that unlock runs, then the runs (longest
    method first), then the oracle's other adapters.
    """
    start = time.perf_counter() if start is None else start
    state = {name: t.detach().clone() for name, t in base.state_dict().items()}
    sequential = [k for k in keys if k[0] != "oracle"]
    feeding = list(dict.fromkeys((k[1][0], k[2]) for k in sequential))
    oracle_only = [(d, k[2]) for k in keys if k[0] == "oracle" for d in DOMAINS if (d, k[2]) not in feeding]
    rank = {"ours": 0, "stacked": 1, "naive": 2}
    firsts: dict = {}
    rests: dict = {}

    def ready() -> list[tuple]:
        """Jobs not yet started whose inputs exist, best first."""
        out = [("first", f) for f in feeding if f not in firsts]
        out += sorted((("rest", k) for k in sequential if k not in rests and (k[1][0], k[2]) in firsts),
                      key=lambda job: rank[job[1][0]])
        return out + [("first", f) for f in oracle_only if f not in firsts]

    def job(kind: str, key: tuple) -> tuple:
        return kind, key, state, domains, cfg, firsts[(key[1][0], key[2])] if kind == "rest" else None

    def done(kind: str, key: tuple, result: dict) -> None:
        (firsts if kind == "first" else rests)[key] = result
        if kind == "rest":
            _progress(key, {"losses": result["losses"]}, start)

    if jobs <= 1:
        while (todo := ready()):
            kind, key = todo[0]
            done(kind, key, _run_job(job(kind, key)))
    else:
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            running: dict = {}
            while True:
                for kind, key in ready():
                    if len(running) >= jobs:
                        break
                    if (kind, key) not in running.values():
                        running[pool.submit(_run_job, job(kind, key))] = (kind, key)
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    done(*running.pop(future), future.result())
    runs = {}
    for key in keys:
        runs[key] = oracle_run(firsts, key[2]) if key[0] == "oracle" else rests[key]
        if key[0] == "oracle":
            _progress(key, runs[key], start)
    return runs


def _progress(key: tuple, run: dict, start: float) -> None:
    s = summarise(key[0], run, key[1])
    print(f"seed {key[2]} {_order_name(key[1]) if key[0] != 'oracle' else 'routing':32s} {key[0]:8s} "
          f"drift {s['mean_drift']:+8.2f}%  avg final {s['avg_final']:.3f}  "
          f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)


def default_jobs(runs: int) -> int:
    """Worker processes: one per core, at most one per run."""
    return max(1, min(os.cpu_count() or 1, runs))


def run_forgetting_benchmark(quick: bool = False, out_dir: str | os.PathLike = default_dir("forgetting"),
                             seeds: int | None = None, jobs: int | None = None, full: bool = False,
                             cfg: Config | None = None) -> dict:
    """Run the benchmark; write ``forgetting.csv``, ``forgetting_layers.csv``, ``forgetting.md``
    and ``forgetting.png`` into ``out_dir``; print the tables. ``full``: every order on every
    seed and the ``stacked`` method too (default: one order per seed). ``jobs`` worker processes
    run the runs side by side (default ``default_jobs``; the numbers do not depend on it).
    ``cfg`` replaces the QUICK/FULL sizes (probes). Returns ``{(method, order, seed): summary}``."""
    cfg = cfg or (QUICK if quick else FULL)
    cfg = replace(cfg, methods=METHODS) if full else cfg
    cfg = cfg if seeds is None else replace(cfg, seeds=seeds)
    keys = grid(cfg, full)
    jobs = default_jobs(len(keys)) if jobs is None else jobs
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # One thread: the model is tiny, so a second thread gains little, and when other jobs share the
    # cores, oversubscribed intra-op threads made a training step ~9x slower (1.41 s vs 0.15 s
    # measured on the 2-core reference machine under load).
    torch.set_num_threads(1)
    start = time.perf_counter()
    pretrain_text, domains = build_corpora(cfg.domain_bytes)
    base = pretrain(cfg, pretrain_text)
    print(f"pretrained in {time.perf_counter() - start:.0f} s; {len(keys)} runs", file=sys.stderr)
    runs = run_all(base, domains, cfg, keys, jobs, start)
    results = {key: summarise(key[0], run, key[1]) for key, run in runs.items()}
    layer_rows = [{"order": "-".join(key[1]), "seed": key[2], **row} for key, run in runs.items()
                  for row in run["layers"]]
    elapsed = time.perf_counter() - start
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    seed_list = sorted({k[2] for k in keys})
    header = (f"Forgetting benchmark ({QUICK_NOTE if quick else 'full grid' if full else 'default grid'}): "
              f"{len({k[1] for k in keys if k[0] != 'oracle'})} domain orders, seeds {seed_list[0]}-{seed_list[-1]} "
              f"(fresh: settings were chosen on seeds 0-14 and 50-52), {len(keys)} runs, {cfg.task_steps} steps "
              f"per domain, "
              f"rank {cfg.rank} per adapter/block, ours = energy {cfg.energy}"
              f"{' of the variation' if cfg.exclude_top else ''}, drift penalty {cfg.drift_penalty} (shrinkage "
              f"{cfg.shrinkage}), gradient weighting {cfg.gradient_weighting}, {cfg.calib_batches} calibration and "
              f"{cfg.warm_start_batches} warm-start batches; "
              f"{cfg.n_layer} layers d={cfg.d_model}; {machine}; {elapsed:.0f} s with {jobs} worker "
              f"process{'es' if jobs > 1 else ''}")
    text = "\n\n".join([header, method_table(results), "Targets (ours):\n" + "\n".join(goal_lines(results)),
                        "Per order (mean over its seeds):\n\n" + order_table(results),
                        "Where ours' plasticity goes (per stage; means over layers, orders and seeds):\n\n" +
                        layer_table(layer_rows)])
    write_csv(results, out / "forgetting.csv")
    write_layers_csv(layer_rows, out / "forgetting_layers.csv")
    (out / "forgetting.md").write_text(text + "\n")
    plotted = plot(results, out / "forgetting.png", quick)
    print(text)
    print(f"wrote {out / 'forgetting.csv'}, {out / 'forgetting_layers.csv'}, {out / 'forgetting.md'}" +
          (f", {out / 'forgetting.png'}" if plotted else " (matplotlib missing: no plot)"))
    return results
