"""The QLoRA layer as a ``torch.library`` custom op with autograd and fake (meta) kernels.

``lora_nf4_linear(x, weight, lora_a, lora_b, scale, bias, dropout_p, training)`` is what
modules call. It flattens ``x`` to ``[M, K]``, casts the adapter and bias to the activation
dtype (autograd takes care of the casts' gradients), and, under ``torch.compile``, calls two
custom ops:

* ``lora_triton::lora_nf4_forward``  -> ``(y [M, N], S [M, r])``
* ``lora_triton::lora_nf4_backward`` -> ``(dx, dA, dB, dbias)`` (empty tensors where not needed)

Both take the ``NF4Weight`` as its separate tensors, so ``torch.compile(fullgraph=True)``
traces through them without graph breaks. In eager mode a plain ``autograd.Function`` runs the
same two functions (``_forward_impl`` / ``_backward_impl``) without the custom-op dispatch cost.
Saved for backward: ``x``, ``S`` (``saved_s`` in code: ``s`` is the scale in the math), the
dropout seed (a 0-d tensor in the custom op, an int in eager mode; the mask is regenerated from
it) and references to the packed weight.

Backends: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1`` for tests),
``"torch"`` (plain torch: ``reference.py``'s math as fused BLAS calls, ``dense_path.py``; the old
name ``"reference"`` is an alias), ``"auto"`` = Triton on CUDA, torch elsewhere.
``LORA_TRITON_BACKEND`` sets the default. Double backward is refused
(``reference.refuse_double_backward``): ``S`` is saved without a graph, so a second derivative
through it would be silently wrong.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from ..format import NF4Weight
from ..kernels.runtime import can_launch
from ..reference import LoRAGrads, refuse_double_backward
from .cpu_dequant import dequantize_dense
from .dense_path import dense_backward, dense_forward
from .dispatch import Problem, choose, choose_dx

BACKENDS = ("auto", "triton", "torch")
#: Old names still accepted: ``"reference"`` was the plain-torch backend's first name.
BACKEND_ALIASES = {"reference": "torch"}
_WEIGHT_FIELDS = ("packed", "absmax", "code", "nested_absmax", "nested_code", "offset")
_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_backend(requested: str | None) -> None:
    """``ValueError`` unless ``requested`` is None or one of ``BACKENDS`` / ``BACKEND_ALIASES`` (checked when a
    layer is built, so a typo fails there, not at the first forward)."""
    if requested is not None and BACKEND_ALIASES.get(requested, requested) not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} ('reference' = 'torch') or None, got {requested!r}")


def resolve_backend(device: torch.device, requested: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device``.

    ``requested`` (default: env ``LORA_TRITON_BACKEND``, else ``"auto"``) is one of ``BACKENDS``
    (or an alias in ``BACKEND_ALIASES``). Asking for ``"triton"`` where it cannot run raises
    instead of silently falling back.
    """
    requested = requested or os.environ.get("LORA_TRITON_BACKEND", "auto")
    requested = BACKEND_ALIASES.get(requested, requested)
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} ('reference' = 'torch'), got {requested!r}")
    if requested == "auto":
        return "triton" if device.type == "cuda" and can_launch(device) else "torch"
    if requested == "triton" and not can_launch(device):
        raise RuntimeError(f"the Triton backend cannot run on {device}: use a CUDA device, or set "
                           "TRITON_INTERPRET=1 before importing lora_triton (CPU interpreter, for tests)")
    return requested


# ----------------------------------------------------------------------------- weight plumbing
def _weight_tensors(weight: NF4Weight) -> list[Optional[Tensor]]:
    return [getattr(weight, name) for name in _WEIGHT_FIELDS]


def _rebuild_weight(tensors, offset_value: float, n: int, k: int, blocksize: int) -> NF4Weight:
    return NF4Weight.from_validated_fields(**dict(zip(_WEIGHT_FIELDS, tensors)), shape=(n, k), blocksize=blocksize,
                                           dtype=torch.float32, offset_value=offset_value)


def _dropout_mask(backend: str, seed: int, p: float, m: int, k: int, like: Tensor) -> Tensor:
    """The dropout mask ``[m, k]`` (0 or ``1/(1-p)``) of ``backend``, regenerated from ``seed``: Triton's
    seeded generator (``kernels.dropout``, the mask every kernel applies) on the Triton backend, torch's
    CPU generator on the torch backend."""
    if backend == "triton":
        from ..kernels.dropout import dropout_mask

        return dropout_mask(seed, p, m, k, like.device, like.dtype)
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(m, k, generator=gen) >= p
    return (keep.to(torch.float32) / (1.0 - p)).to(device=like.device, dtype=like.dtype)


