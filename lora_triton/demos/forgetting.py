"""Forgetting benchmark: one QLoRA model trained on domain after domain, three ways.

    lora-triton forgetting [--quick] [--out-dir DIR] [--seeds N] [--jobs N]

A byte-level causal transformer is pretrained briefly here (on Python standard-library source
and Python's own documentation), NF4-quantized, and its linear layers get LoRA adapters. Three
domains follow in turn, all built from text any Python install ships (``text_domains``:
code, prose, arithmetic; held-out splits for each).

Methods: ``naive`` (one adapter trained on every domain in turn), ``stacked`` (a new frozen
block per domain, no constraint: ``ContinualLoRA(energy=0)``) and ``ours`` (stacked blocks with
the orthogonal-complement constraint: ``ContinualLoRA(energy=0.99, exclude_top=True)``, each
layer's basis built from 32 calibration batches of the domain's TRAINING split, plus the soft
drift penalty on the free directions: ``drift_penalty=3, shrinkage=0.35``, added to its loss;
each new block after the first warm-started from 16 batches of its domain's training split:
``begin_task(name, warm_start=batches)``). Every adapter (block) has rank 16.
For each seed and method it records the held-out loss of every domain after every stage, and
reports for the earlier domains the relative drift ``100 (L_after - L_before) / L_before``, the absolute
change, backward transfer (mean of ``L_before - L_after``; negative = forgetting) and the last
domain's own loss. Writes ``forgetting.csv`` (per seed), ``forgetting.md`` (mean over seeds)
and ``forgetting.png``; prints the table.

``run_forgetting_benchmark(quick, out_dir)`` is the entry point for the command line.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..modules import LoRALinear4bit
from ..outputs import QUICK_NOTE, default_dir
from ..training import ContinualLoRA
from .text_domains import DOMAINS, build_corpora, eval_windows, random_batch, to_tensor

METHODS = ("naive", "stacked", "ours")


@dataclass(frozen=True)
class Config:
    """Sizes and budgets of one run."""

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
    eval_windows: int = 48
    calib_batches: int = 32
    warm_start_batches: int = 16
    domain_bytes: int = 240_000
    seeds: int = 3


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
                penalty=None) -> None:
    """``cfg.task_steps`` AdamW steps on ``data``; ``penalty()`` (if given) is added to each loss."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    for _ in range(cfg.task_steps):
        loss = lm_loss(model, random_batch(data, cfg.batch, cfg.context, gen))
        if penalty is not None:
            loss = loss + penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def run_method(method: str, base: ByteLM, domains: dict, cfg: Config, seed: int) -> list[list[float]]:
    """Train ``method`` on the domains in order; ``losses[stage][domain]`` = held-out loss of
    ``domain`` after training stage ``stage`` (stage 0 = the NF4 model before any adapter)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = quantize_with_lora(base, cfg)
    held_out = [eval_windows(to_tensor(domains[d][1]), cfg.eval_windows, cfg.context) for d in DOMAINS]
    ours = method == "ours"
    manager = None if method == "naive" else ContinualLoRA(model, energy=cfg.energy if ours else 0.0,
                                                          rel_threshold=cfg.rel_threshold if ours else 0.0,
                                                          exclude_top=cfg.exclude_top and ours,
                                                          drift_penalty=cfg.drift_penalty if ours else 0.0,
                                                          residual_rank=cfg.residual_rank, shrinkage=cfg.shrinkage,
                                                          r=cfg.rank, lora_alpha=cfg.lora_alpha)
    losses = [[held_out_loss(model, w) for w in held_out]]
    for stage, name in enumerate(DOMAINS):
        train = to_tensor(domains[name][0])
        if manager is None:
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            # ours warm-starts every block after the first (the first has nothing to protect, so it
            # starts like stacked's); its own generator, so the training batches stay those of a run
            # without a warm start
            warm_gen = torch.Generator().manual_seed(1000 * seed + stage)
            warm = [random_batch(train, cfg.batch, cfg.context, warm_gen)[:, :-1]
                    for _ in range(cfg.warm_start_batches if ours and stage > 0 else 0)]
            params = manager.begin_task(name, warm_start=warm or None)
        train_steps(model, params, train, cfg, gen, manager.penalty if ours else None)
        if manager is not None:
            # stacked protects nothing (energy 0): its blocks are frozen without calibration data
            calibration = [random_batch(train, cfg.batch, cfg.context, gen)[:, :-1]
                           for _ in range(cfg.calib_batches if ours else 0)]
            manager.end_task(calibration)
        losses.append([held_out_loss(model, w) for w in held_out])
    if manager is not None and method == "ours":
        print(manager.report(), file=sys.stderr)
    return losses


def summarise(losses: list[list[float]]) -> dict:
    """Per earlier domain ``i``: ``L_before`` (after stage i) and ``L_after`` (after the last
    stage), relative drift %, absolute change; BWT; the last domain's own loss."""
    last = len(DOMAINS)
    rows = {}
    for i, name in enumerate(DOMAINS[:-1]):
        before, after = losses[i + 1][i], losses[last][i]
        rows[name] = {"before": before, "after": after, "rel_drift_pct": 100 * (after - before) / before,
                      "abs_change": after - before}
    bwt = statistics.mean(before_after["before"] - before_after["after"] for before_after in rows.values())
    return {"domains": rows, "bwt": bwt, "last_loss": losses[last][last - 1],
            "mean_rel_drift_pct": statistics.mean(r["rel_drift_pct"] for r in rows.values())}


