"""The one validator: a clear ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, device,
layout or value) naming the argument, before anything runs. Every entry point of the ops layer calls
it; the kernels below only assert.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..format import NF4Weight

#: Activation dtypes the Triton kernels compute in; float64 runs through plain torch on every backend.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LAYER_DTYPES = KERNEL_DTYPES + (torch.float64,)


def check_tensor(name: str, t, shape: tuple[int, ...], device: torch.device,
                 dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> None:
    """Raise unless ``t`` is a tensor of exactly ``shape``, one of ``dtypes``, on ``device``, contiguous and
    without a zero stride (values are not inspected)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.numel() and any(s == 0 for s, d in zip(t.stride(), t.shape) if d > 1):  # empty: nothing is read
        raise ValueError(f"{name} has a zero stride (an expanded tensor, strides {t.stride()}); call .contiguous() "
                         "first")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major), got strides {t.stride()} for shape "
                         f"{list(t.shape)}; call .contiguous() first")


def check_scale(scale) -> None:
    """The LoRA scale: a finite Python number."""
    if isinstance(scale, (bool, Tensor)) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")


def check_dropout(dropout_p) -> None:
    """A dropout probability: a number in ``[0, 1)``."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a number, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def check_seed(seed, device: torch.device) -> None:
    """A dropout seed: a Python int in ``[0, 2**31)``, or an int32 0-d tensor on ``device`` (its value, drawn
    by ``ops.dropout.new_seed``, is not read)."""
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int32 or seed.dim() != 0 or seed.device != device:
            raise ValueError(f"seed must be an int32 0-d tensor on {device}, got {seed.dtype} of shape "
                             f"{list(seed.shape)} on {seed.device}")
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be a Python int or an int32 tensor, got {type(seed).__name__}")
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed!r}")


def check_nf4_weight(weight, device: torch.device | None = None) -> None:
    """An ``NF4Weight`` (on ``device`` when given)."""
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    if device is not None and weight.device != device:
        raise ValueError(f"weight is on {weight.device} but x is on {device}: the layer's tensors must share one "
                         "device (move the module with .to(device))")


def check_adapter(weight: NF4Weight, lora_a, lora_b) -> int:
    """``lora_a [r, K]`` and ``lora_b [N, r]`` float tensors that fit ``weight [N, K]``; returns ``r``."""
    n, k = weight.shape
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a float torch.Tensor, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    r = lora_a.shape[0] if lora_a.dim() == 2 else -1
    if lora_a.dim() != 2 or lora_a.shape[1] != k or r < 1 or tuple(lora_b.shape) != (n, r):
        raise ValueError(f"lora_a must be [r, in_features={k}] and lora_b [out_features={n}, r] with r >= 1, got "
                         f"lora_a {list(lora_a.shape)}, lora_b {list(lora_b.shape)}")
    return r


def check_layer_inputs(x, weight, lora_a, lora_b, scale, bias, dropout_p) -> None:
    """The arguments of ``ops.lora_nf4_linear`` (any leading dims of x, any float dtypes of the adapter
    and bias: the op casts them to x's dtype)."""
    check_base_inputs(x, weight, bias)
    check_adapter(weight, lora_a, lora_b)
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: the layer's tensors must share one "
                             "device (move the module with .to(device))")
    check_scale(scale)
    check_dropout(dropout_p)


def check_base_inputs(x, weight, bias) -> None:
    """``x [..., K]`` (a float tensor), the ``NF4Weight [N, K]`` and ``bias [N]`` or None, on one device."""
    check_nf4_weight(weight)
    n, k = weight.shape
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in LAYER_DTYPES:
        raise TypeError(f"x must be a float tensor (float16, bfloat16, float32 or float64), got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must be [..., in_features={k}], got shape {list(x.shape)}")
    if bias is not None:
        if not isinstance(bias, Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias must be a float torch.Tensor, got "
                            f"{bias.dtype if isinstance(bias, Tensor) else type(bias).__name__}")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape {[n]}, got {list(bias.shape)}")
    for name, t in (("weight", weight.packed), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: the layer's tensors must share one "
                             "device (move the module with .to(device))")


def check_on_device(ok: Tensor, message: str) -> None:
    """``ValueError(message)`` unless the bool tensor ``ok`` holds True, without reading a device value on the
    host: on a GPU ``torch._assert_async`` queues a device-side assert (the error surfaces at the next
    synchronization and ends the CUDA context, as an out-of-range index does in torch's own indexing ops);
    on the CPU it raises at once."""
    try:
        torch._assert_async(ok, message)
    except RuntimeError:
        raise ValueError(message) from None