def kernels_take(weight: NF4Weight, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels compute this layer: fp16 / bf16 / fp32 activations and whole NF4 blocks
    per row of ``W`` (an even ``K``, a multiple of the block size). Other layers run on the Triton
    backend too, through plain torch with the Triton dropout mask: every shape and dtype the torch
    backend takes, the Triton backend takes."""
    k = weight.shape[1]
    return dtype in _KERNEL_DTYPES and k % weight.blocksize == 0 and k % 2 == 0


# ----------------------------------------------------------------------------- the computation
_WARNED_OUT_OF_RESOURCES: set[tuple] = set()


def _fall_back_to_dequant(kernel: str, config, device: torch.device, err: Exception) -> None:
    """Warn, once per (kernel, config, GPU), that a launch did not fit the GPU and the dequant path runs."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    key = (kernel, repr(config), gpu)
    if key not in _WARNED_OUT_OF_RESOURCES:
        _WARNED_OUT_OF_RESOURCES.add(key)
        warnings.warn(f"lora-triton: the {kernel!r} kernel (config {config}) does not fit {gpu}: {err}; running "
                      "dequantize + cuBLAS instead (warned once per kernel, config and GPU)", RuntimeWarning,
                      stacklevel=4)


def _forward_impl(x: Tensor, weight: NF4Weight, lora_a: Tensor, lora_b: Tensor, scale: float, bias: Optional[Tensor],
                  dropout_p: float, seed: int, backend: str) -> tuple[Tensor, Tensor]:
    """``(y [M, N], S [M, r])`` for ``x [M, K]`` on ``backend``; both paths (op and eager) call it. A
    candidate whose launch does not fit the GPU (Triton's ``OutOfResources``, raised before the kernel
    runs) gives way to the dequant path with one warning."""
    if backend == "triton" and kernels_take(weight, x.dtype):
        from ..kernels.lora_forward import lora_forward_triton
        from ..kernels.runtime import out_of_resources

        method, config = choose(Problem(x.device, x.shape[0], weight.shape[0], weight.shape[1], lora_a.shape[0],
                                        x.dtype))
        if method == "native":
            if dropout_p == 0:
                from ..kernels.native_skinny import lora_forward_native

                return lora_forward_native(x, weight, lora_a, lora_b, scale, bias, config)
            method, config = "skinny", None  # the native kernels have no dropout; the Triton one does
        try:
            return lora_forward_triton(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, method, config)
        except out_of_resources() as err:
            if method == "dequant":
                raise
            _fall_back_to_dequant(method, config, x.device, err)
            return lora_forward_triton(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, "dequant", None)
    mask = _dropout_mask(backend, seed, dropout_p, x.shape[0], weight.shape[1], x) if dropout_p > 0 else None
    y, s = dense_forward(x, dequantize_dense(weight, x.dtype), lora_a, lora_b, scale, bias, mask)
    return y, s.contiguous()


def _backward_impl(dy: Tensor, x: Tensor, saved_s: Tensor, weight: NF4Weight, lora_a: Tensor, lora_b: Tensor,
                   scale: float, dropout_p: float, seed: int, backend: str,
                   needs: tuple[bool, bool, bool, bool]) -> LoRAGrads:
    """``LoRAGrads`` of ``(dx, dA, dB, dbias)``, each only where ``needs`` asks."""
    dy = dy.contiguous()  # the expanded (stride-0) gradient of .sum() lands here
    if backend == "triton" and kernels_take(weight, x.dtype):
        from ..kernels.lora_dx import lora_backward_triton
        from ..kernels.runtime import out_of_resources

        dx_method = choose_dx(x.device, x.shape[0], weight.shape[0], weight.shape[1], lora_a.shape[0])
        try:
            return lora_backward_triton(dy, x, weight, lora_a, lora_b, scale, saved_s, dropout_p, seed, needs,
                                        dx_method)
        except out_of_resources() as err:
            if dx_method == "dequant":
                raise
            _fall_back_to_dequant(f"dx:{dx_method}", None, x.device, err)
            return lora_backward_triton(dy, x, weight, lora_a, lora_b, scale, saved_s, dropout_p, seed, needs,
                                        "dequant")
    mask = _dropout_mask(backend, seed, dropout_p, x.shape[0], weight.shape[1], x) if dropout_p > 0 else None
    dense = dequantize_dense(weight, x.dtype) if needs[0] else None  # only dx reads W
    return dense_backward(dy.to(x.dtype), x, dense, lora_a, lora_b, scale, saved_s, mask, needs)


# ----------------------------------------------------------------------------- forward op
@torch.library.custom_op("lora_triton::lora_nf4_forward", mutates_args=())
def _forward_op(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                nested_code: Optional[Tensor], offset: Optional[Tensor], offset_value: float, n: int, k: int,
                blocksize: int, lora_a: Tensor, lora_b: Tensor, scale: float, bias: Optional[Tensor],
                dropout_p: float, seed: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    weight = _rebuild_weight((packed, absmax, code, nested_absmax, nested_code, offset), offset_value, n, k, blocksize)
    return _forward_impl(x, weight, lora_a, lora_b, scale, bias, dropout_p, int(seed), backend)


@_forward_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, offset, offset_value, n, k, blocksize, lora_a, lora_b,
      scale, bias, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], n), x.new_empty(x.shape[0], lora_a.shape[0])


