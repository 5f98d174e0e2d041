"""Every way to compute each operation of the layer, registered once: ``FORWARD``, ``DX`` and ``MIXED``.

A ``Candidate`` has a name, a one-line reason it is kept (``why``), ``refuses(problem)`` (None, or why
it cannot run the problem: rank, K, dtype, dropout, device, library, every limit it has) and
``launch(...)``. ``ops.dispatch.choose`` picks one per problem; nothing else branches on a name.

Operations (shapes: ``x [M, K]``, NF4 ``W [N, K]``, ``A [r, K]``, ``B [N, r]``, ``b [N]``):

* ``forward`` ``(y [M, N], S [M, r])``: ``S = drop(x) @ A^T``, ``y = x @ dequant(W)^T + s * S @ B^T + b``;
  ``launch(op, config)`` with ``op`` an ``Operands``.
* ``dx`` ``[M, K]``: ``dy @ dequant(W) + s * (G @ A) * mask`` with ``G = dy @ B``; ``launch(op, dy, g, config)``
  (``g`` None for a candidate that ``needs_g`` not).
* ``mixed`` ``(y [M, N], S [M, R])``: each row's LoRA term from its own adapter of a stacked bank added to
  the base product; ``launch(base, x, bank_a, bank_b, scales, ids)`` (``x`` with dropout applied).

Every candidate computes in the activation dtype with fp32 accumulation (bf16 widened to fp32 under
Triton's interpreter, which mishandles bf16, and rounded back: ``runtime.kernel_dtype``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from ..format import NF4Weight
from ..kernels.runtime import (can_launch, default_table, dot_precision, gpu_limits, interpreting, kernel_dtype,
                               m_bucket, multiprocessors, padded_rank)
from . import configs
from .dense import dequantize_dense
from .dropout import as_seed, dropout_mask
from .validate import KERNEL_DTYPES


# ============================================================================ the problem
@dataclass(frozen=True)
class Problem:
    """What a choice may depend on: the device, ``x [m, k]``, ``W [n, k]``, rank ``r``, the activation
    dtype, whether dropout is on, the NF4 block size, the backend (``"triton"`` or ``"torch"``)."""

    device: torch.device
    m: int
    n: int
    k: int
    r: int
    dtype: torch.dtype = torch.bfloat16
    dropout: bool = False
    blocksize: int = 64
    backend: str = "triton"

    @property
    def gpu(self) -> str | None:
        return gpu_name(self.device) if self.device.type == "cuda" else None

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def gpu_name(device: torch.device) -> str:
    """The dispatch table's key of a CUDA device (asked once per device)."""
    return torch.cuda.get_device_name(device)