# =============================================================================== output
def write_csv(results: dict, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "domain", "loss_before", "loss_after", "rel_drift_pct", "abs_change",
                         "bwt", "last_domain_loss"])
        for (method, seed), summary in sorted(results.items()):
            for domain, row in summary["domains"].items():
                writer.writerow([method, seed, domain, f"{row['before']:.5f}", f"{row['after']:.5f}",
                                 f"{row['rel_drift_pct']:.3f}", f"{row['abs_change']:.5f}", f"{summary['bwt']:.5f}",
                                 f"{summary['last_loss']:.5f}"])


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def markdown_table(results: dict, seeds: list[int]) -> str:
    """Mean ± std over seeds per method."""
    earlier = DOMAINS[:-1]
    head = ["method"] + [f"{d}: L before → after" for d in earlier] + [f"{d} drift %" for d in earlier] + \
        ["mean drift %", "mean abs change", "BWT", f"{DOMAINS[-1]} loss (last domain)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in METHODS:
        runs = [results[(method, s)] for s in seeds]
        cells = [method]
        for d in earlier:
            before = statistics.mean(r["domains"][d]["before"] for r in runs)
            after = statistics.mean(r["domains"][d]["after"] for r in runs)
            cells.append(f"{before:.3f} → {after:.3f}")
        cells += [_mean_std([r["domains"][d]["rel_drift_pct"] for r in runs]) for d in earlier]
        cells.append(_mean_std([r["mean_rel_drift_pct"] for r in runs]))
        cells.append(_mean_std([statistics.mean(v["abs_change"] for v in r["domains"].values()) for r in runs]))
        cells.append(_mean_std([r["bwt"] for r in runs]))
        cells.append(_mean_std([r["last_loss"] for r in runs]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, trajectories: dict, seeds: list[int], path: Path, quick: bool = False) -> bool:
    """Left: held-out loss of each domain over the stages (mean over seeds) per method.
    Right: relative drift of each earlier domain per method, each bar labelled with its value
    (ours is near 0). Colour means the method in both panels. Returns False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    colours = {method: f"C{m}" for m, method in enumerate(METHODS)}
    styles = dict(zip(DOMAINS, [("-", "o"), ("--", "s"), (":", "^")]))
    stages = ["NF4 base"] + [f"after {d}" for d in DOMAINS]
    for method in METHODS:
        for j, domain in enumerate(DOMAINS):
            mean = [statistics.mean(trajectories[(method, s)][k][j] for s in seeds) for k in range(len(stages))]
            line, marker = styles[domain]
            left.plot(stages, mean, line, marker=marker, color=colours[method], label=f"{method}: {domain}")
    left.set_title("held-out loss per domain after each stage")
    left.set_ylabel("held-out loss (nats/byte)")
    left.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method: domain", title_fontsize=7)
    width = 0.25
    for m, method in enumerate(METHODS):
        drifts = [statistics.mean(results[(method, s)]["domains"][d]["rel_drift_pct"] for s in seeds)
                  for d in DOMAINS[:-1]]
        bars = right.bar([i + m * width for i in range(len(drifts))], drifts, width, label=method,
                         color=colours[method])
        right.bar_label(bars, fmt="%+.2f%%", fontsize=7, padding=2)
    right.set_xticks([i + width for i in range(len(DOMAINS) - 1)], DOMAINS[:-1])
    right.axhline(0, color="black", linewidth=0.5)
    right.margins(y=0.15)
    right.set_title("drift of the earlier domains after all domains")
    right.set_ylabel("relative drift (%)")
    right.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method")
    smoke = " - quick smoke test, not a measurement" if quick else ""
    fig.suptitle(f"Forgetting benchmark: {len(seeds)} seed(s), mean over seeds{smoke}")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


# =============================================================================== entry
def _run_job(job: tuple) -> list[list[float]]:
    """One ``(method, seed)`` run in a worker process: the base arrives as a state dict."""
    method, base_state, domains, cfg, seed = job
    torch.set_num_threads(1)
    base = ByteLM(cfg)
    base.load_state_dict(base_state)
    return run_method(method, base, domains, cfg, seed)


def run_all(base: ByteLM, domains: dict, cfg: Config, seeds: list[int], jobs: int = 1,
            start: float | None = None) -> dict:
    """``{(method, seed): losses}`` for every method and seed, in ``jobs`` processes.

    Each run is independent and single-threaded (it seeds its own generators), so the numbers
    are the same for any ``jobs``: ``jobs > 1`` only spreads the runs over the cores.
    """
    start = time.perf_counter() if start is None else start
    keys = [(method, seed) for seed in seeds for method in METHODS]

    def progress(key, losses):
        summary = summarise(losses)
        print(f"seed {key[1]} {key[0]:8s} mean drift {summary['mean_rel_drift_pct']:+7.2f}%  "
              f"last loss {summary['last_loss']:.3f}  ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    trajectories = {}
    if jobs <= 1:
        for key in keys:
            trajectories[key] = run_method(key[0], base, domains, cfg, key[1])
            progress(key, trajectories[key])
        return trajectories
    state = {name: t.detach().clone() for name, t in base.state_dict().items()}
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(_run_job, (method, state, domains, cfg, seed)): (method, seed) for method, seed in keys}
        for future in as_completed(futures):
            trajectories[futures[future]] = future.result()
            progress(futures[future], trajectories[futures[future]])
    return {key: trajectories[key] for key in keys}


def default_jobs(seeds: int) -> int:
    """Worker processes for the runs: one per core, at most one per (method, seed) run."""
    return max(1, min(os.cpu_count() or 1, len(METHODS) * seeds))


def run_forgetting_benchmark(quick: bool = False, out_dir: str | os.PathLike = default_dir("forgetting"),
                             seeds: int | None = None, jobs: int | None = None) -> dict:
    """Run the benchmark; write ``forgetting.csv``, ``forgetting.md``, ``forgetting.png`` into
    ``out_dir``; print the table. ``jobs`` worker processes run the (method, seed) runs side by
    side (default ``default_jobs(seeds)``; the numbers do not depend on it). Returns
    ``{(method, seed): summary}``."""
    cfg = QUICK if quick else FULL
    cfg = cfg if seeds is None else replace(cfg, seeds=seeds)
    jobs = default_jobs(cfg.seeds) if jobs is None else jobs
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # One thread: the model is tiny, so a second thread gains little, and when other jobs share the
    # cores, oversubscribed intra-op threads made a training step ~9x slower (1.41 s vs 0.15 s
    # measured on the 2-core reference machine under load).
    torch.set_num_threads(1)
    start = time.perf_counter()
    pretrain_text, domains = build_corpora(cfg.domain_bytes)
    base = pretrain(cfg, pretrain_text)
    print(f"pretrained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    seed_list = list(range(cfg.seeds))
    trajectories = run_all(base, domains, cfg, seed_list, jobs, start)
    results = {key: summarise(losses) for key, losses in trajectories.items()}
    elapsed = time.perf_counter() - start
    table = markdown_table(results, seed_list)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    header = (f"Forgetting benchmark ({QUICK_NOTE if quick else 'full'}): {len(seed_list)} seeds, domains "
              f"{' → '.join(DOMAINS)}, {cfg.task_steps} steps each, rank {cfg.rank} per block, energy {cfg.energy}"
              f"{' of the variation (top direction always protected)' if cfg.exclude_top else ''}, "
              f"drift penalty {cfg.drift_penalty} (shrinkage {cfg.shrinkage}), {cfg.n_layer} layers d={cfg.d_model}, "
              f"{cfg.calib_batches} calibration batches, {cfg.warm_start_batches} warm-start batches; "
              f"{machine}; {elapsed:.0f} s with {jobs} worker process{'es' if jobs > 1 else ''}")
    write_csv(results, out / "forgetting.csv")
    (out / "forgetting.md").write_text(header + "\n\n" + table + "\n")
    plotted = plot(results, trajectories, seed_list, out / "forgetting.png", quick)
    print(header)
    print(table)
    print(f"wrote {out / 'forgetting.csv'}, {out / 'forgetting.md'}" +
          (f", {out / 'forgetting.png'}" if plotted else " (matplotlib missing: no plot)"))
    return results