def check_dropout_probabilities(dropout, n_adapters: int, device: torch.device, check_values: bool) -> None:
    """``dropout``: a float32 tensor ``[n_adapters]`` on ``device`` (with ``check_values``: each in ``[0, 1)``,
    checked on the device)."""
    if not isinstance(dropout, Tensor) or dropout.dtype != torch.float32 or tuple(dropout.shape) != (
            n_adapters,) or dropout.device != device:
        raise ValueError(f"dropout must be a float32 tensor [{n_adapters}] on {device} (one probability "
                         f"per adapter), got {dropout!r}")
    if check_values and not torch.compiler.is_compiling():
        check_on_device(((dropout >= 0) & (dropout < 1)).all(), "dropout probabilities must be in [0, 1)")


def check_operands(x2d, weight, lora_a, lora_b, bias, scale, dropout_p, seed) -> None:
    """Prepared operands of one candidate (``ops.candidates``): ``x [M, K]``, adapter and bias in x's dtype,
    every tensor contiguous on x's device."""
    if not isinstance(x2d, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x2d).__name__}")
    if x2d.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K] (flatten leading dims first), got shape {list(x2d.shape)}")
    check_nf4_weight(weight, x2d.device)
    n, k = weight.shape
    m = x2d.shape[0]
    check_tensor("x", x2d, (m, k), x2d.device, LAYER_DTYPES)
    r = check_adapter(weight, lora_a, lora_b)
    check_tensor("lora_a", lora_a, (r, k), x2d.device, (x2d.dtype,))
    check_tensor("lora_b", lora_b, (n, r), x2d.device, (x2d.dtype,))
    if bias is not None:
        check_tensor("bias", bias, (n,), x2d.device, (x2d.dtype,))
    check_scale(scale)
    check_dropout(dropout_p)
    check_seed(seed, x2d.device)


def check_mixed_operands(base, x, bank_a, bank_b, scales, ids, check_values: bool = True,
                         out_features: int | None = None) -> None:
    """The operands of ``ops.multi_lora_add``: ``base [M, N]`` (None: computed by the caller's op, ``N`` is
    ``out_features``), ``x [M, K]``, ``bank_a [n, R, K]``, ``bank_b [n, N, R]`` (x's float dtype), ``scales``
    float32 ``[n]``, ``ids`` int64 ``[M]`` on one device. With ``check_values`` (eager only, checked on the
    device: ``check_on_device``) the ids must be in ``[-1, n)`` and the scales finite."""
    named = (("base", base), ("x", x), ("bank_a", bank_a), ("bank_b", bank_b), ("scales", scales), ("ids", ids))
    named = tuple((name, t) for name, t in named if t is not None or name != "base")
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or (base is not None and base.dim() != 2) or bank_a.dim() != 3 or bank_b.dim() != 3:
        raise ValueError(f"expected base [M, N], x [M, K], bank_a [n, R, K], bank_b [n, N, R]; got base "
                         f"{None if base is None else list(base.shape)}, x {list(x.shape)}, bank_a "
                         f"{list(bank_a.shape)}, bank_b {list(bank_b.shape)}")
    (m, k), (n_adapters, r, _) = x.shape, bank_a.shape
    n = out_features if base is None else base.shape[1]
    want = {"base": (m, n), "x": (m, k), "bank_a": (n_adapters, r, k), "bank_b": (n_adapters, n, r),
            "scales": (n_adapters,), "ids": (m,)}
    for name, t in named:
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{name} must have shape {list(want[name])}, got {list(t.shape)}")
    if x.dtype not in LAYER_DTYPES or bank_a.dtype != x.dtype or bank_b.dtype != x.dtype:
        raise TypeError(f"x, bank_a and bank_b must share one float dtype, got {x.dtype}, {bank_a.dtype}, "
                        f"{bank_b.dtype}")
    if scales.dtype != torch.float32 or ids.dtype != torch.int64:
        raise TypeError(f"scales must be float32 and ids int64, got {scales.dtype} and {ids.dtype}")
    devices = {t.device for _, t in named}
    if len(devices) != 1:
        raise ValueError(f"all operands must be on one device, got {sorted(map(str, devices))}")
    if check_values and not torch.compiler.is_compiling():
        check_on_device(torch.isfinite(scales).all(), "scales must be finite")
        if m:
            check_on_device(((ids >= -1) & (ids < n_adapters)).all(), f"ids must be in [-1, {n_adapters}) (-1: no "
                            "adapter)")
