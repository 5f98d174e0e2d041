"""Per-task adapters on one NF4 base, each sequence routed to one of them from its input alone.

``RoutedLoRA`` trains a fresh adapter per task (older adapters frozen, so a task's adapter never
changes after its task: no drift from training) and, when a task ends, stores a small signature
of the task's inputs. At inference each sequence goes to the adapter whose signature best
explains it - or to the base model when none does - and the batch runs as ONE mixed batch
(``adapter_names``, one adapter per row). No task label is ever read.

The signature (``TaskSignature``) is the count, sum and Gram matrix (float64) of per-token
features at a probe point of the BASE model (adapters off, so the features do not depend on
which adapters exist): the output of an ``nn.Embedding`` (embedding statistics) or the input of
any other module, e.g. a ``LoRALinear4bit`` (the layer-input Gram the projection method of
``continual.py`` collects). Two scores turn it into "how badly does task ``t`` explain sequence
``x``" (lower = better), for a sequence of per-token features ``x_1..x_T``:

* ``"gaussian"``: the mean per-token negative log-likelihood under the task's Gaussian
  ``N(mu_t, S_t)`` (``S_t`` the feature covariance shrunk towards ``tr(S_t)/D * I`` by
  ``shrinkage``), without the constant ``D/2 log(2 pi)``: a quadratic discriminant whose tokens
  vote independently.
* ``"subspace"``: the fraction of the sequence's feature energy outside the task's principal
  subspace ``U_t`` (``subspace.extend_basis`` with ``energy`` of the variation, the projection
  method's own rule), divided by the median of that fraction over the task's calibration
  sequences (tasks whose subspaces differ in size compare on the same scale).

A task "explains" a sequence when its score is at most the task's threshold: the ``quantile``
of its calibration sequences' scores, widened for sequences shorter than the calibration ones
(a mean over fewer tokens scatters more; ``TaskSignature.threshold``). The route is the task
with the lowest score among those that explain the sequence, else ``"__base__"``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..integration.adapters import disable_adapters, lora_layers
from ..integration.mixed_batch import enable_adapter_names
from ..integration.peft_io import load_adapter, save_adapters
from ..modules.adapter_bank import BASE_ADAPTER
from .subspace import extend_basis

SCORINGS = ("gaussian", "subspace")
ROUTER_FILE = "router.safetensors"
ROUTER_FORMAT = "lora-triton-router"
ROUTER_VERSION = 1


# =============================================================================== features
class _ProbeReached(Exception):
    """Raised by the probe hook to stop a forward pass once the features are captured."""


def resolve_probe(model: nn.Module, probe: str) -> nn.Module:
    """The module named ``probe`` in ``model``; ``"embedding"`` is ``model.get_input_embeddings()``."""
    if probe == "embedding":
        getter = getattr(model, "get_input_embeddings", None)
        module = getter() if callable(getter) else None
        if not isinstance(module, nn.Module):
            raise ValueError("probe='embedding' needs a model with get_input_embeddings(); name the embedding "
                             "module instead (e.g. probe='embed')")
        return module
    try:
        return model.get_submodule(probe)
    except AttributeError:
        raise ValueError(f"probe {probe!r} is not a module of the model") from None


@torch.no_grad()
def probe_features(model: nn.Module, probe: nn.Module, call: Callable[[], object]) -> torch.Tensor:
    """The base model's features at ``probe`` during ``call()`` (a forward pass of ``model``):
    the module's output for an ``nn.Embedding``, its first input otherwise, ``[B, T, D]`` in the
    model's dtype and device (a ``[B, D]`` feature counts as ``T = 1``; the router computes in
    float64 on the CPU). The model runs in eval mode with every adapter disabled, and stops at the
    probe (nothing after it is computed)."""
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append((output if isinstance(module, nn.Embedding) else args[0]).detach())
        raise _ProbeReached

    handle = probe.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with disable_adapters(model):
            call()
    except _ProbeReached:
        pass
    finally:
        handle.remove()
        model.train(was_training)
    if not captured:
        raise RuntimeError("the probe module was not called by the forward pass; pick a module the forward uses")
    x = captured[0]
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise ValueError(f"probe features must be [B, T, D] or [B, D], got "
                         f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    return x[:, None] if x.dim() == 2 else x


def token_mask(features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """float64 ``[B, T]`` (CPU) weights of the tokens that count (``mask``: an attention mask, 1 = token)."""
    b, t = features.shape[:2]
    if mask is None:
        return torch.ones(b, t, dtype=torch.float64)
    if mask.shape != (b, t):
        raise ValueError(f"attention_mask {list(mask.shape)} does not match the probe features' [B, T] = [{b}, {t}]")
    return mask.to("cpu", torch.float64)


# =============================================================================== signatures
@dataclass
class TaskSignature:
    """One task's input statistics at the probe, and how its calibration sequences scored.

    ``count`` tokens, ``total`` float64 ``[D]`` (sum of features), ``gram`` float64 ``[D, D]``
    (sum of outer products); ``cal_mean``, ``cal_quantile``: mean and ``quantile`` of the
    calibration sequences' scores under this task; ``cal_length``: their mean token count;
    ``scale``: the divisor of the ``"subspace"`` score (1 for ``"gaussian"``)."""

    count: int
    total: torch.Tensor
    gram: torch.Tensor
    cal_mean: float = 0.0
    cal_quantile: float = math.inf
    cal_length: float = 1.0
    scale: float = 1.0

    def threshold(self, length: torch.Tensor) -> torch.Tensor:
        """Largest score that still counts as explained, for sequences of ``length`` tokens:
        ``cal_mean + (cal_quantile - cal_mean) * sqrt(max(cal_length / length, 1))`` - the
        calibration quantile, widened as a mean over fewer tokens scatters more (by the
        independent-token rate, ``1/sqrt(T)``); never narrowed for longer sequences, whose mean
        moves with real shifts of the domain, not only with noise."""
        widen = (self.cal_length / length.clamp(min=1)).clamp(min=1.0).sqrt()
        return self.cal_mean + (self.cal_quantile - self.cal_mean) * widen


class TaskRouter:
    """Per-task input signatures and the rule that routes a sequence to a task or the base
    (module docstring). ``scoring``: ``"gaussian"`` or ``"subspace"``; ``shrinkage`` in
    ``[0, 1]`` (gaussian covariance towards isotropy); ``energy`` in ``(0, 1]`` (subspace: fraction
    of the variation held); ``quantile`` in ``(0, 1]`` (of the calibration scores that pass)."""

    def __init__(self, scoring: str = "gaussian", shrinkage: float = 0.1, energy: float = 0.99,
                 quantile: float = 1.0):
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        self.scoring, self.shrinkage, self.energy, self.quantile = scoring, shrinkage, energy, quantile
        self.signatures: dict[str, TaskSignature] = {}
        self._derived: dict[str, tuple] = {}

    @property
    def tasks(self) -> list[str]:
        """Task names, in the order they were added."""
        return list(self.signatures)

    # ---------------------------------------------------------------- building
    def add_task(self, name: str, features: Iterable[tuple[torch.Tensor, torch.Tensor | None]]) -> TaskSignature:
        """Record task ``name`` from its calibration sequences: ``(features [B, T, D], mask [B, T]
        or None)`` pairs (``probe_features``). The features are held until the calibration scores
        are computed: ``tokens * D`` values in their own dtype. Returns the signature."""
        if name == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is the base model's name; pick another task name")
        if name in self.signatures:
            raise ValueError(f"task {name!r} already has a signature")
        pairs = [(x, token_mask(x, m)) for x, m in features]
        if not pairs or sum(float(w.sum()) for _, w in pairs) == 0:
            raise ValueError(f"task {name!r}: no calibration tokens")
        dims = {x.shape[-1] for x, _ in pairs}
        known = {s.gram.shape[0] for s in self.signatures.values()}
        if len(dims | known) != 1:
            raise ValueError(f"probe features have {sorted(dims)} dims, earlier tasks {sorted(known)}")
        d = dims.pop()
        total, gram, count = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64), 0
        for x, w in pairs:
            flat, weights = x.reshape(-1, d).to("cpu", torch.float64), w.reshape(-1, 1).cpu()
            total += (flat * weights).sum(0)
            gram += (flat * weights).T @ flat
            count += int(weights.sum())
        signature = TaskSignature(count, total, gram)
        self.signatures[name] = signature
        self._derived.pop(name, None)
        try:
            scores = torch.cat([self._score(name, x, w) for x, w in pairs])
            lengths = torch.cat([w.sum(1) for _, w in pairs])
            used = lengths > 0
            scores, lengths = scores[used], lengths[used]
            if self.scoring == "subspace":
                signature.scale = max(float(scores.median()), 1e-12)
                scores = scores / signature.scale
            signature.cal_mean = float(scores.mean())
            signature.cal_quantile = float(torch.quantile(scores, self.quantile))
            signature.cal_length = float(lengths.mean())
        except Exception:
            del self.signatures[name]
            raise
        return signature

    def _derive(self, name: str) -> tuple:
        """Per-task quantities the score needs, computed once from the signature."""
        if name not in self._derived:
            s = self.signatures[name]
            mean = s.total / s.count
            if self.scoring == "gaussian":
                cov = s.gram / s.count - torch.outer(mean, mean)
                cov = (cov + cov.T) / 2
                d = cov.shape[0]
                iso = float(torch.trace(cov)) / d
                iso = iso if iso > 0 else 1.0
                cov = (1 - self.shrinkage) * cov + self.shrinkage * iso * torch.eye(d, dtype=torch.float64)
                # a tiny ridge keeps the Cholesky factor defined for shrinkage 0 and rank-deficient features
                cov = cov + 1e-9 * iso * torch.eye(d, dtype=torch.float64)
                chol = torch.linalg.cholesky(cov)
                logdet = 2 * float(torch.log(torch.diagonal(chol)).sum())
                self._derived[name] = (mean, chol, logdet)
            else:
                basis, _ = extend_basis(torch.zeros(s.gram.shape[0], 0, dtype=torch.float64), s.gram, self.energy,
                                        exclude_top=True)
                self._derived[name] = (basis,)
        return self._derived[name]

    def _score(self, name: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Unnormalised per-sequence score of task ``name`` for ``x [B, T, D]`` weighted by ``w [B, T]``
        (``nan`` for a sequence without tokens)."""
        derived = self._derive(name)
        x = x.to("cpu", torch.float64)
        w = w.to("cpu", torch.float64)
        tokens = w.sum(1)
        if self.scoring == "gaussian":
            mean, chol, logdet = derived
            centred = (x - mean).reshape(-1, x.shape[-1])
            z = torch.linalg.solve_triangular(chol, centred.T, upper=False)
            nll = 0.5 * (z.square().sum(0).reshape(x.shape[:2]) + logdet)
            return (nll * w).sum(1) / tokens
        (basis,) = derived
        energy = (x.square().sum(-1) * w).sum(1)
        inside = ((x @ basis).square().sum(-1) * w).sum(1)
        return (energy - inside).clamp(min=0) / energy.clamp(min=1e-300)

    # ---------------------------------------------------------------- routing
    def scores(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """float64 ``[B, n_tasks]``: each sequence's score under each task (lower = better;
        ``"subspace"`` scores divided by the task's ``scale``)."""
        if not self.signatures:
            raise RuntimeError("the router has no task yet")
        w = token_mask(features, mask)
        out = [self._score(name, features, w) / s.scale for name, s in self.signatures.items()]
        return torch.stack(out, dim=1)

    def explained(self, scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """bool ``[B, n_tasks]``: the task's score is at most its threshold for that length."""
        limits = torch.stack([s.threshold(lengths) for s in self.signatures.values()], dim=1)
        return scores <= limits

    def route(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> list[str]:
        """One name per sequence: the best-scoring task among those that explain it, else
        ``"__base__"`` (also for a sequence without tokens)."""
        scores = self.scores(features, mask)
        lengths = token_mask(features, mask).sum(1).cpu()
        ok = self.explained(scores, lengths) & torch.isfinite(scores)
        best = torch.where(ok, scores, torch.full_like(scores, math.inf)).argmin(1)
        names = self.tasks
        return [names[int(i)] if bool(ok[row, int(i)]) else BASE_ADAPTER for row, i in enumerate(best)]

    # ---------------------------------------------------------------- files
    def save(self, path: str | Path, probe: str, extra: dict | None = None) -> None:
        """Write the router file (see ``RoutedLoRA.save``): tensors ``task.<i>.total``,
        ``task.<i>.gram`` (float64) and ``task.<i>.calibration`` (float64 ``[5]``: count, cal_mean,
        cal_quantile, cal_length, scale); metadata ``format``, ``version``, ``probe``,
        ``scoring``, ``shrinkage``, ``energy``, ``quantile``, ``tasks`` (JSON list, index = i) and
        the JSON-encoded ``extra``."""
        from safetensors.torch import save_file

        tensors = {}
        for i, s in enumerate(self.signatures.values()):
            tensors[f"task.{i}.total"] = s.total.contiguous()
            tensors[f"task.{i}.gram"] = s.gram.contiguous()
            tensors[f"task.{i}.calibration"] = torch.tensor(
                [s.count, s.cal_mean, s.cal_quantile, s.cal_length, s.scale], dtype=torch.float64)
        meta = {"format": ROUTER_FORMAT, "version": str(ROUTER_VERSION), "probe": probe, "scoring": self.scoring,
                "shrinkage": repr(self.shrinkage), "energy": repr(self.energy), "quantile": repr(self.quantile),
                "tasks": json.dumps(self.tasks), "extra": json.dumps(extra or {})}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> tuple["TaskRouter", str, dict]:
        """``(router, probe, extra)`` from a file written by ``save``; ``ValueError`` for another file."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != ROUTER_FORMAT:
                raise ValueError(f"{path} is not a lora-triton router file (format={meta.get('format')!r})")
            if int(meta.get("version", "0")) > ROUTER_VERSION:
                raise ValueError(f"{path} has router file version {meta['version']}; this lora-triton reads "
                                 f"up to {ROUTER_VERSION}")
            router = cls(meta["scoring"], float(meta["shrinkage"]), float(meta["energy"]), float(meta["quantile"]))
            for i, name in enumerate(json.loads(meta["tasks"])):
                count, cal_mean, cal_quantile, cal_length, scale = f.get_tensor(f"task.{i}.calibration").tolist()
                router.signatures[name] = TaskSignature(int(count), f.get_tensor(f"task.{i}.total"),
                                                        f.get_tensor(f"task.{i}.gram"), cal_mean, cal_quantile,
                                                        cal_length, scale)
        return router, meta["probe"], json.loads(meta.get("extra", "{}"))


# =============================================================================== the manager
def default_call(model: nn.Module, batch) -> object:
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple or list, else ``model(batch)``."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _batch_mask(batch) -> torch.Tensor | None:
    return batch.get("attention_mask") if isinstance(batch, dict) else None


class RoutedLoRA:
    """Continual learning with one adapter per task, chosen per sequence (module docstring).

    ``model`` must hold ``LoRALinear4bit`` layers (``inject_lora``); every task adds an adapter
    of its own name to each of them. Usage::

        routed = RoutedLoRA(model, probe="embedding", r=16, lora_alpha=32)
        for task, train_batches, calibration_batches in tasks:
            opt = torch.optim.AdamW(routed.begin_task(task), lr=1e-3)   # a fresh adapter; others frozen
            ...                                                          # train: the task's adapter is active
            routed.end_task(calibration_batches)                         # freeze it, record its signature
        logits = routed(input_ids=ids, attention_mask=mask)             # each row with its routed adapter
        out = routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20)
        routed.save("adapters/")                                         # PEFT folders + router.safetensors
        routed = RoutedLoRA.load(base_model, "adapters/")

    ``probe``: where the signatures read the base model (``"embedding"`` =
    ``model.get_input_embeddings()``, or a module name); ``forward(model, batch)`` runs a
    calibration batch (default ``default_call``; a dict batch's ``attention_mask`` masks its
    padding); ``scoring``, ``shrinkage``, ``energy``, ``quantile``: ``TaskRouter``'s. ``r``,
    ``lora_alpha``, ``lora_dropout``, ``use_rslora``: each new adapter's (``begin_task`` may
    override them).
    """

    def __init__(self, model: nn.Module, probe: str = "embedding", scoring: str = "gaussian", r: int = 8,
                 lora_alpha: float = 16, lora_dropout: float = 0.0, use_rslora: bool = False,
                 forward: Callable[[nn.Module, object], object] | None = None, shrinkage: float = 0.1,
                 energy: float = 0.99, quantile: float = 1.0, router: TaskRouter | None = None):
        if not lora_layers(model):
            raise ValueError("model has no LoRALinear4bit layers (call inject_lora first)")
        self.model = model
        self.probe = probe
        self.probe_module = resolve_probe(model, probe)
        self.router = router or TaskRouter(scoring, shrinkage, energy, quantile)
        self.forward = forward or default_call
        self.defaults = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)
        self.open_task: str | None = None
        enable_adapter_names(model)

    @property
    def tasks(self) -> list[str]:
        """The routed tasks (each an adapter name), in training order."""
        return self.router.tasks

    # ---------------------------------------------------------------- tasks
    def begin_task(self, name: str, warm_start: str | None = None, init: str | bool = True,
                   **overrides) -> list[nn.Parameter]:
        """Add adapter ``name`` to every ``LoRALinear4bit`` layer, make it active and the only
        trainable one, and return its parameters. ``warm_start``: an existing adapter (e.g. the
        previous task's) whose weights the new one starts from (same rank); otherwise ``init``
        (PEFT's default: ``B = 0``, the base model's output)."""
        if self.open_task is not None:
            raise RuntimeError(f"task {self.open_task!r} is still open; call end_task first")
        if name == BASE_ADAPTER or name in self.router.signatures:
            raise ValueError(f"task name {name!r} is taken")
        layers = lora_layers(self.model)
        clash = [path for path, layer in layers.items() if name in layer.lora_A]
        if clash:
            raise ValueError(f"adapter {name!r} already exists in {len(clash)} layer(s), e.g. {clash[0]!r}")
        spec = {**self.defaults, **overrides}
        if warm_start is not None:
            missing = [path for path, layer in layers.items() if warm_start not in layer.lora_A]
            if missing:
                raise ValueError(f"warm_start adapter {warm_start!r} is missing in {missing[:3]}")
            wrong = [path for path, layer in layers.items() if layer.r[warm_start] != spec["r"]]
            if wrong:
                raise ValueError(f"warm_start adapter {warm_start!r} has another rank than r={spec['r']} "
                                 f"(e.g. {wrong[0]!r})")
        for layer in layers.values():
            layer.add_adapter(name, spec["r"], spec["lora_alpha"], spec["lora_dropout"], spec["use_rslora"], init)
            if warm_start is not None:
                with torch.no_grad():
                    layer.lora_A[name].weight.copy_(layer.lora_A[warm_start].weight)
                    layer.lora_B[name].weight.copy_(layer.lora_B[warm_start].weight)
        self.open_task = name
        return [p for layer in layers.values() for p in (layer.lora_A[name].weight, layer.lora_B[name].weight)]

    def end_task(self, calibration_batches: Iterable, task: str | None = None) -> TaskSignature:
        """Freeze the open task's adapter and record its signature from ``calibration_batches``
        (the task's TRAINING data; the base model's features at the probe). With no task open,
        ``task`` names an adapter trained elsewhere to add as a routed task."""
        name = self.open_task if task is None else task
        if name is None:
            raise RuntimeError("no task is open; call begin_task, or name an existing adapter with task=")
        if self.open_task is not None and task not in (None, self.open_task):
            raise RuntimeError(f"task {self.open_task!r} is open; cannot record {task!r}")
        layers = lora_layers(self.model)
        if not any(name in layer.lora_A for layer in layers.values()):
            raise KeyError(f"no layer has an adapter named {name!r}")
        signature = self.router.add_task(name, (self.features(batch) for batch in calibration_batches))
        for layer in layers.values():
            if name in layer.lora_A:
                layer.lora_A[name].weight.requires_grad_(False)
                layer.lora_B[name].weight.requires_grad_(False)
        self.open_task = None
        return signature

    # ---------------------------------------------------------------- routing
    def features(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(probe features [B, T, D], attention mask or None)`` of a batch (``forward``)."""
        x = probe_features(self.model, self.probe_module, lambda: self.forward(self.model, batch))
        return x, _batch_mask(batch)

    def route_batch(self, batch) -> list[str]:
        """One adapter name (or ``"__base__"``) per sequence of ``batch`` (run by ``forward``)."""
        return self.router.route(*self.features(batch))

    def route(self, *args, **kwargs) -> list[str]:
        """One adapter name (or ``"__base__"``) per sequence of the model call ``model(*args,
        **kwargs)`` (only the forward up to the probe runs; ``attention_mask`` masks padding)."""
        x = probe_features(self.model, self.probe_module, lambda: self.model(*args, **kwargs))
        return self.router.route(x, kwargs.get("attention_mask"))

    def __call__(self, *args, **kwargs):
        """``model(*args, **kwargs)`` with each sequence's routed adapter, in one mixed batch."""
        return self.model(*args, adapter_names=self.route(*args, **kwargs), **kwargs)

    def generate(self, *args, **kwargs):
        """``model.generate`` with each prompt's routed adapter (routed once, from the prompt)."""
        inputs = {k: kwargs[k] for k in ("input_ids", "attention_mask", "inputs_embeds") if k in kwargs}
        names = self.route(*args[:1], **inputs)
        return self.model.generate(*args, adapter_names=names, **kwargs)

    # ---------------------------------------------------------------- files
    def save(self, directory: str | Path, base_model_name_or_path: str | None = None,
             task_type: str | None = None) -> Path:
        """Write every task's adapter in PEFT's layout (``integration.save_adapters``: ``default``
        in ``directory`` itself, any other task in ``directory/<task>``) and the router in
        ``directory/router.safetensors`` (``TaskRouter.save``; its ``extra`` holds the adapter
        folders relative to ``directory``). Returns ``directory``."""
        if self.open_task is not None:
            raise RuntimeError(f"task {self.open_task!r} is still open; call end_task before saving")
        if not self.tasks:
            raise ValueError("no task to save")
        directory = Path(directory)
        folders = save_adapters(self.model, directory, self.tasks, base_model_name_or_path, task_type)
        self.router.save(directory / ROUTER_FILE, self.probe,
                         {"adapters": {name: str(Path(p).relative_to(directory)) for name, p in folders.items()}})
        return directory

    @classmethod
    def load(cls, model: nn.Module, directory: str | Path, forward: Callable | None = None,
             **load_kwargs) -> "RoutedLoRA":
        """Load a folder written by ``save`` into ``model`` (a base model, or one holding
        ``LoRALinear4bit`` layers; ``load_kwargs`` go to ``integration.load_adapter``: blocksize,
        double_quant, backend). Every adapter is frozen."""
        directory = Path(directory)
        router, probe, extra = TaskRouter.load(directory / ROUTER_FILE)
        folders = extra.get("adapters", {})
        for name in router.tasks:
            load_adapter(model, directory / folders.get(name, "." if name == "default" else name), name,
                         **load_kwargs)
        for layer in lora_layers(model).values():
            layer.set_trainable_adapters([])
        return cls(model, probe=probe, forward=forward, router=router)
