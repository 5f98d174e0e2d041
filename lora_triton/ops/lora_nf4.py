"""The QLoRA layer as one ``torch.library`` custom op, its backward as another, and the layer's math.

``lora_nf4_linear(x, weight, lora_a, lora_b, scale, bias, dropout_p, training, backend)`` is what modules
call: ``y = x @ dequant(W)^T + scale * (drop(x) @ A^T) @ B^T + bias``. It validates once
(``validate.check_layer_inputs``), flattens ``x`` to ``[M, K]``, casts the adapter and bias to the
activation dtype (autograd takes the casts' gradients back). Under ``torch.compile`` it calls
``lora_triton::lora_nf4``, whose autograd (registered by argument name) calls
``lora_triton::lora_nf4_backward`` (``fullgraph`` traces them: the ``NF4Weight`` travels as its tensors);
eager calls take a thin ``autograd.Function`` to the same two functions, because torch's custom-op
machinery costs as much host time as a small layer.

The layer's math, written once for every candidate and backend:

    forward   (y, S) = the forward candidate                      S = drop(x) @ A^T      [M, r]
    backward  G  = dy @ B                                                                  [M, r]
              dx = the dx candidate (dy @ dequant(W) + s * (G @ A) * mask)                 [M, K]
              dA = s * G^T @ drop(x),   dB = s * dy^T @ S,   dbias = sum over rows of dy

``dispatch.choose`` picks the candidates (``ops.candidates``). Saved for backward: ``x``, ``S``, the
dropout seed (the mask is regenerated, ``ops.dropout``) and references to the packed weight - never a
dense ``W``. A candidate whose launch does not fit the GPU (Triton's ``OutOfResources``, raised before the
kernel runs) gives way to the rule's with one warning. Double backward is refused
(``reference.refuse_double_backward``): ``S`` is saved without a graph.

Backends: ``"triton"`` (the kernels; CUDA, or CPU under ``TRITON_INTERPRET=1`` for tests),
``"torch"`` (plain torch; ``"reference"`` is an old alias), ``"auto"`` = Triton on CUDA, torch
elsewhere; ``LORA_TRITON_BACKEND`` sets the default. Every backend takes every shape and dtype.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from ..format import NF4Weight
from ..kernels.runtime import can_launch, interpreting, out_of_resources
from ..reference import LoRAGrads, refuse_double_backward
from . import dispatch
from .candidates import Candidate, Operands, Problem
from .dropout import new_seed
from .validate import check_layer_inputs

BACKENDS = ("auto", "triton", "torch")
#: Old names still accepted: ``"reference"`` was the plain-torch backend's first name.
BACKEND_ALIASES = {"reference": "torch"}


def check_backend(requested: str | None) -> None:
    """``ValueError`` unless ``requested`` is None or one of ``BACKENDS`` / ``BACKEND_ALIASES`` (checked when a
    layer is built, so a typo fails there, not at the first forward)."""
    if requested is not None and BACKEND_ALIASES.get(requested, requested) not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} ('reference' = 'torch') or None, got {requested!r}")


def resolve_backend(device: torch.device, requested: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device``.

    ``requested`` (default: env ``LORA_TRITON_BACKEND``, else ``"auto"``) is one of ``BACKENDS`` (or an
    alias). Asking for ``"triton"`` where it cannot run raises instead of silently falling back."""
    key = (device, requested or os.environ.get("LORA_TRITON_BACKEND", "auto"), interpreting())
    # answered once per key in eager calls (a cache wrapper is not traced by torch.compile)
    return _backend_for.__wrapped__(*key) if torch.compiler.is_compiling() else _backend_for(*key)


@functools.lru_cache(maxsize=64)
def _backend_for(device: torch.device, requested: str, interpreting: bool) -> str:
    check_backend(requested)
    requested = BACKEND_ALIASES.get(requested, requested)
    if requested == "auto":
        return "triton" if device.type == "cuda" and can_launch(device) else "torch"
    if requested == "triton" and not can_launch(device):
        raise RuntimeError(f"the Triton backend cannot run on {device}: use a CUDA device, or set "
                           "TRITON_INTERPRET=1 before importing lora_triton (CPU interpreter, for tests)")
    return requested


# ----------------------------------------------------------------------------- the layer's math
def problem_of(op: Operands, backend: str) -> Problem:
    return Problem(op.x.device, op.m, op.n, op.k, op.r, op.x.dtype, op.dropout_p > 0, op.weight.blocksize, backend)


