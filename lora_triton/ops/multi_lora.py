"""Mixed-batch LoRA as a ``torch.library`` custom op: each row's LoRA term from its own adapter.

``multi_lora_add(base, x, bank_a, bank_b, scales, ids, dropout, training, backend) -> y`` computes, for
every row ``m`` of the flattened batch,

    y[m] = base[m] + scales[i] * (drop_i(x[m]) @ bank_a[i]^T) @ bank_b[i]^T      with i = ids[m]
    y[m] = base[m]                                                               where ids[m] == -1

Shapes and dtypes: ``base [M, N]`` (the NF4 base product, computed once for the whole batch),
``x [M, K]``, ``bank_a [n, R, K]``, ``bank_b [n, N, R]`` in x's dtype (adapters of rank ``r < R``
zero-padded: the padding adds exact zeros), ``scales`` float32 ``[n]``, ``ids`` int64 ``[M]`` in
``[-1, n)``, ``dropout`` float32 ``[n]`` (each adapter's probability; None: none). ``y`` has base's
dtype; rows with id -1 are bit-equal to ``base``.

The mask is the one of ``ops.dropout`` (each row at its adapter's probability), made from a seed in
the forward and again in the backward, never stored. ``dispatch.choose("mixed", ...)`` picks the
candidate (``candidates.MIXED``). The backward is plain torch on every backend and reads nothing on the
host: per row ``G = s_i * dy @ B_i``, ``dx = (G @ A_i) * mask``, ``dA_i = G^T @ drop(x)``,
``dB_i = s_i * dy^T @ S`` over the rows of adapter ``i`` (zero slices for adapters absent from the
batch), computed for the whole bank at once with one block of columns per adapter
(``candidates.one_adapter_per_row``); ``base`` gets ``dy`` itself. Adapter ids are tensor data: a new
mix of adapters is neither a new compile nor a graph break under ``torch.compile``, which runs the two
custom ops; eager calls take a thin ``autograd.Function`` to the same ``mixed_forward`` / ``mixed_backward``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference import refuse_double_backward
from . import dispatch
from .candidates import Problem, adapter_mask, one_adapter_per_row, scaled_per_adapter
from .dropout import NO_SEED, dropout_mask, refuse_dropout_in_graph_capture
from .validate import check_mixed_operands

BACKENDS = ("triton", "torch")


def _row_mask(x: Tensor, dropout: Optional[Tensor], ids: Tensor, seed: Tensor) -> Optional[Tensor]:
    """The dropout mask ``[M, K]`` in x's dtype (each row at its adapter's probability), or None."""
    if dropout is None:
        return None
    p_rows = torch.cat([dropout.new_zeros(1), dropout])[ids + 1]
    return dropout_mask(int(seed), p_rows, x.shape[0], x.shape[1], x.device, x.dtype)


def mixed_forward(base: Tensor, x: Tensor, bank_a: Tensor, bank_b: Tensor, scales: Tensor, ids: Tensor,
                  dropout: Optional[Tensor], seed: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """``(y [M, N], S [M, R])`` of a mixed batch (module docstring): the chosen ``mixed`` candidate."""
    mask = _row_mask(x, dropout, ids, seed)
    x_lora = x if mask is None else x * mask
    n_adapters, r, k = bank_a.shape
    problem = Problem(x.device, x.shape[0], base.shape[1], k, r, x.dtype, mask is not None, backend=backend)
    candidate, _ = dispatch.choose("mixed", problem)
    y, s = candidate.launch(base, x_lora, bank_a, bank_b, scales, ids)
    return y, s.contiguous()


@torch.library.custom_op("lora_triton::multi_lora", mutates_args=())
def _forward_op(base: Tensor, x: Tensor, bank_a: Tensor, bank_b: Tensor, scales: Tensor, ids: Tensor,
                dropout: Optional[Tensor], seed: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return mixed_forward(base, x, bank_a, bank_b, scales, ids, dropout, seed, backend)


@_forward_op.register_fake
def _(base, x, bank_a, bank_b, scales, ids, dropout, seed, backend):
    return base.new_empty(base.shape), x.new_empty(x.shape[0], bank_a.shape[1])


def mixed_backward(dy: Tensor, x: Tensor, bank_a: Tensor, bank_b: Tensor, scales: Tensor, ids: Tensor,
                   dropout: Optional[Tensor], seed: Tensor, saved_s: Tensor,
                   needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dbank_a, dbank_b)`` of the LoRA term (module docstring), empty where ``needs`` does not ask."""
    need_x, need_a, need_b = needs
    n_adapters, r, k = bank_a.shape
    dy = dy.to(x.dtype)
    dx, da, db = x.new_empty(0), x.new_empty(0), x.new_empty(0)  # three tensors: outputs may not alias
    if need_x or need_a:
        b_cat = bank_b.permute(1, 0, 2).reshape(dy.shape[1], n_adapters * r)
        g_all = (dy @ b_cat).view(-1, n_adapters, r)  # [M, n, R]: dy against every adapter's B
        g = torch.where(adapter_mask(ids, n_adapters)[:, :, None], scaled_per_adapter(g_all, scales),
                        torch.zeros((), dtype=x.dtype, device=x.device))
        g = g.reshape(-1, n_adapters * r)  # row m: s_i * dy[m] @ B_i in its adapter's block, zeros elsewhere
        mask = _row_mask(x, dropout, ids, seed)
        if need_x:
            dx = g @ bank_a.reshape(n_adapters * r, k)
            dx = dx if mask is None else dx * mask
        if need_a:
            da = (g.t() @ (x if mask is None else x * mask)).view(n_adapters, r, k)
    if need_b:
        wide = one_adapter_per_row(saved_s.to(dy.dtype), ids, n_adapters, scales)
        db = (dy.t() @ wide).view(dy.shape[1], n_adapters, r).permute(1, 0, 2).contiguous()
    return dx, da, db