# ----------------------------------------------------------------------------- backward op
@torch.library.custom_op("lora_triton::lora_nf4_backward", mutates_args=())
def _backward_op(dy: Tensor, x: Tensor, saved_s: Tensor, packed: Tensor, absmax: Tensor, code: Tensor,
                 nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], offset: Optional[Tensor],
                 offset_value: float, n: int, k: int, blocksize: int, lora_a: Tensor, lora_b: Tensor, scale: float,
                 dropout_p: float, seed: Tensor, backend: str, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    weight = _rebuild_weight((packed, absmax, code, nested_absmax, nested_code, offset), offset_value, n, k, blocksize)
    grads = _backward_impl(dy, x, saved_s, weight, lora_a, lora_b, scale, dropout_p, int(seed), backend, tuple(needs))
    return tuple(x.new_empty(0) if g is None else g.contiguous() for g in (grads.dx, grads.dA, grads.dB, grads.dbias))


@_backward_op.register_fake
def _(dy, x, saved_s, packed, absmax, code, nested_absmax, nested_code, offset, offset_value, n, k, blocksize, lora_a,
      lora_b, scale, dropout_p, seed, backend, needs):
    shapes = (x.shape, lora_a.shape, lora_b.shape, (n,))
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


# ----------------------------------------------------------------------------- autograd
_FORWARD_ARGS = ("x", "packed", "absmax", "code", "nested_absmax", "nested_code", "offset", "offset_value", "n",
                 "k", "blocksize", "lora_a", "lora_b", "scale", "bias", "dropout_p", "seed", "backend")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FORWARD_ARGS, inputs))
    _, saved_s = output
    ctx.save_for_backward(args["x"], saved_s, args["lora_a"], args["lora_b"], args["seed"], args["packed"],
                          args["absmax"], args["code"], args["nested_absmax"], args["nested_code"], args["offset"])
    ctx.meta = {name: args[name] for name in ("offset_value", "n", "k", "blocksize", "scale", "dropout_p", "backend")}
    ctx.has_bias = args["bias"] is not None


def _backward(ctx, dy, _ds):
    x, saved_s, lora_a, lora_b, seed, *weight_tensors = ctx.saved_tensors
    m = ctx.meta
    # Input order: x, packed, absmax, code, nested_absmax, nested_code, offset, offset_value,
    # n, k, blocksize, lora_a, lora_b, scale, bias, dropout_p, seed, backend.
    need = ctx.needs_input_grad
    needs = [need[0], need[11], need[12], need[14] and ctx.has_bias]
    if not any(needs):
        return (None,) * len(_FORWARD_ARGS)
    dx, da, db, dbias = _backward_op(dy, x, saved_s, *weight_tensors, m["offset_value"], m["n"], m["k"], m["blocksize"],
                                     lora_a, lora_b, m["scale"], m["dropout_p"], seed, m["backend"], needs)
    keep = lambda g, wanted: g if wanted else None  # noqa: E731
    return (keep(dx, needs[0]), None, None, None, None, None, None, None, None, None, None,
            keep(da, needs[1]), keep(db, needs[2]), None, keep(dbias, needs[3]), None, None, None)


