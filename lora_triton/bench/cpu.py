"""CPU table: the layer users get on CPU (``LoRALinear4bit`` with the plain-torch reference
backend) against bitsandbytes' CPU backend + PEFT, and dequantize + ``F.linear`` + LoRA, at
shapes a CPU handles; inference forward and forward+backward, ratios from the same run.
Target: ours at least as fast as bitsandbytes + PEFT on CPU.
"""

from __future__ import annotations

import torch

from . import layer

FULL = dict(shapes=[(1024, 1024), (1024, 2816)], ranks=[16], ms=[1, 16, 128, 512],
            dtypes=[torch.float32, torch.bfloat16])
QUICK = dict(shapes=[(256, 512)], ranks=[8], ms=[1, 16], dtypes=[torch.float32])
PASSES = ("fwd", "fwd+bwd")
FIELDS = layer.FIELDS


def run(device: torch.device, meta: dict, quick: bool, budget_s: float) -> list[dict]:
    """All rows of the CPU table (``device`` must be the CPU)."""
    if device.type != "cpu":
        raise ValueError(f"the CPU table runs on the CPU, got {device}")
    return layer.run(device, meta, quick, budget_s, plan=QUICK if quick else FULL,
                     backend="torch", passes=PASSES, table="cpu")


def speedups(rows: list[dict]):
    """Plot points: ours' speed-up over each baseline, forward and forward+backward."""
    return layer.speedups(rows, passes=PASSES)
