"""The one source of LoRA dropout masks: seeded, regenerated when needed, never stored.

Element ``(m, k)`` of ``x [M, K]`` is kept when the uniform ``u(seed, m * K + k) >= p`` and then scaled by
``1 / (1 - p)`` (both in fp32). Where Triton can run (a CUDA device, or the CPU through the interpreter)
``u`` is Triton's Philox stream ``tl.rand(seed, offset)``, which every kernel applying dropout draws
itself (``kernels.dropout.dropout_scale``): a mask made here equals the one inside the kernels, bit for
bit. Elsewhere (plain CPU) ``u`` comes from torch's CPU generator seeded with ``seed``. The stream is
chosen by the device, never by the backend, so every backend of a process drops the same elements;
the forward and its backward regenerate the same mask from the seed. A mixed batch drops each row at
its own adapter's probability, from the same ``u``.

A call draws its seed on its device (``new_seed``: ``torch.randint``, so ``torch.manual_seed`` decides
it) and the kernels load it from memory: no host read, and a captured CUDA graph draws a new seed, hence
a new mask, at every replay (torch's CUDA generator advances under graph replay). Only plain torch's
stream, where Triton cannot run, needs the seed on the host: there it is drawn on the CPU, so reading it
waits for no device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..kernels.runtime import can_launch

_CPU = torch.device("cpu")


def new_seed(device: torch.device) -> Tensor:
    """A fresh dropout seed: int32 0-d in ``[0, 2**31 - 1)``, drawn on ``device`` where Triton's kernels load
    it from there; elsewhere on the CPU (torch's stream reads it on the host, and a CPU value is read without
    waiting for any device)."""
    device = device if can_launch(device) else _CPU
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int32, device=device)


def as_seed(seed: int | Tensor, device: torch.device) -> Tensor:
    """``seed`` as the tensor the kernels load: a Python int (tests, benchmarks) is copied to ``device``."""
    return seed if isinstance(seed, Tensor) else torch.tensor(seed, dtype=torch.int32, device=device)



def uniforms(seed: int | Tensor, m: int, k: int, device: torch.device) -> Tensor:
    """fp32 ``[m, k]``: the uniform draw of every element (module docstring); ``seed`` an int or an int32
    0-d tensor."""
    device = torch.device(device)
    if can_launch(device):
        from ..kernels.dropout import launch_uniform

        return launch_uniform(torch.empty(m, k, dtype=torch.float32, device=device), as_seed(seed, device))
    refuse_dropout_in_graph_capture(device)
    generator = torch.Generator().manual_seed(int(seed))  # torch's own stream takes the seed on the host
    return torch.rand(m, k, generator=generator).to(device)


def dropout_mask(seed: int | Tensor, p, m: int, k: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """The mask ``[m, k]`` (0 where dropped, ``1/(1-p)`` where kept) in ``dtype``. ``p``: one probability in
    ``[0, 1)``, or a float32 tensor ``[m]`` of per-row probabilities (a mixed batch)."""
    u = uniforms(seed, m, k, device)
    if isinstance(p, Tensor):
        p = p[:, None] if p.dim() == 1 else p
        return torch.where(u >= p, 1.0 / (1.0 - p), 0.0).to(dtype)
    # A Python probability stays a scalar (a tensor made from it would be a host-to-device copy); the kept
    # scale is computed in fp32, as the tensor path and the kernels compute it.
    kept = float(np.float32(1.0) / (np.float32(1.0) - np.float32(p)))
    return torch.where(u >= p, kept, 0.0).to(dtype)


def refuse_dropout_in_graph_capture(device: torch.device) -> None:
    """Where Triton cannot run on a CUDA device, masks come from torch's generator seeded on the host: a
    captured graph would replay one mask at every step. Refused with a clear error rather than trained with
    a frozen mask (with Triton, the kernels load the seed from the device and capture is fine)."""
    if device.type == "cuda" and not can_launch(device) and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("lora-triton: LoRA dropout under CUDA-graph capture needs Triton (without it the mask "
                           "would be the same at every replay); install triton, capture with lora_dropout=0 (or "
                           "model.eval()), or run dropout eagerly")