_WARNED: set[tuple] = set()


def _launch(operation: str, problem: Problem, run) -> object:
    """``run(candidate, config)`` with the chosen candidate; if its launch does not fit the GPU, the rule's
    candidate with one warning (per candidate, config and GPU)."""
    candidate, config = dispatch.choose(operation, problem)
    try:
        return run(candidate, config)
    except out_of_resources() as err:
        fallback, _ = dispatch.choose(operation, problem, table={"format": dispatch.TABLE_FORMAT, "gpus": {}})
        if fallback is candidate:
            raise
        key = (operation, candidate.name, repr(config), problem.gpu or str(problem.device))
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"lora-triton: the {operation} candidate {candidate.name!r} (config {config}) does not fit "
                          f"{key[-1]}: {err}; running {fallback.name!r} instead (warned once per candidate, config "
                          "and GPU)", RuntimeWarning, stacklevel=5)
        return run(fallback, None)


def layer_forward(op: Operands, backend: str, problem: Problem | None = None) -> tuple[Tensor, Tensor]:
    """``(y [M, N], S [M, r])`` of the layer (module docstring); ``problem``: ``problem_of(op, backend)``
    when the caller has it."""
    problem = problem or problem_of(op, backend)
    return _launch("forward", problem, lambda c, config: c.launch(op, config))


def layer_backward(op: Operands, dy: Tensor, saved_s: Tensor, backend: str,
                   needs: tuple[bool, bool, bool, bool], problem: Problem | None = None) -> LoRAGrads:
    """``LoRAGrads`` of ``(dx, dA, dB, dbias)``, each only where ``needs`` asks (module docstring);
    ``problem``: the forward's, when the caller kept it."""
    need_dx, need_da, need_db, need_dbias = needs
    dy = dy.to(op.x.dtype).contiguous()  # the expanded (stride-0) gradient of .sum() lands here
    problem = problem or problem_of(op, backend)
    lora = op.scale != 0  # scale 0 (``nf4_linear``: the base alone): the LoRA term and its gradients are 0

    def dx_of(candidate: Candidate, config):
        g_dx = g if g is not None or not candidate.needs_g else dy @ op.lora_b
        return candidate.launch(op, dy, g_dx, config)

    g = dy @ op.lora_b if need_da and lora else None
    dx = _launch("dx", problem, dx_of) if need_dx else None
    da = db = dbias = None
    if need_da:
        mask = op.mask()
        da = torch.mm(g.t(), op.x if mask is None else op.x * mask).mul_(op.scale) if lora else \
            torch.zeros_like(op.lora_a)
    if need_db:
        db = torch.mm(dy.t(), saved_s.to(dy.dtype)).mul_(op.scale)
    if need_dbias:
        dbias = dy.sum(0)
    return LoRAGrads(dx, da, db, dbias)


# ----------------------------------------------------------------------------- the custom ops
def _weight_tensors(weight: NF4Weight) -> list[Optional[Tensor]]:
    return [weight.packed, weight.absmax, weight.code, weight.nested_absmax, weight.nested_code, weight.offset]


def _operands(x, lora_a, lora_b, bias, nf4, nf4_meta, offset, scale, dropout_p, seed) -> Operands:
    packed, absmax, code, nested_absmax, nested_code, offset_t = nf4
    n, k, blocksize = nf4_meta
    weight = NF4Weight.from_validated_fields(packed=packed, absmax=absmax, code=code, nested_absmax=nested_absmax,
                                             nested_code=nested_code, offset=offset_t, shape=(n, k),
                                             blocksize=blocksize, dtype=torch.float32, offset_value=offset)
    return Operands(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed if dropout_p > 0 else None)


@torch.library.custom_op("lora_triton::lora_nf4", mutates_args=())
def _forward_op(x: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Optional[Tensor], nf4: list[Optional[Tensor]],
                nf4_meta: list[int], offset: float, scale: float, dropout_p: float, seed: Optional[Tensor],
                backend: str) -> tuple[Tensor, Tensor]:
    op = _operands(x, lora_a, lora_b, bias, nf4, nf4_meta, offset, scale, dropout_p, seed)
    y, s = layer_forward(op, backend)
    return y, s.contiguous()