@torch.library.custom_op("lora_triton::multi_lora_backward", mutates_args=())
def _backward_op(dy: Tensor, x: Tensor, bank_a: Tensor, bank_b: Tensor, scales: Tensor, ids: Tensor,
                 dropout: Optional[Tensor], seed: Tensor, saved_s: Tensor,
                 needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    return mixed_backward(dy, x, bank_a, bank_b, scales, ids, dropout, seed, saved_s, needs)


@_backward_op.register_fake
def _(dy, x, bank_a, bank_b, scales, ids, dropout, seed, saved_s, needs):
    return tuple(t.new_empty(t.shape if need else (0,)) for t, need in zip((x, bank_a, bank_b), needs))


_ARGS = {a.name: i for i, a in enumerate(torch.ops.lora_triton.multi_lora.default._schema.arguments)}


def _setup_context(ctx, inputs, output):
    arg = lambda name: inputs[_ARGS[name]]  # noqa: E731
    ctx.save_for_backward(*(arg(name) for name in ("x", "bank_a", "bank_b", "scales", "ids", "dropout", "seed")),
                          output[1])


def _backward(ctx, dy, _ds):
    refuse_double_backward()
    need = lambda name: ctx.needs_input_grad[_ARGS[name]]  # noqa: E731
    needs = [need("x"), need("bank_a"), need("bank_b")]
    grads = dict.fromkeys(_ARGS)
    grads["base"] = dy if need("base") else None
    if any(needs):
        for name, g, wanted in zip(("x", "bank_a", "bank_b"), _backward_op(dy, *ctx.saved_tensors, needs), needs):
            grads[name] = g if wanted else None
    return tuple(grads.values())


torch.library.register_autograd("lora_triton::multi_lora", _backward, setup_context=_setup_context)


class _EagerMixed(torch.autograd.Function):
    """Eager mode's entry to ``mixed_forward`` / ``mixed_backward`` (as ``lora_nf4._EagerLayer``: torch's
    custom-op machinery costs as much host time as the call); under ``torch.compile`` the ops run."""

    @staticmethod
    def forward(ctx, base, x, bank_a, bank_b, scales, ids, dropout, seed, backend):
        y, s = mixed_forward(base, x, bank_a, bank_b, scales, ids, dropout, seed, backend)
        ctx.save_for_backward(x, bank_a, bank_b, scales, ids, dropout, seed, s)
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward()
        needs = list(ctx.needs_input_grad[1:4])  # x, bank_a, bank_b
        grads = mixed_backward(dy, *ctx.saved_tensors, needs) if any(needs) else (None, None, None)
        dx, da, db = (g if wanted else None for g, wanted in zip(grads, needs))
        return dy if ctx.needs_input_grad[0] else None, dx, da, db, None, None, None, None, None


def multi_lora_add(base: Tensor, x: Tensor, bank_a: Tensor, bank_b: Tensor, scales: Tensor, ids: Tensor,
                   dropout: Tensor | None = None, training: bool = False, backend: str = "torch",
                   check_values: bool = True) -> Tensor:
    """``base + each row's own LoRA term`` (module docstring), differentiable in ``base``, ``x`` and both
    banks. ``dropout`` (float32 ``[n]``) applies only when ``training``; ``backend`` is ``"triton"`` or
    ``"torch"`` (resolved by the caller); ``check_values=False`` skips reading the ids and scales (a host
    sync), for callers whose values are valid by construction."""
    check_mixed_operands(base, x, bank_a, bank_b, scales, ids, check_values)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    if dropout is not None:
        if not isinstance(dropout, Tensor) or dropout.dtype != torch.float32 or tuple(dropout.shape) != (
                bank_a.shape[0],) or dropout.device != x.device:
            raise ValueError(f"dropout must be a float32 tensor [{bank_a.shape[0]}] on {x.device} (one probability "
                             f"per adapter), got {dropout!r}")
        if check_values and not torch.compiler.is_compiling() and not bool(((dropout >= 0) & (dropout < 1)).all()):
            raise ValueError(f"dropout probabilities must be in [0, 1), got {dropout.tolist()}")
    if not training:
        dropout = None
    if dropout is not None:
        refuse_dropout_in_graph_capture(x.device)
    seed = torch.randint(0, 2**31 - 1, ()) if dropout is not None else NO_SEED
    x, bank_a, bank_b = x.contiguous(), bank_a.contiguous(), bank_b.contiguous()
    if torch.compiler.is_compiling():
        return _forward_op(base, x, bank_a, bank_b, scales, ids, dropout, seed, backend)[0]
    return _EagerMixed.apply(base, x, bank_a, bank_b, scales, ids, dropout, seed, backend)