torch.library.register_autograd("lora_triton::lora_nf4_forward", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- eager path
class _EagerLoRANF4(torch.autograd.Function):
    """The same computation as the custom ops, for eager mode: ``torch.library``'s dispatch of an
    18-argument op costs ~0.2 ms per call in Python (measured on this CPU), as much as a whole
    small layer. ``torch.compile`` traces the custom ops instead (``lora_nf4_linear`` picks)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, weight, scale, dropout_p, seed, backend):
        y, saved_s = _forward_impl(x, weight, lora_a, lora_b, scale, bias, dropout_p, seed, backend)
        ctx.save_for_backward(x, saved_s, lora_a, lora_b)
        ctx.weight, ctx.args = weight, (scale, dropout_p, seed, backend)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward()
        x, saved_s, lora_a, lora_b = ctx.saved_tensors
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        needs = (need_x, need_a, need_b, need_bias and ctx.has_bias)
        if not any(needs):
            return (None,) * 9
        scale, dropout_p, seed, backend = ctx.args
        g = _backward_impl(dy, x, saved_s, ctx.weight, lora_a, lora_b, scale, dropout_p, seed, backend, needs)
        return g.dx, g.dA, g.dB, g.dbias, None, None, None, None, None


# ----------------------------------------------------------------------------- public entry
def lora_nf4_linear(
    x: Tensor,
    weight: NF4Weight,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str | None = None,
) -> Tensor:
    """``y = x @ dequant(W)^T + scale * (drop(x) @ A^T) @ B^T + bias``, differentiable.

    Args:
        x: ``[..., K]`` fp16 / bf16 / fp32 (under ``torch.autocast`` it is cast to the autocast dtype).
        weight: ``NF4Weight`` ``[N, K]`` (frozen: it never gets a gradient; its quant-state dtype
            may differ from x's).
        lora_a: ``[r, K]``; lora_b: ``[N, r]``; bias: ``[N]`` or None - any float dtype, cast to
            x's dtype for the computation (gradients come back in their own dtype).
        scale: the LoRA scale; dropout_p: LoRA dropout, applied only when ``training``.
        backend: ``"auto"`` / ``"triton"`` / ``"torch"`` (default: env ``LORA_TRITON_BACKEND``).
    Returns:
        ``[..., N]`` in x's (compute) dtype.
    Raises:
        TypeError / ValueError naming the argument for a bad input (shape, dtype, non-finite
        scale, dropout outside [0, 1)). Every backend takes every shape and dtype (``kernels_take``).
    """
    _check_inputs(x, weight, lora_a, lora_b, scale, bias, dropout_p)
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast:
        x = x.to(torch.get_autocast_dtype(x.device.type))
    dtype = x.dtype
    n, k = weight.shape
    p = float(dropout_p) if training else 0.0
    x2d = x.reshape(-1, k).contiguous()
    a, b = lora_a.to(dtype).contiguous(), lora_b.to(dtype).contiguous()
    bias = None if bias is None else bias.to(dtype).contiguous()
    backend = resolve_backend(x.device, backend)
    with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
        if torch.compiler.is_compiling():
            seed = torch.randint(0, 2**31 - 1, ()) if p > 0 else torch.zeros((), dtype=torch.int64)
            y, _ = _forward_op(x2d, *_weight_tensors(weight), weight.offset_value, n, k, weight.blocksize, a, b,
                               float(scale), bias, p, seed, backend)
        else:
            seed = int(torch.randint(0, 2**31 - 1, ())) if p > 0 else 0
            y = _EagerLoRANF4.apply(x2d, a, b, bias, weight, float(scale), p, seed, backend)
    return y.reshape(*x.shape[:-1], n)


def nf4_linear(x: Tensor, weight: NF4Weight, bias: Tensor | None = None, backend: str | None = None) -> Tensor:
    """The base product alone, ``x @ dequant(W)^T + bias`` (``[..., K] -> [..., N]``, x's dtype),
    through the same op and dispatch as ``lora_nf4_linear``: ``W`` is decoded inside the kernel
    or transiently and never saved for backward (``dx`` decodes it again), unlike
    ``F.linear(x, W.dequantize())``, which keeps a dense ``[N, K]`` copy alive until backward.
    The op runs with a rank-1 zero adapter and scale 0, which adds exact zeros."""
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    n, k = weight.shape
    zero_a = x.new_zeros(1, k, dtype=torch.float32)
    zero_b = x.new_zeros(n, 1, dtype=torch.float32)
    return lora_nf4_linear(x, weight, zero_a, zero_b, 0.0, bias, backend=backend)


def _check_inputs(x, weight, lora_a, lora_b, scale, bias, dropout_p) -> None:
    """Raise a clear TypeError/ValueError unless the arguments of ``lora_nf4_linear`` fit together."""
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    n, k = weight.shape
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be a float tensor (float16, bfloat16, float32 or float64), "
                        f"got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must be [..., in_features={k}], got shape {list(x.shape)}")
    for name, t, want in (("lora_a", lora_a, None), ("lora_b", lora_b, None), ("bias", bias, (n,))):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a float torch.Tensor, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
        if want is not None and tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {list(want)}, got {list(t.shape)}")
    for name, t in (("weight", weight.packed), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: the layer's tensors must share one "
                             "device (move the module with .to(device))")
    r = lora_a.shape[0] if lora_a.dim() == 2 else -1
    if lora_a.dim() != 2 or lora_a.shape[1] != k or r < 1 or tuple(lora_b.shape) != (n, r):
        raise ValueError(f"lora_a must be [r, in_features={k}] and lora_b [out_features={n}, r] with r >= 1, got "
                         f"lora_a {list(lora_a.shape)}, lora_b {list(lora_b.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
