"""The one source of LoRA dropout masks: seeded, regenerated when needed, never stored.

Element ``(m, k)`` of ``x [M, K]`` is kept when the uniform ``u(seed, m * K + k) >= p`` and then scaled by
``1 / (1 - p)`` (both in fp32). Where Triton can run (a CUDA device, or the CPU through the interpreter)
``u`` is Triton's Philox stream ``tl.rand(seed, offset)``, which every kernel applying dropout draws
itself (``kernels.dropout.dropout_scale``): a mask made here equals the one inside the kernels, bit for
bit. Elsewhere (plain CPU) ``u`` comes from torch's CPU generator seeded with ``seed``. The stream is
chosen by the device, never by the backend, so every backend of a process drops the same elements;
the forward and its backward regenerate the same mask from the seed. A mixed batch drops each row at
its own adapter's probability, from the same ``u``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.runtime import can_launch


def uniforms(seed: int, m: int, k: int, device: torch.device) -> Tensor:
    """fp32 ``[m, k]``: the uniform draw of every element (module docstring)."""
    device = torch.device(device)
    if can_launch(device):
        from ..kernels.dropout import launch_uniform

        return launch_uniform(torch.empty(m, k, dtype=torch.float32, device=device), seed)
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(m, k, generator=generator).to(device)


def dropout_mask(seed: int, p, m: int, k: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """The mask ``[m, k]`` (0 where dropped, ``1/(1-p)`` where kept) in ``dtype``. ``p``: one probability in
    ``[0, 1)``, or a float32 tensor ``[m]`` of per-row probabilities (a mixed batch)."""
    u = uniforms(seed, m, k, device)
    p = torch.as_tensor(p, dtype=torch.float32, device=u.device)
    p = p[:, None] if p.dim() == 1 else p
    return torch.where(u >= p, 1.0 / (1.0 - p), torch.zeros((), dtype=torch.float32, device=u.device)).to(dtype)


#: The seed argument without dropout (never read; one shared CPU scalar instead of an allocation per call).
NO_SEED = torch.zeros((), dtype=torch.int64)


def refuse_dropout_in_graph_capture(device: torch.device) -> None:
    """Dropout draws its seed on the host at each call: a captured CUDA graph would replay one mask at
    every step. Refused with a clear error rather than trained with a frozen mask."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("lora-triton: LoRA dropout under CUDA-graph capture would replay the same dropout mask "
                           "at every replay; capture with lora_dropout=0 (or model.eval()), or run dropout eagerly")
