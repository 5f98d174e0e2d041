"""Mixed-batch LoRA as a ``torch.library`` custom op: each row's LoRA term from its own adapter.

``multi_lora_add(base, x, bank_a, bank_b, scales, ids, backend) -> y`` computes, for every row
``m`` of the flattened batch,

    y[m] = base[m] + scales[i] * (x[m] @ bank_a[i]^T) @ bank_b[i]^T      with i = ids[m]
    y[m] = base[m]                                                       where ids[m] == -1

Shapes and dtypes: ``base [M, N]`` (the NF4 base product, computed once for the whole batch),
``x [M, K]`` (the LoRA input: dropout already applied), ``bank_a [n, R, K]``, ``bank_b [n, N, R]``
in x's dtype (adapters of rank ``r < R`` zero-padded: the padding adds exact zeros), ``scales``
float32 ``[n]``, ``ids`` int64 ``[M]`` in ``[-1, n)``. ``y`` has base's dtype; rows with id -1
are bit-equal to ``base``.

Backends: ``"triton"`` runs the gathered shrink / expand kernels of ``kernels/lora_multi.py``
right after the base product; ``"torch"`` groups the rows by adapter (one stable sort) and runs
one pair of matmuls per adapter present, the same BLAS calls as the single-adapter path
(``S = x A^T``, ``y = base + s S B^T`` via ``addmm``), so a row's result is what that row alone
with its adapter gives, up to the base's rounding. The backward (both backends) is the grouped
torch form: ``dx``, ``dbank_a``, ``dbank_b`` (zero slices for adapters absent from the batch);
``base`` gets ``dy`` itself. Adapter ids are tensor data: a new mix of adapters is neither a new
compile nor a graph break under ``torch.compile`` (the op is opaque to it; its fake kernel gives
the shapes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.checks import ACTIVATION_DTYPES
from ..reference import refuse_double_backward


def adapter_groups(ids: Tensor, n_adapters: int) -> list[tuple[int, Tensor]]:
    """``[(adapter, row indices)]`` for each adapter present in ``ids`` (``-1`` rows left out),
    in adapter order; the rows of each group in batch order."""
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids + 1, minlength=n_adapters + 1).tolist()
    groups, start = [], counts[0]
    for adapter, count in enumerate(counts[1:]):
        if count:
            groups.append((adapter, order[start:start + count]))
            start += count
    return groups


def _forward_torch(base: Tensor, x: Tensor, bank_a: Tensor, bank_b: Tensor, scales: Tensor, ids: Tensor,
                   keep_s: bool = True, in_place: bool = False) -> tuple[Tensor, Tensor | None]:
    """``(y, S)``; ``S`` (for the backward's ``dB``) only with ``keep_s``; ``in_place``: ``y`` is
    ``base`` itself, updated."""
    groups, scale_of = adapter_groups(ids, bank_a.shape[0]), scales.tolist()
    bank_b = bank_b.to(base.dtype)
    if len(groups) == 1 and groups[0][1].shape[0] == x.shape[0]:  # every row one adapter: no gathers
        adapter = groups[0][0]
        s = x @ bank_a[adapter].t()
        return torch.addmm(base, s.to(base.dtype), bank_b[adapter].t(), alpha=scale_of[adapter]), s
    y = base if in_place else base.clone()
    s = x.new_zeros(x.shape[0], bank_a.shape[1]) if keep_s else None
    for adapter, rows in groups:
        s_rows = x[rows] @ bank_a[adapter].t()
        if keep_s:
            s[rows] = s_rows
        y.index_add_(0, rows, s_rows.to(y.dtype) @ bank_b[adapter].t(), alpha=scale_of[adapter])
    return y, s


def _forward_triton(base: Tensor, x: Tensor, bank_a: Tensor, bank_b: Tensor, scales: Tensor,
                    ids: Tensor, in_place: bool = False) -> tuple[Tensor, Tensor]:
    from ..kernels.lora_multi import multi_lora_add_

    y = base if in_place else base.clone()
    # the values were checked by multi_lora_add (or are in range by construction): no sync here
    s = multi_lora_add_(x, y, bank_a, bank_b, scales, ids, check_values=False)
    return y, s


def _forward(base: Tensor, x: Tensor, bank_a: Tensor, bank_b: Tensor, scales: Tensor, ids: Tensor, backend: str,
             keep_s: bool = True, in_place: bool = False) -> tuple[Tensor, Tensor | None]:
    """``(y, S)`` on ``backend``; every path (custom op, eager autograd, no-grad) calls it."""
    x, bank_a, bank_b = x.contiguous(), bank_a.contiguous(), bank_b.contiguous()
    if backend == "triton":
        return _forward_triton(base, x, bank_a, bank_b, scales, ids, in_place)
    return _forward_torch(base, x, bank_a, bank_b, scales, ids, keep_s, in_place)


@torch.library.custom_op("lora_triton::multi_lora_add", mutates_args=())
def _multi_lora_op(base: Tensor, x: Tensor, bank_a: Tensor, bank_b: Tensor, scales: Tensor, ids: Tensor,
                   backend: str) -> tuple[Tensor, Tensor]:
    return _forward(base, x, bank_a, bank_b, scales, ids, backend)


@_multi_lora_op.register_fake
def _(base, x, bank_a, bank_b, scales, ids, backend):
    return base.new_empty(base.shape), x.new_empty(x.shape[0], bank_a.shape[1])


def _setup_context(ctx, inputs, output):
    _, x, bank_a, bank_b, scales, ids, _ = inputs
    ctx.save_for_backward(x, bank_a, bank_b, scales, ids, output[1])


def _grads(dy, x, bank_a, bank_b, scales, ids, saved_s, needs) -> tuple:
    """Grouped backward: per adapter ``g = s dy B``, ``dx = g A``, ``dA = g^T x``, ``dB = s dy^T S``;
    ``(dbase, dx, dbank_a, dbank_b)``, None where ``needs`` does not ask."""
    need_base, need_x, need_a, need_b = needs
    dx = torch.zeros_like(x) if need_x else None
    da = torch.zeros_like(bank_a) if need_a else None
    db = torch.zeros_like(bank_b) if need_b else None
    if need_x or need_a or need_b:
        dy_x, scale_of = dy.to(x.dtype), scales.tolist()
        for adapter, rows in adapter_groups(ids, bank_a.shape[0]):
            scale, dy_rows = scale_of[adapter], dy_x[rows]
            if need_x or need_a:
                g = (dy_rows @ bank_b[adapter]).mul_(scale)  # [rows, R]
                if need_x:
                    dx[rows] = g @ bank_a[adapter]
                if need_a:
                    da[adapter] = g.t() @ x[rows]
            if need_b:
                db[adapter] = (dy_rows.t() @ saved_s[rows]).mul_(scale)
    return dy if need_base else None, dx, da, db


@torch.library.custom_op("lora_triton::multi_lora_backward", mutates_args=())
def _multi_lora_backward_op(dy: Tensor, x: Tensor, bank_a: Tensor, bank_b: Tensor, scales: Tensor, ids: Tensor,
                            saved_s: Tensor, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dbank_a, dbank_b)`` (empty where ``needs`` does not ask): the grouped backward as an
    op of its own, so that a compiled graph's backward calls it instead of tracing its
    data-dependent grouping."""
    _, *grads = _grads(dy, x, bank_a, bank_b, scales, ids, saved_s, (False, *needs))
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@_multi_lora_backward_op.register_fake
def _(dy, x, bank_a, bank_b, scales, ids, saved_s, needs):
    return tuple(t.new_empty(t.shape if need else (0,)) for t, need in zip((x, bank_a, bank_b), needs))


def _backward(ctx, dy, _ds):
    need_base, *needs = ctx.needs_input_grad[:4]
    grads = _multi_lora_backward_op(dy, *ctx.saved_tensors, needs) if any(needs) else (None,) * 3
    return (dy if need_base else None, *(g if need else None for g, need in zip(grads, needs)), None, None, None)


torch.library.register_autograd("lora_triton::multi_lora_add", _backward, setup_context=_setup_context)


class _EagerMultiLoRA(torch.autograd.Function):
    """The custom op's computation without ``torch.library``'s dispatch cost, for eager mode (as
    ``lora_nf4._EagerLoRANF4``); ``torch.compile`` traces the custom op instead."""

    @staticmethod
    def forward(ctx, base, x, bank_a, bank_b, scales, ids, backend):
        y, saved_s = _forward(base, x, bank_a, bank_b, scales, ids, backend)
        ctx.save_for_backward(x, bank_a, bank_b, scales, ids, saved_s)
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward()
        return (*_grads(dy, *ctx.saved_tensors, ctx.needs_input_grad[:4]), None, None, None)


def check_mixed_operands(base: Tensor, x: Tensor, bank_a: Tensor, bank_b: Tensor, scales: Tensor, ids: Tensor,
                         check_values: bool = True) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming the operand unless the operands of
    ``multi_lora_add`` fit together (module docstring). With ``check_values`` the ids are
    range-checked by value and the scales checked finite, in eager mode only (reading them is a
    device sync, and a graph break under ``torch.compile``)."""
    for name, t in (("base", base), ("x", x), ("bank_a", bank_a), ("bank_b", bank_b), ("scales", scales),
                    ("ids", ids)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or base.dim() != 2 or bank_a.dim() != 3 or bank_b.dim() != 3:
        raise ValueError(f"expected base [M, N], x [M, K], bank_a [n, R, K], bank_b [n, N, R]; got base "
                         f"{list(base.shape)}, x {list(x.shape)}, bank_a {list(bank_a.shape)}, bank_b "
                         f"{list(bank_b.shape)}")
    (m, k), (n_adapters, r, _) = x.shape, bank_a.shape
    n = base.shape[1]
    want = {"base": (m, n), "bank_a": (n_adapters, r, k), "bank_b": (n_adapters, n, r), "scales": (n_adapters,),
            "ids": (m,)}
    for name, t in (("base", base), ("bank_a", bank_a), ("bank_b", bank_b), ("scales", scales), ("ids", ids)):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{name} must have shape {list(want[name])}, got {list(t.shape)}")
    if x.dtype not in ACTIVATION_DTYPES + (torch.float64,) or bank_a.dtype != x.dtype or bank_b.dtype != x.dtype:
        raise TypeError(f"x, bank_a and bank_b must share one float dtype, got {x.dtype}, {bank_a.dtype}, "
                        f"{bank_b.dtype}")
    if scales.dtype != torch.float32 or ids.dtype != torch.int64:
        raise TypeError(f"scales must be float32 and ids int64, got {scales.dtype} and {ids.dtype}")
    devices = {t.device for t in (base, x, bank_a, bank_b, scales, ids)}
    if len(devices) != 1:
        raise ValueError(f"all operands must be on one device, got {sorted(map(str, devices))}")
    if check_values and not torch.compiler.is_compiling() and not bool(torch.isfinite(scales).all()):
        raise ValueError(f"scales must be finite, got {scales.tolist()}")
    if check_values and m and not torch.compiler.is_compiling():
        low, high = int(ids.min()), int(ids.max())
        if low < -1 or high >= n_adapters:
            raise ValueError(f"ids must be in [-1, {n_adapters}) (-1: no adapter), got values in [{low}, {high}]")


def multi_lora_add(base: Tensor, x: Tensor, bank_a: Tensor, bank_b: Tensor, scales: Tensor, ids: Tensor,
                   backend: str = "torch", check_values: bool = True, base_is_scratch: bool = False) -> Tensor:
    """``base + each row's own LoRA term`` (module docstring), differentiable in ``base``, ``x``
    and both banks; ``backend`` is ``"triton"`` or ``"torch"`` (resolved by the caller);
    ``check_values=False`` skips reading the ids and scales (for callers whose values are valid by
    construction);
    ``base_is_scratch``: ``base`` is the caller's own temporary, which, when there is nothing to
    differentiate (eager), is updated in place and returned instead of copied."""
    check_mixed_operands(base, x, bank_a, bank_b, scales, ids, check_values)
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    if torch.compiler.is_compiling():
        return _multi_lora_op(base, x, bank_a, bank_b, scales, ids, backend)[0]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (base, x, bank_a, bank_b))):
        # nothing to differentiate: no autograd node, no S kept
        return _forward(base, x, bank_a, bank_b, scales, ids, backend, keep_s=False, in_place=base_is_scratch)[0]
    return _EagerMultiLoRA.apply(base, x, bank_a, bank_b, scales, ids, backend)
