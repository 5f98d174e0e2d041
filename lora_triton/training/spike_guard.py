"""A gradient-spike guard for adapter parameters, usable with any optimizer.

Call it between ``loss.backward()`` and ``optimizer.step()``::

    guard = GradSpikeGuard(trainable_params)
    loss.backward(); guard(); optimizer.step()

Each call computes the global gradient norm ``g`` of the parameters and its z-score against a
running mean and variance of earlier norms, ``z = (g - mean) / max(std, min_std_frac * mean)``.

* ``g`` not finite: all gradients are zeroed (the step is skipped; Adam-style optimizers still
  count it) - nothing a clip could rescue.
* ``z > z_threshold`` after ``warmup`` steps: gradients are scaled down to the bound
  ``mean + z_threshold * std``.
* Every spike is logged (logger ``lora_triton.spike_guard``) and kept in ``events``.

The running statistics are the exponentially weighted mean and variance with weight
``max(1/n, 1 - beta)`` for the n-th norm: exact (Welford) mean and variance for the first
``1 / (1 - beta)`` steps, then an EMA. A clipped norm enters them at its clipped value, so one
spike does not widen the band that should catch the next.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable

import torch

logger = logging.getLogger("lora_triton.spike_guard")


@dataclass
class SpikeEvent:
    """One intervention: ``action`` is ``"clipped"`` or ``"skipped"`` (non-finite gradient)."""

    step: int
    grad_norm: float
    z_score: float
    bound: float
    action: str


class GradSpikeGuard:
    """Detects and clips gradient-norm spikes of ``params`` (see the module docstring).

    Args:
        params: the parameters to guard (their ``.grad`` are modified in place).
        z_threshold: z-score above which a norm is a spike (default 6).
        beta: EMA decay of the running statistics (default 0.98).
        warmup: steps observed before clipping may start (default 10).
        min_std_frac: floor of the std as a fraction of the mean, so a near-constant norm
            history does not flag ordinary noise (default 0.05).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], z_threshold: float = 6.0, beta: float = 0.98,
                 warmup: int = 10, min_std_frac: float = 0.05):
        self.params = [p for p in params if p.requires_grad]
        self.z_threshold, self.beta, self.warmup, self.min_std_frac = z_threshold, beta, warmup, min_std_frac
        self.count = 0
        self.step_index = 0
        self.mean = 0.0
        self.var = 0.0
        self.events: list[SpikeEvent] = []

    def grad_norm(self) -> float:
        """Global L2 norm of the gradients (float64; inf/nan if any element is)."""
        norms = [p.grad.detach().double().norm() for p in self.params if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else 0.0

    def std(self) -> float:
        """The running std, floored at ``min_std_frac * mean``."""
        return max(math.sqrt(self.var), self.min_std_frac * self.mean)

    def bound(self) -> float:
        """The largest norm not treated as a spike: ``mean + z_threshold * std``."""
        return self.mean + self.z_threshold * self.std()

    def __call__(self) -> SpikeEvent | None:
        """Inspect (and if needed fix) the current gradients. Returns the event, or None."""
        self.step_index += 1
        norm = self.grad_norm()
        if not math.isfinite(norm):
            return self._record(SpikeEvent(self.step_index, norm, math.inf, self.bound(), "skipped"), scale=0.0)
        z = (norm - self.mean) / self.std() if self.count else 0.0
        if self.count >= self.warmup and z > self.z_threshold:
            bound = self.bound()
            event = self._record(SpikeEvent(self.step_index, norm, z, bound, "clipped"), scale=bound / norm)
            self._update(bound)
            return event
        self._update(norm)
        return None

    def state_dict(self) -> dict:
        """Running statistics (plain numbers), for checkpoints."""
        return {"count": self.count, "step_index": self.step_index, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.step_index = int(state["count"]), int(state["step_index"])
        self.mean, self.var = float(state["mean"]), float(state["var"])

    def _update(self, norm: float) -> None:
        self.count += 1
        weight = max(1.0 / self.count, 1.0 - self.beta)
        delta = norm - self.mean
        self.mean += weight * delta
        self.var = (1.0 - weight) * (self.var + weight * delta * delta)

    def _record(self, event: SpikeEvent, scale: float) -> SpikeEvent:
        with torch.no_grad():
            for p in self.params:
                if p.grad is not None:
                    p.grad.zero_() if scale == 0.0 else p.grad.mul_(scale)
        self.events.append(event)
        logger.warning("gradient spike at step %d: norm %.3g (z %.1f), %s to %.3g", event.step, event.grad_norm,
                       event.z_score, event.action, event.bound if event.action == "clipped" else 0.0)
        return event
