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

from ..format import NF4Weight
from ..reference import refuse_double_backward
from . import dispatch
from .candidates import Operands, Problem, adapter_mask, one_adapter_per_row
from .dropout import dropout_mask, new_seed
from .lora_nf4 import layer_backward, layer_forward, nf4_linear, resolve_backend
from .validate import check_base_inputs, check_dropout_probabilities, check_mixed_operands

BACKENDS = ("triton", "torch")


def _row_mask(x: Tensor, dropout: Optional[Tensor], ids: Tensor, seed: Optional[Tensor]) -> Optional[Tensor]:
    """The dropout mask ``[M, K]`` in x's dtype (each row at its adapter's probability), or None."""
    if dropout is None:
        return None
    p_rows = torch.cat([dropout.new_zeros(1), dropout])[ids + 1]
    return dropout_mask(seed, p_rows, x.shape[0], x.shape[1], x.device, x.dtype)


def mixed_forward(base: Tensor, x: Tensor, bank_a: Tensor, bank_b: Tensor, scales: Tensor, ids: Tensor,
                  dropout: Optional[Tensor], seed: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
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
                dropout: Optional[Tensor], seed: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    return mixed_forward(base, x, bank_a, bank_b, scales, ids, dropout, seed, backend)


@_forward_op.register_fake
def _(base, x, bank_a, bank_b, scales, ids, dropout, seed, backend):
    return base.new_empty(base.shape), x.new_empty(x.shape[0], bank_a.shape[1])


def mixed_backward(dy: Tensor, x: Tensor, bank_a: Tensor, bank_b: Tensor, scales: Tensor, ids: Tensor,
                   dropout: Optional[Tensor], seed: Optional[Tensor], saved_s: Tensor,
                   needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dbank_a, dbank_b)`` of the LoRA term (module docstring), empty where ``needs`` does not ask."""
    need_x, need_a, need_b = needs
    n_adapters, r, k = bank_a.shape
    dy = dy.to(x.dtype)
    dx, da, db = x.new_empty(0), x.new_empty(0), x.new_empty(0)  # three tensors: outputs may not alias
    mask = adapter_mask(ids, n_adapters)
    if need_x or need_a:
        b_cat = bank_b.permute(1, 0, 2).reshape(dy.shape[1], n_adapters * r)
        g_all = (dy @ b_cat).view(-1, n_adapters, r)  # [M, n, R]: dy against every adapter's B
        g = one_adapter_per_row(g_all, mask, scales)  # row m: s_i * dy[m] @ B_i in its adapter's block
        drop = _row_mask(x, dropout, ids, seed)
        if need_x:
            dx = g @ bank_a.reshape(n_adapters * r, k)
            dx = dx if drop is None else dx * drop
        if need_a:
            da = (g.t() @ (x if drop is None else x * drop)).view(n_adapters, r, k)
    if need_b:
        wide = one_adapter_per_row(saved_s.to(dy.dtype), mask, scales)
        db = (dy.t() @ wide).view(dy.shape[1], n_adapters, r).permute(1, 0, 2).contiguous()
    return dx, da, db


@torch.library.custom_op("lora_triton::multi_lora_backward", mutates_args=())
def _backward_op(dy: Tensor, x: Tensor, bank_a: Tensor, bank_b: Tensor, scales: Tensor, ids: Tensor,
                 dropout: Optional[Tensor], seed: Optional[Tensor], saved_s: Tensor,
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
        check_dropout_probabilities(dropout, bank_a.shape[0], x.device, check_values)
    if not training:
        dropout = None
    seed = new_seed(x.device) if dropout is not None else None
    x, bank_a, bank_b = x.contiguous(), bank_a.contiguous(), bank_b.contiguous()
    if torch.compiler.is_compiling():
        return _forward_op(base, x, bank_a, bank_b, scales, ids, dropout, seed, backend)[0]
    return _EagerMixed.apply(base, x, bank_a, bank_b, scales, ids, dropout, seed, backend)


# ----------------------------------------------------------------------------- the whole mixed layer
class _BaseCall:
    """The base product's part of a mixed-layer call: the NF4 weight, its zero rank-1 adapter (the forward and
    dx candidates take an adapter; scale 0 adds nothing), the problem, and the dropout seed; one ``apply``
    argument (a plain class is one pytree leaf)."""

    __slots__ = ("weight", "zero_a", "zero_b", "problem", "seed")

    def __init__(self, weight: NF4Weight, zero_a: Tensor, zero_b: Tensor, problem: Problem, seed: Optional[Tensor]):
        self.weight, self.zero_a, self.zero_b, self.problem, self.seed = weight, zero_a, zero_b, problem, seed

    def operands(self, x: Tensor, bias: Optional[Tensor]) -> Operands:
        return Operands(x, self.weight, self.zero_a, self.zero_b, bias, 0.0, 0.0, None)


class _EagerMixedLayer(torch.autograd.Function):
    """Eager mode's entry to a whole mixed layer, base product and per-row LoRA term in one autograd node:
    ``layer_forward`` (scale 0) then ``mixed_forward``; backward ``layer_backward`` for ``dx`` of the base and
    ``dbias``, ``mixed_backward`` for the rest. The same math as ``nf4_linear`` followed by ``multi_lora_add``
    (which ``torch.compile`` runs), with one node, one ``apply`` and no zero-adapter products."""

    @staticmethod
    def forward(ctx, x, bias, bank_a, bank_b, scales, ids, dropout, call: _BaseCall):
        base, _ = layer_forward(call.operands(x, bias), call.problem.backend, call.problem)
        y, s = mixed_forward(base, x, bank_a, bank_b, scales, ids, dropout, call.seed, call.problem.backend)
        ctx.save_for_backward(x, bank_a, bank_b, scales, ids, dropout, s)
        ctx.call, ctx.has_bias = call, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward()
        x, bank_a, bank_b, scales, ids, dropout, s = ctx.saved_tensors
        need_x, need_bias, need_a, need_b = ctx.needs_input_grad[:4]
        need_bias = need_bias and ctx.has_bias
        call = ctx.call
        dx = dbias = da = db = None
        if need_x or need_bias:
            grads = layer_backward(call.operands(x, None), dy, s, call.problem.backend,
                                   (need_x, False, False, need_bias), call.problem)
            dx, dbias = grads.dx, grads.dbias
        if need_x or need_a or need_b:
            lora_dx, da, db = mixed_backward(dy, x, bank_a, bank_b, scales, ids, dropout, call.seed, s,
                                             [need_x, need_a, need_b])
            dx = dx.add_(lora_dx) if need_x else None
        return dx, dbias, da if need_a else None, db if need_b else None, None, None, None, None


def mixed_nf4_linear(x: Tensor, weight: NF4Weight, bias: Tensor | None, bank_a: Tensor, bank_b: Tensor,
                     scales: Tensor, ids: Tensor, dropout: Tensor | None = None, training: bool = False,
                     backend: str | None = None) -> Tensor:
    """``nf4_linear(x, weight, bias)`` plus each row's own LoRA term (``multi_lora_add``), differentiable in
    ``x``, ``bias`` and both banks: the mixed-batch layer. ``x [M, K]`` in the compute dtype (the module
    flattens and casts), ``bias [N]`` or None in any float dtype, the bank operands as ``multi_lora_add``
    takes them, built by the caller (``modules.adapter_bank.stack_adapters``: in range by construction, so
    only the shapes are checked and nothing is read). Eager calls run one autograd node; under
    ``torch.compile`` the two ops run."""
    check_base_inputs(x, weight, bias)
    check_mixed_operands(None, x, bank_a, bank_b, scales, ids, check_values=False, out_features=weight.shape[0])
    backend = resolve_backend(x.device, backend)
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        base = nf4_linear(x, weight, bias, backend)
        return multi_lora_add(base, x, bank_a, bank_b, scales, ids, dropout, training, backend, check_values=False)
    if not training:
        dropout = None
    if dropout is not None:
        check_dropout_probabilities(dropout, bank_a.shape[0], x.device, False)
    n, k = weight.shape
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    seed = new_seed(x.device) if dropout is not None else None
    problem = Problem(x.device, x.shape[0], n, k, 1, x.dtype, False, weight.blocksize, backend)
    call = _BaseCall(weight, x.new_zeros(1, k), x.new_zeros(n, 1), problem, seed)
    return _EagerMixedLayer.apply(x.contiguous(), bias, bank_a.contiguous(), bank_b.contiguous(), scales, ids,
                                  dropout, call)
