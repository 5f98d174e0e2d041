"""pytest-benchmark view of the CPU layer table: ``pytest lora_triton/bench --benchmark-only``.

Times one training step (forward + backward) and one inference forward of a QLoRA layer on
CPU at small shapes: ours (``LoRALinear4bit``, the plain-torch CPU path), bitsandbytes' CPU
backend + PEFT (when both import) and dequantize + ``F.linear`` + LoRA. pytest-benchmark
groups the three per shape and pass, so its table shows them side by side. Not part of the
default ``pytest`` run (the project's testpaths is ``tests/``); no timing is asserted.
"""

from __future__ import annotations

import pytest
import torch

from lora_triton.bench import contenders as cs

SHAPES = [(1024, 1024, 16, 16), (1024, 1024, 16, 256), (1024, 2816, 16, 128)]  # (K, N, r, M)


def _contender(name: str, k: int, n: int, r: int):
    built, _, _ = cs.build(n, k, r, torch.float32, torch.device("cpu"), backend="torch")
    found = {c.name: c for c in built}
    if name not in found:
        pytest.skip(f"{name} unavailable here (bitsandbytes or peft missing)")
    return found[name]


@pytest.mark.parametrize("impl", cs.NAMES)
@pytest.mark.parametrize("k,n,r,m", SHAPES, ids=[f"K{k}-N{n}-r{r}-M{m}" for k, n, r, m in SHAPES])
def test_forward_backward(benchmark, impl, k, n, r, m):
    c = _contender(impl, k, n, r)
    x = torch.randn(m, k, requires_grad=True)
    dy = torch.randn(m, n)
    benchmark.group = f"fwd+bwd K={k} N={n} r={r} M={m}"

    def step():
        x.grad = c.lora_a.grad = c.lora_b.grad = None
        c.module(x).backward(dy)

    benchmark(step)
    assert x.grad is not None and c.lora_a.grad is not None and c.lora_b.grad is not None


@pytest.mark.parametrize("impl", cs.NAMES)
@pytest.mark.parametrize("k,n,r,m", SHAPES, ids=[f"K{k}-N{n}-r{r}-M{m}" for k, n, r, m in SHAPES])
def test_forward(benchmark, impl, k, n, r, m):
    c = _contender(impl, k, n, r)
    x = torch.randn(m, k)
    benchmark.group = f"fwd K={k} N={n} r={r} M={m}"

    def forward():
        with torch.no_grad():
            return c.module(x)

    y = benchmark(forward)
    assert y.shape == (m, n)
