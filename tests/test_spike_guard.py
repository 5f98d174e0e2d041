"""Gradient-spike guard: a spike batch wrecks unguarded fp16 training, not guarded training;
no false alarms on ordinary steps; non-finite gradients are skipped; running statistics."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

from lora_triton.modules import LoRALinear4bit
from lora_triton.training.spike_guard import GradSpikeGuard

SPIKE_STEP = 30


def train(guarded: bool, spike_scale: float = 100.0, steps: int = 50, dtype=torch.float16):
    """Regression with fp16 activations, SGD + momentum; at SPIKE_STEP one batch arrives with
    inputs ``spike_scale`` times larger (a corrupted batch). Returns (losses, guard)."""
    torch.manual_seed(0)
    layer = LoRALinear4bit.from_linear(nn.Linear(64, 32), r=8)
    teacher = nn.Linear(64, 32)
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    guard = GradSpikeGuard(params)
    losses = []
    for step in range(steps):
        x = torch.randn(32, 64) * (spike_scale if step == SPIKE_STEP else 1.0)
        with torch.no_grad():
            y = teacher(x)
        loss = ((layer(x.to(dtype)).float() - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        if guarded:
            guard()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, guard, params


def test_unguarded_training_blows_up_on_the_spike():
    losses, _, params = train(guarded=False)
    assert all(math.isfinite(v) for v in losses[:SPIKE_STEP + 1])
    assert not math.isfinite(losses[-1])  # inf/NaN: the failure is real, not assumed
    assert not all(bool(torch.isfinite(p).all()) for p in params)


def test_guarded_training_stays_finite_and_keeps_learning(caplog):
    with caplog.at_level("WARNING", logger="lora_triton.spike_guard"):
        losses, guard, params = train(guarded=True)
    assert all(math.isfinite(v) for v in losses) and all(bool(torch.isfinite(p).all()) for p in params)
    assert [(e.step, e.action) for e in guard.events] == [(SPIKE_STEP + 1, "clipped")]
    assert "gradient spike at step 31" in caplog.text
    assert statistics.mean(losses[-5:]) < statistics.mean(losses[SPIKE_STEP - 5:SPIKE_STEP])  # still improving
    # clipping kept the statistics clean: the bound is still near ordinary norms
    assert guard.bound() < 10 * guard.mean


def test_no_false_alarm_without_a_spike():
    _, guard, _ = train(guarded=True, spike_scale=1.0, steps=80)
    assert guard.events == []


def test_non_finite_gradient_is_skipped():
    p = nn.Parameter(torch.ones(4))
    guard = GradSpikeGuard([p], warmup=0)
    p.grad = torch.tensor([1.0, float("inf"), 0.0, 0.0])
    event = guard()
    assert event.action == "skipped" and torch.equal(p.grad, torch.zeros(4))
    assert guard.count == 0  # a skipped step does not enter the statistics


def test_running_statistics_are_welford_then_ema():
    p = nn.Parameter(torch.zeros(1))
    guard = GradSpikeGuard([p], beta=0.9, z_threshold=1e9)
    norms = [1.0, 2.0, 4.0, 3.0, 5.0]
    for v in norms:
        p.grad = torch.tensor([v])
        guard()
    assert guard.mean == pytest.approx(statistics.mean(norms))
    assert guard.var == pytest.approx(statistics.pvariance(norms))
    for v in [10.0] * 200:  # after 1/(1-beta) steps the weight stays 0.1: the EMA forgets the start
        p.grad = torch.tensor([v])
        guard()
    assert guard.mean == pytest.approx(10.0, rel=1e-6) and guard.var < 1e-6
    state = guard.state_dict()
    fresh = GradSpikeGuard([p])
    fresh.load_state_dict(state)
    assert fresh.mean == guard.mean and fresh.count == guard.count
