"""Forgetting protection across sequential tasks: stacked adapter blocks, the newest one
constrained to the inputs earlier tasks did not use.

How it works, per adapted layer (``ContinualLoRALinear4bit``):

* Task ``t`` gets its own block ``(A_t [r_t, K], B_t [N, r_t], s_t)``; the blocks of earlier
  tasks are frozen. All blocks stay active at inference: no task routing.
* The stack runs as ONE adapter of rank ``sum_t r_t`` through the fused op:
  ``A = cat_t A_t`` (along r), ``B = cat_t s_t B_t`` (along r), scale 1, so a single
  ``lora_nf4_linear`` call computes ``sum_t s_t B_t A_t x``.
* After task ``t`` (``ContinualLoRA.end_task``) the layer's inputs on that task's calibration
  data extend an orthonormal basis ``U [K, d]`` of the protected subspace (``subspace.py``).
  The block being trained is used as ``A_eff = A (I - U U^T)`` inside the forward, so the
  constraint holds for any optimizer; when its task ends, ``A_eff`` is baked into ``A``.

Guarantee (exact). Let ``X_i`` be the inputs of a layer on task ``i``'s calibration data,
collected at ``end_task(i)``, and ``U_{i+1}`` the basis built then; later bases contain it,
so every later block satisfies ``A_t^eff x = A_t (I - U_t U_t^T) x`` with
``||(I - U_t U_t^T) x|| <= ||(I - U_{i+1} U_{i+1}^T) x||``. The layer's output on ``X_i``
therefore changes by

    ||dY_i||_F  <=  sqrt(e_i) * sum_{t > i} s_t ||B_t A_t^eff||_2
                <=  sqrt(1 - energy) * ||X_i||_F * sum_{t > i} s_t ||B_t A_t^eff||_2

where ``e_i = ||X_i (I - U_{i+1} U_{i+1}^T)||_F^2`` is the energy discarded when ``U_{i+1}``
was built (recorded exactly in ``SubspaceStats.discarded_energy``; ``<= (1-energy)||X_i||^2``
by construction, ``<= (1-energy)(||X_i||^2 - lambda_max)`` with ``exclude_top``, and
``<= (K - d) * rel_threshold * lambda_max`` with the spectral threshold alone, ``lambda_max``
the top eigenvalue of ``X_i^T X_i``). The first line holds whatever the selection rule.
With ``energy = 1.0``, ``e_i`` is float noise, every layer's output on its
calibration inputs is unchanged, and by induction over the layers in forward order (each
layer's input is the output of unchanged layers) so is the whole model's output on every
calibration input of every earlier task - provided only the adapter blocks train. In a deep
model with ``energy < 1`` the per-layer bound holds for the layer's inputs as collected; the
model-level drift also includes the propagation of earlier layers' drift.

Free dimension: a layer with ``d`` protected directions leaves ``K - d`` for new tasks; when
``d == K`` the layer is FULL and a new block there cannot change anything (it warns).
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from typing import Callable, Iterable

import torch
from torch import nn

from ..integration.mixed_batch import enable_adapter_names
from ..modules import LoRALinear4bit, NF4Linear
from ..ops import lora_nf4_linear
from .subspace import SubspaceStats, extend_basis, free_directions, output_factor, residual_factor

_BLOCK_FIELDS = ("r", "lora_alpha", "lora_dropout", "use_rslora")


class ContinualLoRALinear4bit(LoRALinear4bit):
    """A ``LoRALinear4bit`` whose adapters are stacked task blocks, all active at once.

    Adapters live in ``lora_A`` / ``lora_B`` (keys = task names, PEFT shapes). Extra state:
    buffer ``basis`` float32 ``[K, d]`` (the protected subspace), buffer ``residual`` float32
    ``[K, m]`` (the ended tasks' input second moment outside the basis, for ``drift_penalty``;
    ``m = 0`` unless the penalty is on), buffer ``output_factor`` float32 ``[N, N]`` (``H``,
    ``H H^T`` = the ended tasks' normalised output-gradient second moment, weighting the penalty's
    output directions; ``[N, 0]`` = unweighted), ``open_task`` (the block being trained, or None)
    and ``task_stats`` (``SubspaceStats`` per ended task).
    """

    def __init__(self, base_layer: NF4Linear, backend: str | None = None):
        super().__init__(base_layer, adapter_name=None, backend=backend)
        self.register_buffer("basis", torch.zeros(self.in_features, 0, device=base_layer.nf4.device))
        self.register_buffer("residual", torch.zeros(self.in_features, 0, device=base_layer.nf4.device))
        self.register_buffer("output_factor", torch.zeros(self.out_features, 0, device=base_layer.nf4.device))
        self.open_task: str | None = None
        self.task_stats: dict[str, SubspaceStats] = {}

    @classmethod
    def from_lora_layer(cls, layer: LoRALinear4bit, keep_adapters: bool = False) -> "ContinualLoRALinear4bit":
        """Share ``layer``'s NF4 base. With ``keep_adapters`` its adapters become frozen blocks
        (needed when an init such as PiSSA moved part of the weight into them); otherwise
        they are dropped."""
        new = cls(layer.base_layer, backend=layer.backend)
        for name in (layer.lora_A if keep_adapters else ()):
            new.lora_A[name], new.lora_B[name] = layer.lora_A[name], layer.lora_B[name]
            for table in _BLOCK_FIELDS + ("scaling",):
                getattr(new, table)[name] = getattr(layer, table)[name]
            for module in (new.lora_A[name], new.lora_B[name]):
                module.weight.requires_grad_(False)
        return new

    # ---------------------------------------------------------------- tasks
    @property
    def free_dim(self) -> int:
        """Input directions not yet protected: ``K - d``. 0 means the layer is full."""
        return self.in_features - self.basis.shape[1]

    def begin_task(self, name: str, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                   use_rslora: bool = False, init: str | bool = True) -> None:
        """Add block ``name`` (the only trainable one); earlier blocks stay frozen."""
        if self.open_task is not None:
            raise RuntimeError(f"task {self.open_task!r} is still open; call end_task first")
        self.add_adapter(name, r, lora_alpha, lora_dropout, use_rslora, init)
        self.open_task = name

    @torch.no_grad()
    def warm_start(self, moment: torch.Tensor, shrinkage: float = 0.0) -> int:
        """Point the open block's ``A`` rows at the free directions the new task uses most per
        unit of drift penalty (``subspace.free_directions``; ``moment`` = the new task's float64
        ``X^T X / n`` at this layer). Row norms are kept; ``B`` stays as it is (zero after the
        default init, so the output does not change). Returns the number of rows set."""
        name = self.open_task
        if name is None:
            raise RuntimeError("warm_start needs an open task (call begin_task first)")
        if self.free_dim == 0:
            return 0
        k = self.in_features
        if moment.shape != (k, k) or not bool(torch.isfinite(moment).all()):
            raise ValueError(f"warm_start expects a finite [{k}, {k}] input second moment, got shape "
                             f"{tuple(moment.shape)}" + ("" if moment.shape != (k, k) else " with NaN/Inf"))
        a = self.lora_A[name].weight
        floor = shrinkage * float(self.mean_residual_eigenvalue(torch.float64))
        rows = free_directions(self.basis, moment.to(self.basis.device, torch.float64), self.residual, floor,
                               a.shape[0])
        norms = a[: rows.shape[0]].norm(dim=1, keepdim=True).double()
        a[: rows.shape[0]] = (rows * norms).to(a.dtype)
        return rows.shape[0]

    def end_task(self, gram: torch.Tensor | None, energy: float, rel_threshold: float = 0.0,
                 exclude_top: bool = False, tokens: int = 0, residual_rank: int = 0,
                 task: str | None = None, select_gram: torch.Tensor | None = None,
                 output_moment: torch.Tensor | None = None, output_shrinkage: float = 0.0) -> SubspaceStats | None:
        """Bake and freeze the open block, then grow ``basis`` from ``gram`` (float64 ``[K, K]``,
        the task's ``X^T X`` over ``tokens`` inputs at this layer; None = no calibration data).
        With ``residual_rank > 0`` also refresh ``residual`` (``subspace.residual_factor``), the
        earlier tasks' input second moment left outside the basis, used by ``drift_penalty``.
        The stats are recorded under the open task, or under ``task`` when no task is open (a
        block kept from a plain adapter, ``keep_adapters``, whose task was trained elsewhere).
        ``select_gram`` (float64 ``[K, K]``): choose the new directions on it instead of ``gram``
        (gradient-weighted inputs); the stats still measure ``gram``, so the drift bound keeps its
        meaning. ``output_moment`` (float64 ``[N, N]``, the task's summed output-gradient outer
        products): fold it into ``output_factor`` (``subspace.output_factor``, shrunk towards the
        identity by ``output_shrinkage``).
        Returns the stats."""
        if task is not None and task not in self.lora_A:
            raise KeyError(f"no block named {task!r}; have {list(self.lora_A)}")
        if task is not None and self.open_task not in (None, task):
            raise RuntimeError(f"task {self.open_task!r} is open; its data cannot be recorded as {task!r}")
        name = self.open_task
        if name is not None:
            with torch.no_grad():
                self.lora_A[name].weight.copy_(self.constrained(self.lora_A[name].weight))
            for module in (self.lora_A[name], self.lora_B[name]):
                module.weight.requires_grad_(False)
            self.open_task = None
        if gram is None:
            return None
        gram = gram.to(self.basis.device)
        select = gram if select_gram is None else select_gram.to(self.basis.device)
        tasks_before = len(self.task_stats)
        self.basis, stats = extend_basis(self.basis, select, energy, rel_threshold, exclude_top, measure=gram)
        if output_moment is not None:
            self.output_factor = output_factor(output_moment.to(self.basis.device), self.output_factor,
                                               tasks_before, output_shrinkage).to(self.basis.device)
        if residual_rank > 0 and tokens > 0:
            self.residual = residual_factor(self.basis, gram / tokens, self.residual,
                                            residual_rank).to(self.basis.device)
        if (name or task) is not None:
            self.task_stats[name or task] = stats
        return stats

    # ---------------------------------------------------------------- compute
    def constrained(self, a: torch.Tensor) -> torch.Tensor:
        """``A (I - U U^T)`` for ``A [r, K]``, in A's dtype (differentiable in A)."""
        u = self.basis.to(a.dtype)
        return a - (a @ u) @ u.T

    def stacked_adapter(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stack as one adapter: ``A [R, K]`` and ``B [N, R]`` (scales folded into B),
        ``R = sum_t r_t``; the open block's A is constrained."""
        a_blocks, b_blocks = [], []
        for name in self.lora_A:
            a = self.lora_A[name].weight
            a_blocks.append(self.constrained(a) if name == self.open_task else a)
            b_blocks.append(self.lora_B[name].weight * self.scaling[name])
        return torch.cat(a_blocks, dim=0), torch.cat(b_blocks, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., K]`` -> ``[..., N]``: base + ``sum_t s_t B_t A_t x`` in one fused call (dropout
        of the open block, applied to the whole stack, only in training)."""
        if self.disabled or len(self.lora_A) == 0:
            return self.base_layer(x)
        a, b = self.stacked_adapter()
        p = self.lora_dropout[self.open_task] if self.open_task is not None else 0.0
        return lora_nf4_linear(x, self.base_layer.nf4, a, b, 1.0, self.base_layer.bias, p, self.training,
                               self.backend)

    def drift_penalty(self, shrinkage: float = 0.0) -> torch.Tensor:
        """``||s B A_eff F||_F^2 + shrinkage * mu * ||s B A_eff||_F^2`` for the open block (0
        without one); with an ``output_factor`` ``H``, ``||H^T s B A_eff F||_F^2 + shrinkage * mu *
        ||H^T s B A_eff||_F^2`` (output directions weighted by the earlier tasks' loss gradients).

        The first term is the mean squared change of this layer's output, per earlier-task
        calibration token, that the open block causes through the directions the basis left
        free (``F = residual``, orthogonal to the basis, so ``A_eff F = A F``). The second
        shrinks that second-moment estimate towards isotropy on the free subspace
        (``mu = ||F||_F^2 / free_dim``, the mean residual eigenvalue): unseen inputs of the
        earlier tasks have energy in directions their calibration sample barely covered.
        Differentiable in the open block's ``A`` and ``B``."""
        name = self.open_task
        if name is None or self.residual.shape[1] == 0:
            return self.basis.new_zeros(())
        a, b, scale = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        if self.output_factor.shape[1] > 0:
            b = self.output_factor.to(b.dtype).T @ b
        f = self.residual.to(a.dtype)
        penalty = (scale * (b @ (a @ f))).square().sum()
        if shrinkage > 0:
            mu = self.mean_residual_eigenvalue(a.dtype)
            penalty = penalty + shrinkage * mu * (scale * (b @ self.constrained(a))).square().sum()
        return penalty

    def free_fraction(self, moment: torch.Tensor) -> float:
        """``tr(P C P) / tr(C)`` for a float64 ``[K, K]`` second moment ``C``, ``P = I - U U^T``: the
        fraction of ``C``'s energy outside the protected basis (1.0 for ``tr(C) = 0``)."""
        total = float(torch.trace(moment))
        if total <= 0:
            return 1.0
        u = self.basis.to(torch.float64)
        return max(0.0, 1.0 - float(torch.trace(u.T @ moment @ u)) / total)

    def mean_residual_eigenvalue(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``mu = ||F||_F^2 / free_dim``: the mean eigenvalue of the earlier tasks' residual second
        moment over the free subspace (0-dim, computed in ``dtype``; 0 without a residual)."""
        return self.residual.to(dtype).square().sum() / max(self.free_dim, 1)

    def drift_bound(self, task: str) -> float:
        """Upper bound on ``||dY||_F``, the change of this layer's output on ``task``'s
        calibration inputs since that task ended: ``sqrt(e_task) * sum_{later t} s_t ||B_t A_t^eff||_2``."""
        names = list(self.lora_A)
        later = names[names.index(task) + 1:]
        norm_sum = 0.0
        with torch.no_grad():
            for name in later:
                a = self.lora_A[name].weight.double()
                a = self.constrained(a) if name == self.open_task else a
                product = self.scaling[name] * (self.lora_B[name].weight.double() @ a)
                norm_sum += float(torch.linalg.matrix_norm(product, ord=2))
        return math.sqrt(self.task_stats[task].discarded_energy) * norm_sum

    # ---------------------------------------------------------------- state
    def get_extra_state(self) -> torch.Tensor:
        """Block layout, open task and stats as a uint8 tensor of JSON (safetensors-friendly)."""
        meta = {"blocks": {name: {f: getattr(self, f)[name] for f in _BLOCK_FIELDS} for name in self.lora_A},
                "open_task": self.open_task,
                "task_stats": {name: s.to_dict() for name, s in self.task_stats.items()}}
        return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        meta = _decode_meta(state)
        self._ensure_blocks(meta["blocks"])
        self.open_task = meta["open_task"]
        self.task_stats = {name: SubspaceStats(**s) for name, s in meta["task_stats"].items()}
        for name in self.lora_A:
            for module in (self.lora_A[name], self.lora_B[name]):
                module.weight.requires_grad_(name == self.open_task)

    def _ensure_blocks(self, blocks: dict) -> None:
        """Create the blocks named in ``blocks`` that this layer lacks (weights loaded later)."""
        for name, spec in blocks.items():
            if name not in self.lora_A:
                self.add_adapter(name, spec["r"], spec["lora_alpha"], spec["lora_dropout"], spec["use_rslora"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Blocks and the basis' width are data-dependent: shape them before the tensors load.
        meta_key = prefix + "_extra_state"
        if meta_key in state_dict:
            self._ensure_blocks(_decode_meta(state_dict[meta_key])["blocks"])
        for buffer in ("basis", "residual", "output_factor"):
            if prefix + buffer in state_dict:
                setattr(self, buffer, torch.zeros_like(state_dict[prefix + buffer], device=self.basis.device,
                                                       dtype=torch.float32))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _decode_meta(state: torch.Tensor) -> dict:
    return json.loads(bytes(state.cpu().to(torch.uint8).tolist()).decode("utf-8"))


# ==================================================================== the manager
def make_continual(model: nn.Module, keep_adapters: bool = False) -> nn.Module:
    """Replace every ``LoRALinear4bit`` in ``model`` (in place) by a ``ContinualLoRALinear4bit``
    sharing its NF4 base. Returns ``model`` (a bare ``LoRALinear4bit`` is returned converted)."""
    if isinstance(model, LoRALinear4bit) and not isinstance(model, ContinualLoRALinear4bit):
        return ContinualLoRALinear4bit.from_lora_layer(model, keep_adapters)
    for name, child in list(model.named_children()):
        if isinstance(child, LoRALinear4bit) and not isinstance(child, ContinualLoRALinear4bit):
            setattr(model, name, ContinualLoRALinear4bit.from_lora_layer(child, keep_adapters))
        else:
            make_continual(child, keep_adapters)
    return model


@contextlib.contextmanager
def collect_input_grams(layers: dict[str, nn.Module], counts: dict[str, int] | None = None):
    """Within the block, every forward of ``layers[name]`` adds ``x^T x`` (float64 ``[K, K]``,
    ``x`` flattened to ``[M, K]``) to ``grams[name]`` (and ``M`` to ``counts[name]`` when a
    ``counts`` dict is given); yields the ``grams`` dict."""
    grams: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            grams[name] = grams.get(name, 0) + x.T @ x
            if counts is not None:
                counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers.items()]
    try:
        yield grams
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def collect_gradient_moments(layers: dict[str, nn.Module], weighted_gram: bool = True, output_moment: bool = True):
    """Within the block, every forward and backward of ``layers[name]`` adds, for its input rows
    ``x_t`` (``[M, K]``) and the gradients ``g_t`` of the loss with respect to its output rows
    (``[M, N]``, scaled by ``M``: per-row loss gradients when the loss is the mean over the
    rows), to ``moments[name]``: ``"gram"`` ``sum x x^T``, ``"weighted_gram"`` ``sum ||g_t||^2
    x_t x_t^T``, ``"output_moment"`` ``sum g g^T`` (all float64; the last two only when asked
    for) and ``"rows"``. Inputs that do not require grad are made to, so every layer's output gets
    a gradient. Yields ``moments``."""
    moments: dict[str, dict] = {}

    def hooks_for(name):
        def pre_hook(module, args):
            if not args[0].requires_grad:
                return (args[0].detach().requires_grad_(),) + tuple(args[1:])
            return None

        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)

            def on_grad(grad):
                g = grad.detach().reshape(-1, grad.shape[-1]).to(torch.float64) * x.shape[0]
                entry = moments.setdefault(name, {"gram": 0, "rows": 0})
                entry["gram"] = entry["gram"] + x.T @ x
                if weighted_gram:
                    entry["weighted_gram"] = entry.get("weighted_gram", 0) + (x * g.square().sum(1, keepdim=True)).T @ x
                if output_moment:
                    entry["output_moment"] = entry.get("output_moment", 0) + g.T @ g
                entry["rows"] += x.shape[0]

            output.register_hook(on_grad)
        return pre_hook, hook

    handles = []
    for name, layer in layers.items():
        pre_hook, hook = hooks_for(name)
        handles += [layer.register_forward_pre_hook(pre_hook), layer.register_forward_hook(hook)]
    try:
        yield moments
    finally:
        for handle in handles:
            handle.remove()


GRADIENT_WEIGHTING = ("none", "penalty", "basis", "both")


class ContinualLoRA:
    """Sequential-task training over the ``LoRALinear4bit`` layers of ``model``.

    Usage::

        cl = ContinualLoRA(model, energy=0.99, r=8)
        for task, data in tasks:
            params = cl.begin_task(task, warm_start=batches)  # new block per layer, constrained,
                                                     # A aimed at this task's free directions
            ... train params with any optimizer ...
            cl.end_task(calibration_batches)         # freeze, grow the protected subspace
        print(cl.report())

    ``model``'s ``LoRALinear4bit`` layers are converted in place (``make_continual``); nothing
    else in the model should train if the guarantee is to hold. ``energy`` (default 0.99) is
    the input-energy fraction of each task to protect; 0 disables the constraint (plain
    stacked blocks), 1.0 protects everything seen. ``exclude_top=True`` applies ``energy`` to the
    variation only (the top input direction, ~the mean activation, is protected outright);
    ``rel_threshold`` also protects every direction above that fraction of the top eigenvalue
    (``subspace.extend_basis``). ``forward(model, batch)`` runs one calibration batch (default
    ``model(batch)``).

    Soft protection of what the basis leaves free (off by default): with ``drift_penalty > 0``
    every ``end_task`` also keeps, per layer, the top ``residual_rank`` directions of the ended
    tasks' input second moment outside the basis, and ``penalty()`` - to be added to the task
    loss - is ``drift_penalty`` times the summed mean squared output change the open blocks
    cause on those inputs (``shrinkage`` blends in an isotropic floor on the free subspace, see
    ``ContinualLoRALinear4bit.drift_penalty``). The exact guarantee still comes from the basis.

    Gradient weighting (off by default; needs ``loss(model, batch)`` -> the batch's mean loss):
    ``end_task`` then runs forward AND backward on each calibration batch and also collects, per
    layer, the loss gradients at the layer's output (``collect_gradient_moments``).
    ``gradient_weighting="penalty"`` weights the penalty's output directions by the ended tasks'
    output-gradient second moment (normalised; the penalty becomes a K-FAC Fisher form of the
    earlier tasks' loss), ``"basis"`` chooses the basis on the gradient-weighted input Gram
    ``sum ||g_t||^2 x_t x_t^T`` (directions whose output the earlier loss notices), ``"both"``
    does both. The stats, and so the drift bound, still measure the plain inputs.
    """

    def __init__(self, model: nn.Module, energy: float = 0.99, r: int = 8, lora_alpha: float = 16,
                 lora_dropout: float = 0.0, use_rslora: bool = False, keep_adapters: bool = False,
                 forward: Callable[[nn.Module, object], object] | None = None, rel_threshold: float = 0.0,
                 exclude_top: bool = False, drift_penalty: float = 0.0, residual_rank: int = 512,
                 shrinkage: float = 0.35, gradient_weighting: str = "none",
                 loss: Callable[[nn.Module, object], torch.Tensor] | None = None, output_shrinkage: float = 0.0):
        if gradient_weighting not in GRADIENT_WEIGHTING:
            raise ValueError(f"gradient_weighting must be one of {GRADIENT_WEIGHTING}, got {gradient_weighting!r}")
        if gradient_weighting != "none" and loss is None:
            raise ValueError(f"gradient_weighting={gradient_weighting!r} needs loss(model, batch)")
        if not 0.0 <= output_shrinkage <= 1.0:
            raise ValueError(f"output_shrinkage must be in [0, 1], got {output_shrinkage}")
        self.gradient_weighting = gradient_weighting
        self.output_shrinkage = output_shrinkage
        self.loss = loss
        if not 0.0 <= energy <= 1.0:
            raise ValueError(f"energy must be in [0, 1], got {energy}")
        if not 0.0 <= rel_threshold <= 1.0:
            raise ValueError(f"rel_threshold must be in [0, 1], got {rel_threshold}")
        if drift_penalty < 0.0 or residual_rank < 0 or shrinkage < 0.0:
            raise ValueError(f"drift_penalty, residual_rank and shrinkage must be >= 0, got {drift_penalty}, "
                             f"{residual_rank}, {shrinkage}")
        self.shrinkage = shrinkage
        self.rel_threshold = rel_threshold
        self.exclude_top = exclude_top
        self.drift_penalty = drift_penalty
        self.residual_rank = residual_rank if drift_penalty > 0 else 0
        self.model = make_continual(model, keep_adapters)
        # the model's mixed-batch routing must see the new layers: they run every block on every row,
        # so adapter_names is refused with a clear error instead of being ignored
        enable_adapter_names(self.model)
        self.energy = energy
        self.defaults = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)
        self.forward = forward or (lambda m, batch: m(batch))
        self.layers = {name: m for name, m in self.model.named_modules() if isinstance(m, ContinualLoRALinear4bit)}
        if not self.layers:
            raise ValueError("model has no LoRALinear4bit layers to protect")

    @property
    def tasks(self) -> list[str]:
        """Task names in training order."""
        return [name for name in next(iter(self.layers.values())).lora_A]

    def begin_task(self, name: str, init: str | bool = True, warm_start: Iterable | None = None,
                   warm_grams: tuple[dict, dict] | None = None, **overrides) -> list[nn.Parameter]:
        """Add block ``name`` to every layer (``overrides``: r, lora_alpha, lora_dropout,
        use_rslora). Warns for full layers. Returns the trainable parameters (the new blocks).

        ``warm_start``: batches of the NEW task (training data). Their inputs at each layer
        point the new block's ``A`` rows at the free directions this task uses most per unit of
        drift penalty (``ContinualLoRALinear4bit.warm_start``); ``B`` stays zero, so the model's
        output is unchanged at step 0. ``warm_grams``: ``input_grams(batches)`` of such batches,
        computed already (one pass serves ``free_energy`` too); give one of the two."""
        if warm_start is not None and warm_grams is not None:
            raise ValueError("give warm_start batches or their warm_grams, not both")
        spec = {**self.defaults, **overrides}
        for layer in self.layers.values():
            layer.begin_task(name, init=init, **spec)
        if warm_start is not None or warm_grams is not None:
            grams, counts = warm_grams if warm_grams is not None else self.input_grams(warm_start)
            for layer_name, layer in self.layers.items():
                if counts.get(layer_name, 0) > 0:
                    layer.warm_start(grams[layer_name] / counts[layer_name], self.shrinkage)
        full = self.full_layers()
        if full:
            warnings.warn(f"task {name!r}: {len(full)} layer(s) are FULL (no free input dimension; their new block "
                          f"cannot change the output): {full}", stacklevel=2)
        return self.trainable_parameters()

    def free_energy(self, batches: Iterable | None = None,
                    grams: tuple[dict, dict] | None = None) -> dict[str, dict[str, float]]:
        """Where a new task can still learn, per layer: with ``C`` the task's input second moment on
        ``batches`` (or on the batches of ``grams = input_grams(batches)``) and ``P = I - U U^T``,
        ``free_energy = tr(P C P) / tr(C)`` and ``free_variation`` the same for ``C`` less its top
        eigen-direction (for uncentered inputs ~ the mean). 1 = all free, 0 = the basis holds all
        of it. Layers that saw no input are left out."""
        if (batches is None) == (grams is None):
            raise ValueError("give batches or their grams (input_grams(batches)), one of the two")
        grams, counts = grams if grams is not None else self.input_grams(batches)
        out = {}
        for name, layer in self.layers.items():
            if counts.get(name, 0) == 0:
                continue
            c = grams[name].to(layer.basis.device)
            values, vectors = torch.linalg.eigh(c)
            variation = c - values[-1] * torch.outer(vectors[:, -1], vectors[:, -1])
            out[name] = {key: layer.free_fraction(m) for key, m in (("free_energy", c), ("free_variation", variation))}
        return out

    def penalty(self) -> torch.Tensor:
        """``drift_penalty * sum_layers ||s B A_eff F||_F^2``: add it to the task loss. Soft
        protection of what the basis left free - the open blocks' mean squared output change
        on the earlier tasks' calibration inputs (``ContinualLoRALinear4bit.drift_penalty``).
        A zero tensor when ``drift_penalty`` is 0 or no task has ended yet."""
        total = sum(layer.drift_penalty(self.shrinkage) for layer in self.layers.values())
        return self.drift_penalty * total

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The open task's ``A`` and ``B`` of every layer."""
        return [p for layer in self.layers.values() for p in layer.parameters() if p.requires_grad]

    @torch.no_grad()
    def end_task(self, calibration_batches: Iterable, energy: float | None = None,
                 rel_threshold: float | None = None, task: str | None = None) -> dict[str, SubspaceStats]:
        """Run ``calibration_batches`` through the model (eval mode), then per layer freeze the
        open block and protect ``energy`` (default ``self.energy``) of its inputs' energy.
        ``task``: with no task open, the kept block (``keep_adapters``) whose task's data these
        are - protects a task trained as a plain adapter before the conversion."""
        energy = self.energy if energy is None else energy
        rel_threshold = self.rel_threshold if rel_threshold is None else rel_threshold
        if self.gradient_weighting == "none":
            grams, counts = self.input_grams(calibration_batches)
            return {name: layer.end_task(grams.get(name), energy, rel_threshold, self.exclude_top,
                                         counts.get(name, 0), self.residual_rank, task)
                    for name, layer in self.layers.items()}
        if self.loss is None:
            raise ValueError(f"gradient_weighting={self.gradient_weighting!r} needs loss(model, batch): set .loss")
        weight_basis = self.gradient_weighting in ("basis", "both")
        weight_penalty = self.gradient_weighting in ("penalty", "both") and self.residual_rank > 0
        moments = self._gradient_moments(calibration_batches, weight_basis, weight_penalty)
        out = {}
        for name, layer in self.layers.items():
            m = moments.get(name)
            out[name] = layer.end_task(
                m["gram"] if m else None, energy, rel_threshold, self.exclude_top, m["rows"] if m else 0,
                self.residual_rank, task, select_gram=m["weighted_gram"] if m and weight_basis else None,
                output_moment=m["output_moment"] if m and weight_penalty else None,
                output_shrinkage=self.output_shrinkage)
        return out

    def _gradient_moments(self, batches: Iterable, weighted_gram: bool, output_moment: bool) -> dict[str, dict]:
        """Per layer, ``collect_gradient_moments`` over ``batches`` (model in eval mode, forward and
        backward of ``self.loss``; no parameter gradient is accumulated)."""
        was_training = self.model.training
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.model.eval()
        for p in trainable:
            p.requires_grad_(False)
        try:
            with torch.enable_grad(), collect_gradient_moments(self.layers, weighted_gram, output_moment) as moments:
                for batch in batches:
                    self.loss(self.model, batch).backward()
        finally:
            for p in trainable:
                p.requires_grad_(True)
            self.model.train(was_training)
        return moments

    @torch.no_grad()
    def input_grams(self, batches: Iterable) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Each layer's float64 ``X^T X`` over ``batches`` (model in eval mode) and its row count."""
        was_training = self.model.training
        self.model.eval()
        counts: dict[str, int] = {}
        try:
            with collect_input_grams(self.layers, counts) as grams:
                for batch in batches:
                    self.forward(self.model, batch)
        finally:
            self.model.train(was_training)
        return grams, counts

    # ---------------------------------------------------------------- reports
    def free_dims(self) -> dict[str, int]:
        """Free input dimension per layer (``K - d``)."""
        return {name: layer.free_dim for name, layer in self.layers.items()}

    def full_layers(self) -> list[str]:
        """Layers with no free input dimension left."""
        return [name for name, free in self.free_dims().items() if free == 0]

    def report(self) -> str:
        """One line per layer: input size, protected and free dimensions, FULL flag."""
        lines = [f"{'layer':40s} {'K':>6s} {'protected':>9s} {'free':>6s}"]
        for name, layer in self.layers.items():
            flag = "  FULL: new tasks cannot change this layer" if layer.free_dim == 0 else ""
            lines.append(f"{name:40s} {layer.in_features:6d} {layer.basis.shape[1]:9d} {layer.free_dim:6d}{flag}")
        return "\n".join(lines)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter blocks, bases and layout of every layer (no base weights): tensors only."""
        return {f"{name}.{key}": value for name, layer in self.layers.items()
                for key, value in layer.state_dict().items() if not key.startswith("base_layer.")}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of ``state_dict``: recreates the blocks and bases, loads their values."""
        for name, layer in self.layers.items():
            own = {key[len(name) + 1:]: value for key, value in state.items() if key.startswith(name + ".")}
            if not own:
                raise KeyError(f"no continual state for layer {name!r}")
            result = layer.load_state_dict(own, strict=False)
            bad = [k for k in result.missing_keys if not k.startswith("base_layer.")] + result.unexpected_keys
            if bad:
                raise KeyError(f"layer {name!r}: mismatched keys {bad}")

    def save(self, path: str) -> None:
        """Write ``state_dict()`` to a safetensors file (``energy`` in its metadata)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, path, metadata={"energy": repr(self.energy), "rel_threshold": repr(self.rel_threshold),
                                           "exclude_top": json.dumps(self.exclude_top), "tasks": json.dumps(self.tasks),
                                           "drift_penalty": repr(self.drift_penalty),
                                           "residual_rank": repr(self.residual_rank),
                                           "shrinkage": repr(self.shrinkage),
                                           "gradient_weighting": self.gradient_weighting,
                                           "output_shrinkage": repr(self.output_shrinkage)})

    def load(self, path: str) -> None:
        """Read a file written by ``save`` into this (same-architecture) model."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        device = next(iter(self.layers.values())).base_layer.nf4.device
        self.load_state_dict(load_file(path, device=str(device)))
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
        self.energy = float(meta["energy"])
        self.rel_threshold = float(meta.get("rel_threshold", 0.0))
        self.exclude_top = bool(json.loads(meta.get("exclude_top", "false")))
        self.drift_penalty = float(meta.get("drift_penalty", 0.0))
        self.residual_rank = int(meta.get("residual_rank", 0))
        self.shrinkage = float(meta.get("shrinkage", 0.0))
        self.gradient_weighting = meta.get("gradient_weighting", "none")
        self.output_shrinkage = float(meta.get("output_shrinkage", 0.0))
