"""The plain-torch backend's compute: ``reference.py``'s formulas as fused BLAS calls.

Same math as ``reference.lora_forward`` / ``lora_backward`` (the oracle stays written for
clarity), with the LoRA term, the scale and the bias folded into ``addmm`` / ``addmm_`` so no
``[M, N]`` or ``[M, K]`` temporary is made for them. ``w`` is the dense dequantized weight
``[N, K]`` in x's dtype, transient (``cpu_dequant.dequantize_dense``); ``mask`` is the dropout
mask ``[M, K]`` (entries 0 or ``1/(1-p)``) or None.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import LoRAGrads


def dense_forward(x: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float, bias: Tensor | None,
                  mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(y [M, N], S [M, r])``: ``S = drop(x) A^T``, ``y = x W^T + scale S B^T + bias``, all in x's dtype.
    ``scale == 0`` (``ops.nf4_linear``: the base alone) skips the LoRA products (S is zeros)."""
    y = torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
    if scale == 0:
        return y, x.new_zeros(x.shape[0], a.shape[0])
    s = (x if mask is None else x * mask) @ a.t()
    return y.addmm_(s, b.t(), alpha=scale), s


def dense_backward(dy: Tensor, x: Tensor, w: Tensor | None, a: Tensor, b: Tensor, scale: float, saved_s: Tensor,
                   mask: Tensor | None, needs: tuple[bool, bool, bool, bool]) -> LoRAGrads:
    """``(dx [M, K], dA [r, K], dB [N, r], dbias [N])``, each only where ``needs`` asks (``w`` may
    be None unless dx is needed)."""
    need_dx, need_da, need_db, need_dbias = needs
    lora = scale != 0  # scale 0 (``ops.nf4_linear``): the LoRA term and its gradients are zero
    g = dy @ b if (need_dx or need_da) and lora else None  # [M, r]
    dx = da = db = dbias = None
    if need_dx:
        dx = torch.mm(dy, w)
        if lora and mask is None:
            dx.addmm_(g, a, alpha=scale)
        elif lora:
            dx.addcmul_(g @ a, mask, value=scale)
    if need_da:
        da = torch.mm(g.t(), x if mask is None else x * mask).mul_(scale) if lora else torch.zeros_like(a)
    if need_db:
        db = torch.mm(dy.t(), saved_s).mul_(scale)
    if need_dbias:
        dbias = dy.sum(0)
    return LoRAGrads(dx, da, db, dbias)