def new_output(*shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer a kernel candidate hands a launcher to fill (one place: tests poison it with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class Operands:
    """One layer call's operands, prepared by the op: ``x [M, K]``, adapter and bias in x's dtype, all
    contiguous on x's device; ``dropout_p`` applied with the mask of ``seed`` (``ops.dropout``: an int32 0-d
    tensor, on x's device where Triton runs, on the CPU elsewhere; None without dropout)."""

    x: Tensor
    weight: NF4Weight
    lora_a: Tensor
    lora_b: Tensor
    bias: Tensor | None
    scale: float
    dropout_p: float
    seed: Tensor | None

    @property
    def m(self) -> int:
        return self.x.shape[0]

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    @property
    def k(self) -> int:
        return self.weight.shape[1]

    @property
    def r(self) -> int:
        return self.lora_a.shape[0]

    def mask(self, dtype: torch.dtype | None = None) -> Tensor | None:
        """The dropout mask ``[M, K]`` (None without dropout), drawn once per ``Operands`` (one layer call:
        the backward's dx and dA share it) and per dtype."""
        if self.dropout_p == 0:
            return None
        dtype = dtype or self.x.dtype
        masks = self.__dict__.setdefault("_masks", {})
        if dtype not in masks:
            masks[dtype] = dropout_mask(self.seed, self.dropout_p, self.m, self.k, self.x.device, dtype)
        return masks[dtype]

    def in_kernel_dtype(self) -> "Operands":
        """These operands in the dtype the kernels see (bf16 widened under the interpreter)."""
        kdt = kernel_dtype(self.x.dtype, self.x.device)
        if kdt == self.x.dtype:
            return self
        widen = lambda t: None if t is None else t.to(kdt)  # noqa: E731
        return replace(self, x=widen(self.x), lora_a=widen(self.lora_a), lora_b=widen(self.lora_b),
                       bias=widen(self.bias))


@dataclass(frozen=True)
class Candidate:
    """One way to compute an ``operation`` (module docstring)."""

    name: str
    operation: str
    why: str
    #: why the candidate cannot compute a problem (None when it can): every limit it has
    refuses: Callable[[Problem], str | None]
    launch: Callable
    #: For a candidate that takes a config (a dispatch-table point's or a benchmark's):
    #: ``check_config(config, problem)`` raises ValueError naming a bad field, ``config_fits(config,
    #: problem)`` says whether it can launch on the problem's GPU. None: it takes no config.
    check_config: Callable[[dict, Problem], None] | None = None
    config_fits: Callable[[dict, Problem], bool] | None = None
    needs_g: bool = True  # dx: whether launch reads G = dy @ B

    def supports(self, problem: Problem) -> bool:
        return self.refuses(problem) is None

    @property
    def takes_config(self) -> bool:
        return self.check_config is not None


# ============================================================================ limits
def kernels_refuse(p: Problem) -> str | None:
    """Why the Triton kernels cannot compute ``p`` (None when they can): the limits every kernel shares."""
    if p.backend != "triton":
        return "the torch backend runs plain torch"
    if not can_launch(p.device):
        return f"Triton cannot run on {p.device}"
    if p.dtype not in KERNEL_DTYPES:
        return f"the kernels compute in fp16 / bf16 / fp32, not {p.dtype}"
    if p.k % p.blocksize or p.k % 2:
        return f"the kernels read whole NF4 blocks per row: K={p.k} is not a multiple of the block size {p.blocksize}"
    return None


def _rank_tile(limit: int):
    def refuse(p: Problem) -> str | None:
        return f"its rank tile lives in registers: r <= {limit}, got r={p.r}" if p.r > limit else None
    return refuse


def _first(*checks: Callable[[Problem], str | None]) -> Callable[[Problem], str | None]:
    def refuses(p: Problem) -> str | None:
        for check in checks:
            reason = check(p)
            if reason is not None:
                return reason
        return None
    return refuses


def _no_dropout(p: Problem) -> str | None:
    return "the merged weight computes x @ A^T, not drop(x) @ A^T" if p.dropout else None


def _skinny_m(p: Problem) -> str | None:
    limit = configs.configs().skinny["max_m"]
    if p.m > limit:
        return f"a decode-size kernel: M <= {limit}, got M={p.m}"
    from ..kernels.nf4_skinny import BLOCK_MS, MAX_TILE_OFFSET

    if max(BLOCK_MS) * max(p.n, p.r) > MAX_TILE_OFFSET:
        return f"its output tiles use int32 offsets: N <= {MAX_TILE_OFFSET // max(BLOCK_MS)}, got N={p.n}"
    return None


def _native_refuses(p: Problem) -> str | None:
    from ..kernels import native

    if p.device.type != "cuda":
        return "CUDA only"
    if native.library() is None:
        return "the native library is not built (kernels/README.md)"
    if p.m > native.MAX_M or p.r > native.MAX_RANK:
        return f"M <= {native.MAX_M} and r <= {native.MAX_RANK} only"
    if p.dtype not in native.NATIVE_DTYPES or p.dropout:
        return "bf16 / fp16 without dropout only"
    if p.k % 32:
        return "K must be a multiple of 32"
    return None


def _dx_k(p: Problem) -> str | None:
    from ..kernels.lora_dx import max_k

    limit = max_k(max(t.blocks["BLOCK_N"] for t in (*configs.tuned_tiles("dx"), *configs.configs().dx["fixed"])))
    return f"its weight panels use int32 byte offsets: K <= {limit}" if p.k > limit else None


def _mixed_refuses(p: Problem) -> str | None:
    """The mixed-batch kernels read no NF4 weight: the backend, the device and the dtype are their limits."""
    if p.backend != "triton":
        return "the torch backend runs plain torch"
    if not can_launch(p.device):
        return f"Triton cannot run on {p.device}"
    return f"the kernels compute in fp16 / bf16 / fp32, not {p.dtype}" if p.dtype not in KERNEL_DTYPES else None


def _always(p: Problem) -> None:
    return None


# ============================================================================ forward
def _torch_forward(op: Operands, config=None) -> tuple[Tensor, Tensor]:
    """Plain torch: a transient dense ``W``, then BLAS (``scale == 0``: the base alone, ``S`` zeros)."""
    w = dequantize_dense(op.weight, op.x.dtype)
    y = torch.mm(op.x, w.t()) if op.bias is None else torch.addmm(op.bias, op.x, w.t())
    if op.scale == 0:
        return y, op.x.new_zeros(op.m, op.r)
    mask = op.mask()
    s = (op.x if mask is None else op.x * mask) @ op.lora_a.t()
    return y.addmm_(s, op.lora_b.t(), alpha=op.scale), s


def _words(weight: NF4Weight) -> tuple:
    """The dequant kernels' weight arguments (packed bytes read as int32 words); bytes that do not start
    on a 4-byte boundary (a slice of a larger buffer) are copied once so they can be read as words."""
    from ..kernels.nf4_decode import word_args

    if weight.packed.data_ptr() % 4:
        weight = replace(weight, packed=weight.packed.clone())
    return word_args(weight)


def dequantize_kernel(weight: NF4Weight, dtype: torch.dtype, table: str | None = None) -> Tensor:
    """Dense ``W [N, K]`` in ``dtype`` (fp16 / bf16 / fp32) from the Triton dequant kernel, bit-equal to
    ``NF4Weight.dequantize(dtype)``; ``table``: how it looks up the code (``nf4_decode``; default: the
    device's)."""
    from ..kernels.nf4_dequant import launch_dequant

    out = new_output(weight.shape, dtype=kernel_dtype(dtype, weight.device), device=weight.device)
    out = launch_dequant(_words(weight), out, weight.n_blocks, blocksize=weight.blocksize,
                         double_quant=weight.double_quant, table=table or default_table(weight.device))
    return out.to(dtype)


def s_kernel(op: Operands) -> Tensor:
    """``S = drop(x) @ A^T`` ``[M, r]`` through the S kernel (``op`` in kernel dtype), its tile chosen for the GPU."""
    from ..kernels.lora_s import launch_lora_s

    s = new_output(op.m, op.r, dtype=op.x.dtype, device=op.x.device)
    r_pad, warps = padded_rank(op.r), configs.configs().s_warps

    def launch(tile: tuple[int, int, int]) -> Tensor:
        launch_lora_s(op.x, op.lora_a, s, op.seed, op.dropout_p, r_pad=r_pad, block_m=tile[0], block_k=tile[1],
                      num_stages=tile[2], num_warps=warps)
        return s

    if interpreting():
        return launch(configs.configs().s_interpreter)
    tiles = configs.s_kernel_tiles(op.x.element_size(), r_pad, gpu_limits(op.x.device))
    return configs.first_fitting(("s", op.x.device, op.x.dtype, r_pad, op.dropout_p > 0), tiles, launch)


def _back_to(dtype: torch.dtype, *tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.to(dtype) for t in tensors)


def _dequant_forward(op: Operands, config=None) -> tuple[Tensor, Tensor]:
    """The Triton dequant kernel, then cuBLAS: ``F.linear``, ``S = x @ A^T`` (the S kernel with dropout),
    one ``addmm`` for the LoRA term."""
    k = op.in_kernel_dtype()
    w = dequantize_kernel(op.weight, k.x.dtype)
    s = s_kernel(k) if k.dropout_p > 0 else k.x @ k.lora_a.t()
    y = F.linear(k.x, w, k.bias)
    y.addmm_(s, k.lora_b.t(), alpha=k.scale)
    return _back_to(op.x.dtype, y, s)


def merged_weight(op: Operands) -> Tensor:
    """``W + s * B @ A`` ``[N, K]`` in ``op``'s (kernel) dtype, summed in fp32 and rounded once."""
    from ..kernels.nf4_dequant import launch_dequant_merged

    weight, dtype = op.weight, op.x.dtype
    out = new_output(weight.shape, dtype=dtype, device=weight.device)
    if out.numel() == 0:
        return out
    r_pad, table = padded_rank(op.r), default_table(weight.device)
    block_ks = configs.merged_block_ks(weight.blocksize, out.element_size(), r_pad, gpu_limits(weight.device))
    launch = lambda block_k: launch_dequant_merged(  # noqa: E731
        _words(weight), op.lora_a, op.lora_b, out, op.scale, blocksize=weight.blocksize,
        double_quant=weight.double_quant, table=table, block_k=block_k, r_pad=r_pad)
    return configs.first_fitting(("merged", weight.device, dtype, r_pad, weight.blocksize, weight.double_quant, table),
                                 block_ks, launch)


def _merged_forward(op: Operands, config=None) -> tuple[Tensor, Tensor]:
    """One Triton kernel writes ``W + s * B @ A``, then one cuBLAS ``F.linear`` with the bias; ``S = x @ A^T``."""
    k = op.in_kernel_dtype()
    return _back_to(op.x.dtype, F.linear(k.x, merged_weight(k), k.bias), k.x @ k.lora_a.t())


def _skinny_full_config(config: dict, p: Problem) -> dict:
    """A table or benchmark config over the skinny default for the problem's rank, M and GPU."""
    return {**configs.skinny_default(padded_rank(p.r), p.m, p.elem_bytes, gpu_limits(p.device)), "split_k": 1,
            "table": "shfl", **config}


def _check_skinny_config(config: dict, p: Problem) -> None:
    configs.check_skinny_config(_skinny_full_config(config, p))


def _skinny_config_fits(config: dict, p: Problem) -> bool:
    return configs.skinny_fits(_skinny_full_config(config, p), p.elem_bytes, padded_rank(p.r), gpu_limits(p.device))


def _check_native_config(config: dict, p: Problem) -> None:
    from .native_op import check_config

    check_config(config)


def _skinny_forward(op: Operands, config: dict | None = None) -> tuple[Tensor, Tensor]:
    """The skinny kernel with ``config`` (over the default), or the default configs for this GPU."""
    from ..kernels.nf4_decode import kernel_args
    from ..kernels.nf4_skinny import launch_skinny, split_k_for

    if op.m == 0:
        return op.x.new_empty(0, op.n), op.x.new_empty(0, op.r)
    k = op.in_kernel_dtype()
    limits = gpu_limits(k.x.device)
    elem_bytes, r_pad = k.x.element_size(), padded_rank(k.r)
    if interpreting():
        chain = [configs.configs().skinny["interpreter"]]
    elif config is None:
        chain = configs.skinny_default_configs(r_pad, k.m, elem_bytes, limits)
    else:
        chain = [configs.skinny_default(r_pad, k.m, elem_bytes, limits)]
    chain = [{**c, "table": default_table(k.x.device), "split_k": None, **(config or {})} for c in chain]
    if interpreting() and chain[0]["table"] == "shfl":
        raise ValueError("the 'shfl' code table is inline PTX: it runs on a GPU, not in Triton's interpreter")

    def launch(cfg: dict) -> tuple[Tensor, Tensor]:
        cfg = dict(cfg)
        if cfg["split_k"] is None:
            wanted = configs.configs().skinny["programs_per_sm"] * multiprocessors(k.x.device)
            cfg["split_k"] = split_k_for(_cdiv(k.n, cfg["block_n"]), _cdiv(k.m, cfg["block_m"]),
                                         _cdiv(k.k, cfg["block_k"]), wanted)
        y = new_output(k.m, k.n, dtype=k.x.dtype, device=k.x.device)
        s = s_kernel(k) if cfg["s_first"] else new_output(k.m, k.r, dtype=k.x.dtype, device=k.x.device)
        launch_skinny(k.x, kernel_args(k.weight), k.lora_a, k.lora_b, k.bias, y, s, k.scale, k.dropout_p, k.seed,
                      blocksize=k.weight.blocksize, double_quant=k.weight.double_quant, r_pad=r_pad,
                      dot_precision=dot_precision(k.x.dtype), **cfg)
        return y, s

    key = ("skinny", k.x.device, k.x.dtype, r_pad, k.m > configs.configs().skinny["decode_max_m"], k.n, k.k,
           repr(config), k.weight.blocksize, k.weight.double_quant, k.bias is not None, k.dropout_p > 0)
    return _back_to(op.x.dtype, *configs.first_fitting(key, chain, launch))


def _native_forward(op: Operands, config: dict | None = None) -> tuple[Tensor, Tensor]:
    from .native_op import native_forward

    return native_forward(op.x, op.weight, op.lora_a, op.lora_b, op.scale, op.bias, config)


FORWARD: dict[str, Candidate] = {c.name: c for c in (
    Candidate("torch", "forward", "plain torch: every device, shape, rank and dtype (the oracle's math in BLAS)",
              _always, _torch_forward),
    Candidate("dequant", "forward", "dequantize + cuBLAS: the fastest at every point measured on a GPU so far",
              kernels_refuse, _dequant_forward),
    Candidate("merged", "forward", "large M: the LoRA term rides in the base GEMM (W + s*B@A), no pass over [M, N]",
              _first(kernels_refuse, _no_dropout), _merged_forward),
    Candidate("skinny", "forward", "decode and medium M: swap-AB split-K, each weight byte read once, LoRA fused",
              _first(kernels_refuse, _skinny_m, _rank_tile(128)), _skinny_forward,
              check_config=_check_skinny_config, config_fits=_skinny_config_fits),
    Candidate("native", "forward", "decode-size CUDA C++ kernels (kernels/), the Triton skinny kernel's rival",
              _first(kernels_refuse, _native_refuses), _native_forward, check_config=_check_native_config),
)}


# ============================================================================ dx
def _torch_dx(op: Operands, dy: Tensor, g: Tensor, config=None) -> Tensor:
    dx = dy @ dequantize_dense(op.weight, dy.dtype)
    mask = op.mask()
    return dx.addmm_(g, op.lora_a, alpha=op.scale) if mask is None else dx.addcmul_(g @ op.lora_a, mask, value=op.scale)


def _dequant_dx(op: Operands, dy: Tensor, g: Tensor, config=None) -> Tensor:
    k = op.in_kernel_dtype()
    kdt = k.x.dtype
    dx = dy.to(kdt) @ dequantize_kernel(op.weight, kdt)
    mask = k.mask()
    g, a = g.to(kdt), k.lora_a
    dx = dx.addmm_(g, a, alpha=k.scale) if mask is None else dx.addcmul_(g @ a, mask, value=k.scale)
    return dx.to(op.x.dtype)


def _merged_dx(op: Operands, dy: Tensor, g: Tensor | None, config=None) -> Tensor:
    k = op.in_kernel_dtype()
    return (dy.to(k.x.dtype) @ merged_weight(k)).to(op.x.dtype)


def _fused_dx(op: Operands, dy: Tensor, g: Tensor, config=None) -> Tensor:
    """The fused dx kernel: autotuned over the tiles that fit the GPU, or (``LORA_TRITON_AUTOTUNE=0``, the
    interpreter) a fixed tile."""
    from ..kernels.lora_dx import launch_dx
    from ..kernels.nf4_decode import kernel_args

    k = op.in_kernel_dtype()
    kdt = k.x.dtype
    dy_k, g_k = dy.to(kdt).contiguous(), g.to(kdt).contiguous()
    dx = new_output(k.m, k.k, dtype=kdt, device=dy.device)
    if k.m == 0:
        return dx.to(op.x.dtype)
    r_pad = padded_rank(k.r)
    common = dict(blocksize=k.weight.blocksize, double_quant=k.weight.double_quant, table=default_table(dy.device),
                  r_pad=r_pad, m_bucket=m_bucket(k.m))
    args = (dy_k, g_k, k.lora_a, dx, kernel_args(k.weight), k.scale, k.seed, k.dropout_p)
    limits = gpu_limits(dy.device)
    if interpreting():
        launch_dx(*args, **common, config=configs.interpreter_tile("dx"))
    elif configs.autotuning():
        tiles = configs.offered_tiles("dx", dx.element_size(), r_pad, limits) or configs.tuned_tiles("dx")[-1:]
        launch_dx(*args, **common, autotune=tuple(t.triton() for t in tiles))
    else:
        tiles = configs.fixed_tiles("dx", dx.element_size(), r_pad, limits)
        configs.first_fitting(("dx", dy.device, kdt, r_pad, k.dropout_p > 0, k.weight.blocksize), tiles,
                              lambda t: launch_dx(*args, **common, config=t.triton()))
    return dx.to(op.x.dtype)


DX: dict[str, Candidate] = {c.name: c for c in (
    Candidate("torch", "dx", "plain torch: every device, shape, rank and dtype", _always, _torch_dx),
    Candidate("dequant", "dx", "dequantize + cuBLAS: the fastest dx measured on a GPU so far", kernels_refuse,
              _dequant_dx),
    Candidate("merged", "dx", "large M: dy @ (W + s*B@A) in one cuBLAS product, no G @ A pass over [M, K]",
              _first(kernels_refuse, _no_dropout), _merged_dx, needs_g=False),
    Candidate("fused", "dx", "the NF4 weight decoded in registers, never written: the memory-bound small-M case",
              _first(kernels_refuse, lambda p: _rank_tile(configs.max_rank("dx"))(p), _dx_k), _fused_dx),
)}


# ============================================================================ mixed batches
def adapter_mask(ids: Tensor, n_adapters: int) -> Tensor:
    """bool ``[M, n, 1]``: row ``m`` uses adapter ``i`` (no column for id -1), built on the device, never read."""
    return (ids[:, None] == torch.arange(n_adapters, device=ids.device))[:, :, None]


def scaled_per_adapter(values: Tensor, scales: Tensor) -> Tensor:
    """``values [M, n, R]`` times ``scales [n]`` per adapter, multiplied in (at least) fp32, rounded once."""
    wide = torch.promote_types(values.dtype, torch.float32)
    return (values.to(wide) * scales.to(wide)[None, :, None]).to(values.dtype)


def one_adapter_per_row(values: Tensor, mask: Tensor, scales: Tensor | None = None) -> Tensor:
    """``[M, n * R]`` from ``values [M, n, R]`` (or ``[M, R]``, the same for every adapter) and ``mask =
    adapter_mask(ids, n)``: row ``m``'s values in its adapter's block of ``R`` columns (times that adapter's
    scale when given), exact zeros elsewhere (``torch.where``: an overflow in another block cannot leak in).
    A product with a bank concatenated along R (``[n * R, ...]``) then gives each row its own adapter's
    product: the other blocks add exact zeros."""
    m, n_adapters = mask.shape[:2]
    if values.dim() == 2:
        values = values[:, None, :].expand(m, n_adapters, values.shape[1])
    if scales is not None:
        values = scaled_per_adapter(values, scales)
    return torch.where(mask, values, 0.0).reshape(m, n_adapters * values.shape[2])


def _torch_mixed(base: Tensor, x: Tensor, bank_a: Tensor, bank_b: Tensor, scales: Tensor,
                 ids: Tensor) -> tuple[Tensor, Tensor]:
    """Plain torch without reading the ids: ``x`` against every adapter of the bank at once (``[M, n, R]``),
    each row's own block kept, then one ``addmm`` with the bank's B concatenated along R. It costs ``n``
    times the LoRA FLOPs of one adapter: banks are built of the adapters a batch uses."""
    n_adapters, r, k = bank_a.shape
    mask = adapter_mask(ids, n_adapters)
    s_all = (x @ bank_a.reshape(n_adapters * r, k).t()).view(x.shape[0], n_adapters, r)
    own = torch.where(mask, s_all, 0.0)  # [M, n, R]: zeros outside each row's own block
    wide = one_adapter_per_row(own.to(base.dtype), mask, scales)
    b_cat = bank_b.to(base.dtype).permute(1, 0, 2).reshape(base.shape[1], n_adapters * r)
    return torch.addmm(base, wide, b_cat.t()), own.sum(1)


def _triton_mixed(base: Tensor, x: Tensor, bank_a: Tensor, bank_b: Tensor, scales: Tensor,
                  ids: Tensor) -> tuple[Tensor, Tensor]:
    """The gathered shrink and expand kernels (one program per row) on a copy of the base product."""
    from ..kernels.lora_multi import launch_expand, launch_shrink

    kdt = kernel_dtype(x.dtype, x.device)
    y = base.to(kdt, copy=True)
    s = launch_shrink(x.to(kdt), bank_a.to(kdt), ids, new_output(x.shape[0], bank_a.shape[1], dtype=kdt,
                                                                     device=x.device))
    s = s.to(x.dtype)  # the expand reads S rounded to x's dtype, as the single-adapter path does
    launch_expand(s.to(kdt), bank_b.to(kdt), ids, scales, y)
    return y.to(base.dtype), s


MIXED: dict[str, Candidate] = {c.name: c for c in (
    Candidate("torch", "mixed", "plain torch: every adapter's product, each row's block kept, no host read",
              _always, _torch_mixed),
    Candidate("triton", "mixed", "gathered shrink / expand kernels: each row reads only its own adapter",
              _mixed_refuses, _triton_mixed),
)}

REGISTRIES = {"forward": FORWARD, "dx": DX, "mixed": MIXED}
#: What runs where no measured point applies: the first candidate of each list that supports the problem.
#: Dequantize + cuBLAS is the only one a GPU table has shown winning so far (bench/RESULTS.md).
RULE = {"forward": ("dequant", "torch"), "dx": ("dequant", "torch"), "mixed": ("triton", "torch")}


# ============================================================================ one candidate by name
def _refuse(candidate: Candidate, problem: Problem) -> None:
    reason = candidate.refuses(problem)
    if reason is not None:
        raise ValueError(f"the {candidate.operation} candidate {candidate.name!r} cannot run this problem: {reason}")


def _seed(seed: int | Tensor, dropout_p: float, x: Tensor) -> Tensor | None:
    return as_seed(seed, x.device) if dropout_p > 0 else None


def run_forward(name: str, x: Tensor, weight: NF4Weight, lora_a: Tensor, lora_b: Tensor, scale: float,
                bias: Tensor | None = None, dropout_p: float = 0.0, seed: int | Tensor = 0,
                config: dict | None = None) -> tuple[Tensor, Tensor]:
    """``(y [M, N], S [M, r])`` from the forward candidate ``name`` on the Triton backend (the torch
    candidate runs anywhere): for benchmarks and tests that compare candidates. ``x [M, K]``, adapter and
    bias in x's dtype, contiguous on one device (``validate.check_operands``; ``seed`` an int or an int32
    0-d tensor on x's device); ``ValueError`` when the candidate does not support the problem."""
    from .validate import check_operands

    check_operands(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed)
    candidate = FORWARD[name]
    op = Operands(x, weight, lora_a, lora_b, bias, float(scale), float(dropout_p), _seed(seed, dropout_p, x))
    problem = Problem(x.device, op.m, op.n, op.k, op.r, x.dtype, dropout_p > 0, weight.blocksize)
    if config is not None:
        if not candidate.takes_config:
            raise ValueError(f"candidate {name!r} takes no config, got {config!r}")
        candidate.check_config(config, problem)
    _refuse(candidate, problem)
    return candidate.launch(op, config)


def run_dx(name: str, dy: Tensor, x: Tensor, weight: NF4Weight, lora_a: Tensor, lora_b: Tensor, scale: float,
           dropout_p: float = 0.0, seed: int | Tensor = 0) -> Tensor:
    """``dx [M, K]`` from the dx candidate ``name`` (as ``run_forward``), ``G = dy @ B`` included."""
    from .validate import check_operands, check_tensor

    check_operands(x, weight, lora_a, lora_b, None, scale, dropout_p, seed)
    check_tensor("dy", dy, (x.shape[0], weight.shape[0]), x.device, (x.dtype,))
    candidate = DX[name]
    op = Operands(x, weight, lora_a, lora_b, None, float(scale), float(dropout_p), _seed(seed, dropout_p, x))
    _refuse(candidate, Problem(x.device, op.m, op.n, op.k, op.r, x.dtype, dropout_p > 0, weight.blocksize))
    return candidate.launch(op, dy, dy @ lora_b if candidate.needs_g else None, None)


def run_experimental_fused(x: Tensor, weight: NF4Weight, lora_a: Tensor, lora_b: Tensor, scale: float,
                           bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(y, S)`` of the single-pass fused forward kernel (``kernels.experimental``), for the benchmark:
    no registry holds it until a GPU table shows it winning somewhere. Its tiles are chosen as the fused
    dx kernel's (autotuned over those that fit the GPU, a fixed tile without autotuning)."""
    from ..kernels.experimental.fused import launch_fused
    from ..kernels.nf4_decode import kernel_args
    from .validate import check_operands

    check_operands(x, weight, lora_a, lora_b, bias, scale, 0.0, 0)
    op = Operands(x, weight, lora_a, lora_b, bias, float(scale), 0.0, None)
    problem = Problem(x.device, op.m, op.n, op.k, op.r, x.dtype, False, weight.blocksize)
    reason = kernels_refuse(problem) or _rank_tile(configs.max_rank("fused"))(problem)
    if reason is not None:
        raise ValueError(f"the experimental fused kernel cannot run this problem: {reason}")
    k = op.in_kernel_dtype()
    y = new_output(k.m, k.n, dtype=k.x.dtype, device=x.device)
    s = new_output(k.m, k.r, dtype=k.x.dtype, device=x.device)
    if k.m == 0:
        return _back_to(x.dtype, y, s)
    r_pad, limits = padded_rank(k.r), gpu_limits(x.device)
    args = (k.x, kernel_args(k.weight), k.lora_a, k.lora_b, k.bias, s, y, k.scale, None, 0.0)
    common = dict(blocksize=weight.blocksize, double_quant=weight.double_quant, table=default_table(x.device),
                  r_pad=r_pad, m_bucket=m_bucket(k.m))
    if interpreting():
        launch_fused(*args, **common, config=configs.interpreter_tile("fused"))
    elif configs.autotuning():
        tiles = configs.offered_tiles("fused", y.element_size(), r_pad, limits) or configs.tuned_tiles("fused")[-1:]
        launch_fused(*args, **common, autotune=tuple(t.triton() for t in tiles))
    else:
        configs.first_fitting(("fused", x.device, k.x.dtype, r_pad, weight.blocksize),
                              configs.fixed_tiles("fused", y.element_size(), r_pad, limits),
                              lambda t: launch_fused(*args, **common, config=t.triton()))
    return _back_to(x.dtype, y, s)