@_forward_op.register_fake
def _(x, lora_a, lora_b, bias, nf4, nf4_meta, offset, scale, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], nf4_meta[0]), x.new_empty(x.shape[0], lora_a.shape[0])


@torch.library.custom_op("lora_triton::lora_nf4_backward", mutates_args=())
def _backward_op(dy: Tensor, saved_s: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, nf4: list[Optional[Tensor]],
                 nf4_meta: list[int], offset: float, scale: float, dropout_p: float, seed: Optional[Tensor],
                 backend: str, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    op = _operands(x, lora_a, lora_b, None, nf4, nf4_meta, offset, scale, dropout_p, seed)
    grads = layer_backward(op, dy, saved_s, backend, tuple(needs))
    return tuple(x.new_empty(0) if g is None else g.contiguous() for g in (grads.dx, grads.dA, grads.dB, grads.dbias))


@_backward_op.register_fake
def _(dy, saved_s, x, lora_a, lora_b, nf4, nf4_meta, offset, scale, dropout_p, seed, backend, needs):
    shapes = (x.shape, lora_a.shape, lora_b.shape, (nf4_meta[0],))
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


#: The forward op's arguments by name, from its schema: autograd reads its inputs and their grad
#: flags by name, never by position.
_ARGS = {a.name: i for i, a in enumerate(torch.ops.lora_triton.lora_nf4.default._schema.arguments)}


def _setup_context(ctx, inputs, output):
    arg = lambda name: inputs[_ARGS[name]]  # noqa: E731
    _, saved_s = output
    ctx.save_for_backward(arg("x"), saved_s, arg("lora_a"), arg("lora_b"), arg("seed"), *arg("nf4"))
    ctx.attrs = {name: arg(name) for name in ("nf4_meta", "offset", "scale", "dropout_p", "backend")}
    ctx.has_bias = arg("bias") is not None


def _backward(ctx, dy, _ds):
    refuse_double_backward()
    x, saved_s, lora_a, lora_b, seed, *nf4 = ctx.saved_tensors
    need = lambda name: ctx.needs_input_grad[_ARGS[name]]  # noqa: E731
    needs = [need("x"), need("lora_a"), need("lora_b"), need("bias") and ctx.has_bias]
    grads = dict.fromkeys(_ARGS)
    grads["nf4"] = [None] * len(nf4)  # a list argument takes a list of (no) gradients
    if any(needs):
        a = ctx.attrs
        dx, da, db, dbias = _backward_op(dy, saved_s, x, lora_a, lora_b, nf4, a["nf4_meta"], a["offset"], a["scale"],
                                         a["dropout_p"], seed, a["backend"], needs)
        for name, g, wanted in (("x", dx, needs[0]), ("lora_a", da, needs[1]), ("lora_b", db, needs[2]),
                                ("bias", dbias, needs[3])):
            grads[name] = g if wanted else None
    return tuple(grads.values())


torch.library.register_autograd("lora_triton::lora_nf4", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- eager entry
class _EagerLayer(torch.autograd.Function):
    """Eager mode's entry to the same math (``layer_forward`` / ``layer_backward``, nothing else):
    torch's custom-op machinery (argument defaults, pytree, redispatch, its Python autograd) costs about
    as much host time per call as a whole small layer (the overhead table: 320 us -> 600 us per
    forward+backward of a 64 x 64 layer on one CPU thread). Under ``torch.compile`` the ops run instead.
    The tensors come in as arguments (autograd tracks them); ``op`` and ``problem`` carry the rest as
    two arguments, because every argument costs host time in ``apply``."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, call: "_Call"):
        # x keeps its leading dims: flattening here, not before, keeps two views out of the graph
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        op = Operands(x2d, call.weight, lora_a, lora_b, bias, call.scale, call.dropout_p, call.seed)
        y, saved_s = layer_forward(op, call.problem.backend, call.problem)
        ctx.save_for_backward(x2d, saved_s, lora_a, lora_b)  # saved-tensor hooks (offload, checkpoints) see them
        ctx.call, ctx.x_shape, ctx.has_bias = call, x.shape, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward()
        x, saved_s, lora_a, lora_b = ctx.saved_tensors
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        needs = (need_x, need_a, need_b, need_bias and ctx.has_bias)
        if not any(needs):
            return None, None, None, None, None
        call = ctx.call
        op = Operands(x, call.weight, lora_a, lora_b, None, call.scale, call.dropout_p, call.seed)
        grads = layer_backward(op, dy.reshape(-1, dy.shape[-1]), saved_s, call.problem.backend, needs, call.problem)
        dx = None if grads.dx is None else grads.dx.view(ctx.x_shape)
        return dx, grads.dA, grads.dB, grads.dbias, None


class _Call:
    """What a layer call adds to its tensors: the NF4 weight, scale, dropout, seed and the problem, as one
    ``apply`` argument (a plain class is one pytree leaf; ``apply`` pays for every argument it flattens)."""

    __slots__ = ("weight", "scale", "dropout_p", "seed", "problem")

    def __init__(self, weight: NF4Weight, scale: float, dropout_p: float, seed: Tensor | None, problem: Problem):
        self.weight, self.scale, self.dropout_p, self.seed, self.problem = weight, scale, dropout_p, seed, problem


# ----------------------------------------------------------------------------- public entry
def lora_nf4_linear(x: Tensor, weight: NF4Weight, lora_a: Tensor, lora_b: Tensor, scale: float,
                    bias: Tensor | None = None, dropout_p: float = 0.0, training: bool = False,
                    backend: str | None = None) -> Tensor:
    """``y = x @ dequant(W)^T + scale * (drop(x) @ A^T) @ B^T + bias``, differentiable.

    Args:
        x: ``[..., K]`` fp16 / bf16 / fp32 / fp64 (under ``torch.autocast`` cast to the autocast dtype).
        weight: ``NF4Weight`` ``[N, K]`` (frozen: it never gets a gradient; its quant-state dtype may differ
            from x's).
        lora_a: ``[r, K]``; lora_b: ``[N, r]``; bias: ``[N]`` or None - any float dtype, cast to x's dtype
            for the computation (gradients come back in their own dtype).
        scale: the LoRA scale; dropout_p: LoRA dropout, applied only when ``training``.
        backend: ``"auto"`` / ``"triton"`` / ``"torch"`` (default: env ``LORA_TRITON_BACKEND``).
    Returns:
        ``[..., N]`` in x's (compute) dtype.
    Raises:
        TypeError / ValueError naming the argument for a bad input (``validate.check_layer_inputs``).
    """
    check_layer_inputs(x, weight, lora_a, lora_b, scale, bias, dropout_p)
    device = x.device
    autocast = torch.is_autocast_enabled(device.type)
    if autocast:
        x = x.to(torch.get_autocast_dtype(device.type))
    dtype = x.dtype
    n, k = weight.shape
    p = float(dropout_p) if training else 0.0
    a, b = _as_operand(lora_a, dtype), _as_operand(lora_b, dtype)
    bias = None if bias is None else _as_operand(bias, dtype)
    backend = resolve_backend(device, backend)
    with torch.autocast(device.type, enabled=False) if autocast else contextlib.nullcontext():
        if not torch.compiler.is_compiling():
            seed = new_seed(device) if p > 0 else None
            problem = Problem(device, x.numel() // k, n, k, a.shape[0], dtype, p > 0, weight.blocksize, backend)
            return _EagerLayer.apply(x, a, b, bias, _Call(weight, float(scale), p, seed, problem))
        seed = new_seed(device) if p > 0 else None
        y, _ = _forward_op(x.reshape(-1, k).contiguous(), a, b, bias, _weight_tensors(weight),
                           [n, k, weight.blocksize], weight.offset_value, float(scale), p, seed, backend)
        return y.view(*x.shape[:-1], n)


def _as_operand(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, contiguous (itself when it already is: the common case costs no op)."""
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def nf4_linear(x: Tensor, weight: NF4Weight, bias: Tensor | None = None, backend: str | None = None) -> Tensor:
    """The base product alone, ``x @ dequant(W)^T + bias`` (``[..., K] -> [..., N]``, x's dtype), through the
    same op and dispatch as ``lora_nf4_linear``: ``W`` is decoded inside the kernel or transiently and never
    saved for backward (``dx`` decodes it again), unlike ``F.linear(x, W.dequantize())``, which keeps a
    dense ``[N, K]`` copy alive until backward. The op runs with a rank-1 zero adapter and scale 0, which
    adds exact zeros."""
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    n, k = weight.shape
    zero_a = x.new_zeros(1, k, dtype=torch.float32)
    zero_b = x.new_zeros(n, 1, dtype=torch.float32)
    return lora_nf4_linear(x, weight, zero_a, zero_b, 0.0, bias, backend=backend)
