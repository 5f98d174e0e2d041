"""Layer 2 - the plain-PyTorch reference of the QLoRA layer: the oracle and the CPU path.

Math, for ``x [M, K]``, NF4 ``W [N, K]``, ``A [r, K]``, ``B [N, r]``,
scale ``s`` and optional bias ``b [N]``; ``drop(x) = x * mask`` where ``mask`` already holds
``0`` or ``1 / (1 - p)``:

    forward   S  = drop(x) @ A^T                    [M, r]
              y  = x @ W^T + s * S @ B^T + b        [M, N]
    backward  G  = dy @ B                           [M, r]
              dx = dy @ W + s * (G @ A) * mask      [M, K]
              dA = s * G^T @ drop(x)                [r, K]
              dB = s * dy^T @ S                     [N, r]
              db = dy.sum(0)                        [N]

Everything runs in the dtype of ``x`` (float64 included), with ``W`` dequantized to it.
Written for clarity, not speed; the Triton kernels must agree with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .format import NF4Weight


def dequantized(weight: NF4Weight | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The base weight ``[N, K]`` as a dense ``dtype`` tensor (NF4 is dequantized)."""
    if isinstance(weight, NF4Weight):
        return weight.dequantize(dtype)
    return weight.to(dtype)


def lora_forward(
    x: torch.Tensor,
    weight: NF4Weight | torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the layer.

    Args:
        x: ``[M, K]`` activations (any float dtype; the computation runs in it).
        weight: NF4 weight ``[N, K]`` (or a dense one, for tests).
        lora_a: ``[r, K]``; lora_b: ``[N, r]``; scale: ``s``; bias: ``[N]`` or None.
        dropout_mask: ``[M, K]`` with entries 0 or ``1/(1-p)``, or None for no dropout.
    Returns:
        ``(y [M, N], S [M, r])``, both in ``x.dtype``.
    """
    dtype = x.dtype
    x_drop = x if dropout_mask is None else x * dropout_mask.to(dtype)
    s = x_drop @ lora_a.to(dtype).t()
    y = x @ dequantized(weight, dtype).t() + scale * (s @ lora_b.to(dtype).t())
    if bias is not None:
        y = y + bias.to(dtype)
    return y, s


@dataclass
class LoRAGrads:
    """Gradients of the layer; a field is None when it was not asked for."""

    dx: torch.Tensor | None
    dA: torch.Tensor | None
    dB: torch.Tensor | None
    dbias: torch.Tensor | None


def lora_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: NF4Weight | torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    saved_s: torch.Tensor,
    dropout_mask: torch.Tensor | None = None,
    needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
) -> LoRAGrads:
    """Backward of the layer (explicit formulas, no autograd).

    Args:
        dy: ``[M, N]`` gradient of ``y``; x, weight, lora_a, lora_b, scale, dropout_mask as
            in ``lora_forward``; saved_s: ``S [M, r]`` saved by the forward.
        needs: which of ``(dx, dA, dB, dbias)`` to compute.
    Returns:
        ``LoRAGrads`` in ``x.dtype`` (``dA``/``dB`` in the adapter's shapes).
    """
    dtype = x.dtype
    dy = dy.to(dtype)
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    need_dx, need_da, need_db, need_dbias = needs
    g = dy @ b if (need_dx or need_da) else None
    dx = da = db = dbias = None
    if need_dx:
        lora_dx = scale * (g @ a)
        if dropout_mask is not None:
            lora_dx = lora_dx * dropout_mask.to(dtype)
        dx = dy @ dequantized(weight, dtype) + lora_dx
    if need_da:
        x_drop = x if dropout_mask is None else x * dropout_mask.to(dtype)
        da = scale * (g.t() @ x_drop)
    if need_db:
        db = scale * (dy.t() @ saved_s)
    if need_dbias:
        dbias = dy.sum(0)
    return LoRAGrads(dx, da, db, dbias)


def refuse_double_backward() -> None:
    """Raise when autograd asks a backward of this layer for a graph (``create_graph=True``).

    The backward formulas use ``S`` saved by a forward that kept no graph, so a second
    derivative through them would silently miss every path through ``S`` (and through the
    explicit formulas): refusing is the only answer that is never a wrong number.
    """
    if torch.is_grad_enabled():
        raise RuntimeError("lora-triton's QLoRA layer supports first derivatives only: double backward "
                           "(create_graph=True, gradgradcheck, Hessian-vector products) is not supported")


class LoRAReferenceFunction(torch.autograd.Function):
    """Autograd wrapper around ``lora_forward`` / ``lora_backward``.

    ``apply(x, weight, lora_a, lora_b, scale, bias, dropout_mask)``; ``x`` is ``[M, K]``.
    The base weight never gets a gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scale, bias=None, dropout_mask=None):
        y, saved_s = lora_forward(x, weight, lora_a, lora_b, scale, bias, dropout_mask)
        ctx.weight, ctx.scale = weight, scale
        ctx.save_for_backward(x, lora_a, lora_b, saved_s, dropout_mask)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward()
        x, lora_a, lora_b, saved_s, mask = ctx.saved_tensors
        given = len(ctx.needs_input_grad)  # bias / dropout_mask may have been left to their defaults
        need_x, _, need_a, need_b, _, need_bias, _ = (*ctx.needs_input_grad, False, False)[:7]
        grads = lora_backward(dy, x, ctx.weight, lora_a, lora_b, ctx.scale, saved_s, mask,
                              needs=(need_x, need_a, need_b, need_bias and ctx.bias_dtype is not None))
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        dbias = None if grads.dbias is None else grads.dbias.to(ctx.bias_dtype)
        return (cast(grads.dx, x), None, cast(grads.dA, lora_a), cast(grads.dB, lora_b), None, dbias, None)[:given]


def lora_linear_reference(x, weight, lora_a, lora_b, scale, bias=None, dropout_mask=None) -> torch.Tensor:
    """Differentiable reference layer for inputs ``[..., K]`` -> ``[..., N]``."""
    lead = x.shape[:-1]
    mask = None if dropout_mask is None else dropout_mask.reshape(-1, x.shape[-1])
    y = LoRAReferenceFunction.apply(x.reshape(-1, x.shape[-1]), weight, lora_a, lora_b, scale, bias, mask)
    return y.reshape(*lead, y.shape[-1])
