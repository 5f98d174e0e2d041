"""Fused input gradient of the QLoRA layer, and the whole backward for the ops layer.

For ``dy [M, N]``, NF4 ``W [N, K]``, ``A [r, K]`` and ``G = dy @ B [M, r]``:

    dx = dy @ dequant(W) + s * (G @ A) * mask                                  [M, K]

``_lora_dx_kernel`` computes one ``[BLOCK_M, BLOCK_K]`` tile of ``dx`` per program: it reduces
over ``N`` with ``[BLOCK_N, BLOCK_K]`` tiles of ``W`` decoded from the packed bytes in
registers (the dequantized weight never reaches memory), then adds the LoRA term from ``G``
and ``A`` in the same fp32 accumulator, with the dropout mask regenerated from the forward's
seed. ``G`` is an input because the caller needs it for ``dA`` as well.

``lora_backward_triton`` assembles every gradient of the layer: ``G`` once, ``dx`` through the
fused kernel, through dequantize + cuBLAS, or (``merged``, without dropout) as one cuBLAS product
with ``W + s * B @ A`` (``nf4_dequant.dequantize_nf4_merged``: no ``G @ A`` pass over ``[M, K]``);
``ops.dispatch`` decides, from a measured table. ``dA``, ``dB`` and the bias gradient come from
torch matmuls/reductions (cuBLAS on a GPU), each only when asked for.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..format import NF4Weight
from ..reference import LoRAGrads
from .checks import check_nf4_weight, check_tensor, nf4_kernel_args
from .dropout import dropout_mask, dropout_scale
from .nf4_decode import code_table, in_bounds, load_nf4_tile
from .nf4_dequant import dequantize_nf4, dequantize_nf4_merged
from .runtime import (GpuLimits, can_launch, default_table, gpu_limits, interpreting, kernel_dtype,
                      launch_first_fitting, m_bucket, on_device, pipelined_smem)

#: Largest adapter rank the fused kernel takes (``G`` and ``A`` tiles are padded to a power of 2).
MAX_RANK = 128
#: How ``dx`` can be computed: the fused kernel, dequantize + cuBLAS, or one cuBLAS product with the
#: merged weight ``W + s * B @ A`` (dequantize + cuBLAS where there is dropout); ``ops.dispatch`` chooses.
DX_METHODS = ("fused", "dequant", "merged")


@triton.jit
def _lora_dx_kernel(
    dy_ptr, g_ptr, a_ptr, dx_ptr,
    packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
    scale, seed, dropout_p,
    M, N, K, R, M_BUCKET,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, TABLE: tl.constexpr,
    R_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_M: tl.constexpr = False, EVEN_N: tl.constexpr = False, EVEN_K: tl.constexpr = False,
):
    """One ``[BLOCK_M, BLOCK_K]`` tile of ``dx``, reducing over ``N`` in ``BLOCK_N`` steps, each weight
    ``code * absmax`` exactly (``load_nf4_tile``). ``EVEN_M`` / ``EVEN_N`` / ``EVEN_K``: M, N, K are
    multiples of their tile, so the loop and the store test no bounds."""
    # Grouped ordering: GROUP_M row tiles sweep the K tiles together, so the W column panel a
    # group reads stays in L2 (Triton's matmul tutorial).
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_k = tl.cdiv(K, BLOCK_K)
    group_size = GROUP_M * tiles_k
    first_m = (pid // group_size) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_k = (pid % group_size) // group_m

    k0 = pid_k * BLOCK_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)
    in_m = in_bounds(offs_m, M, EVEN_M)
    in_k = in_bounds(offs_k, K, EVEN_K)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    table = code_table(code_ptr, TABLE)
    dy_base = dy_ptr + rows[:, None] * N
    local_n = tl.arange(0, BLOCK_N)  # rows of W from n0 on: their addresses are computed once, outside the loop
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + local_n
        dy_ptrs = dy_base + offs_n[None, :]
        if EVEN_M and EVEN_N:
            dy = tl.load(dy_ptrs)
        else:
            dy = tl.load(dy_ptrs, mask=in_m[:, None] & in_bounds(offs_n, N, EVEN_N)[None, :], other=0.0)
        w = load_nf4_tile(packed_ptr, table, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, local_n, k0, N, K,
                          BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, TABLE, EVEN_N, EVEN_K, SHIFT_NESTED_INDEX=True,
                          row0=n0, LOCAL_ROWS=True)
        # "ieee" keeps fp32 activations out of TF32 (its 1e-3 error would break fp32's bound);
        # fp16/bf16 operands are unaffected.
        acc = tl.dot(dy, w.to(dy.dtype), acc, input_precision="ieee")

    offs_r = tl.arange(0, R_PAD)
    in_r = offs_r < R
    g = tl.load(g_ptr + rows[:, None] * R + offs_r[None, :], mask=in_m[:, None] & in_r[None, :], other=0.0)
    a = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :], mask=in_r[:, None] & in_k[None, :], other=0.0)
    lora = tl.dot(g, a, input_precision="ieee") * scale
    if HAS_DROPOUT:
        lora = lora * dropout_scale(seed, offs_m, offs_k, K, dropout_p)
    acc += lora

    dx_ptrs = dx_ptr + rows[:, None] * K + offs_k[None, :]
    if EVEN_M and EVEN_K:
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty))
    else:
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=in_m[:, None] & in_k[None, :])


def _config(block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


def gpu_configs() -> list[triton.Config]:
    """Autotuning candidates: large tiles for training-sized M, thin ones for small M.

    ``tl.dot`` needs every tile dimension >= 16 on a GPU; BLOCK_N is the reduction depth.
    The autotuner times those that fit the GPU of the launch (``offered_configs``).
    """
    return [
        _config(128, 32, 128, 8, 3),
        _config(128, 64, 128, 8, 2),
        _config(128, 32, 64, 4, 4),
        _config(64, 32, 128, 4, 4),
        _config(64, 64, 64, 4, 4),
        _config(64, 32, 64, 4, 5),
        _config(32, 64, 64, 4, 4),
        _config(32, 32, 128, 4, 4),
        _config(16, 128, 128, 4, 2),  # the fewest instructions per weight element, within budget (static report, v6)
        _config(16, 128, 64, 4, 2),
        _config(16, 64, 64, 4, 4),
    ]


#: The single configuration used under the interpreter (autotuning cannot benchmark there):
#: 16-row tiles keep small M cheap. Tests override it to cover other tilings (partial K tiles,
#: several groups), which a GPU's autotuned configs produce.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}


def _tile_cap(extent: int) -> int:
    """Largest useful tile along a dimension of ``extent``: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(extent))


def dx_smem(config: dict, stages: int, elem_bytes: int, r_pad: int) -> int:
    """Upper bound of the dx kernel's shared memory for ``config`` (its ``BLOCK_*``), the larger of its two
    phases: the N loop (per stage the ``[BLOCK_M, BLOCK_N]`` tile of dy and the packed weight tile with its
    scales, 3/4 byte per element at block size 32; once, the decoded tile as a dot operand) and the
    LoRA epilogue (the ``[BLOCK_M, r_pad]`` tile of G and the ``[r_pad, BLOCK_K]`` tile of A)."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    loop = pipelined_smem(stages, bm * bn * elem_bytes + bn * bk * 3 // 4, bn * bk * elem_bytes)
    return max(loop, (bm + bk) * r_pad * elem_bytes)


def offered_configs(elem_bytes: int, r_pad: int, limits: GpuLimits | None) -> list[triton.Config]:
    """The configs of ``gpu_configs()`` that fit a GPU with ``limits`` (all of them for None)."""
    return [c for c in gpu_configs() if limits is None or limits.fits(
        dx_smem(c.kwargs, c.num_stages, elem_bytes, r_pad), None, c.num_warps)]


#: The config a GPU runs without autotuning (``LORA_TRITON_AUTOTUNE=0``): the first of these that fits.
FIXED_GPU_PREFERENCE = (triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4,
                                      num_stages=4),
                        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4,
                                      num_stages=2),
                        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4,
                                      num_stages=1))


def fixed_gpu_configs(elem_bytes: int, r_pad: int, limits: GpuLimits | None) -> tuple[triton.Config, ...]:
    """The configs the dx kernel tries, in order, without autotuning on a GPU with ``limits``:
    ``FIXED_GPU_PREFERENCE`` from the first whose shared-memory bound fits."""
    for i, config in enumerate(FIXED_GPU_PREFERENCE):
        if limits is None or limits.fits(dx_smem(config.kwargs, config.num_stages, elem_bytes, r_pad), None,
                                         config.num_warps):
            return FIXED_GPU_PREFERENCE[i:]
    return FIXED_GPU_PREFERENCE[-1:]


def fixed_gpu_config(elem_bytes: int, r_pad: int, limits: GpuLimits | None) -> triton.Config:
    """The config the dx kernel launches first without autotuning on a GPU with ``limits``."""
    return fixed_gpu_configs(elem_bytes, r_pad, limits)[0]


#: The kernel addresses the packed bytes of a ``[BLOCK_N, K]`` row panel of ``W`` with int32 offsets
#: from its first row (``load_nf4_tile(..., LOCAL_ROWS=True)``): a panel holds at most 2**31 bytes
#: (offsets 0 .. 2**31 - 1), so ``K <= MAX_FUSED_K``.
_MAX_BLOCK_N = max([c.kwargs["BLOCK_N"] for c in (*gpu_configs(), *FIXED_GPU_PREFERENCE)] + [INTERPRETER_CONFIG["BLOCK_N"]])
MAX_FUSED_K = 2 * 2**31 // _MAX_BLOCK_N


def autotuning() -> bool:
    """False under the interpreter, or on a GPU when ``LORA_TRITON_AUTOTUNE=0`` (a GPU test run, which
    would otherwise compile every config for every constexpr combination it covers); read at launch."""
    return not interpreting() and os.environ.get("LORA_TRITON_AUTOTUNE", "1") != "0"


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs that do not fit the GPU of the launch (``offered_configs``; the smallest stays
    when none does) and configs with tiles larger than the problem needs (they only waste lanes).

    Rules apply in order of what they save (rows of M first: a 128-row tile at M = 1 wastes
    127 rows of every MMA), each only if it leaves a config, so some config always remains.
    """
    m, n, k = named_args["M"], named_args["N"], named_args["K"]
    dy = named_args.get("dy_ptr")
    limits = gpu_limits(dy.device) if dy is not None else None
    r_pad, elem_bytes = kwargs.get("R_PAD", named_args.get("R_PAD", 16)), dy.element_size() if dy is not None else 2
    smem = lambda c: dx_smem(c.kwargs, c.num_stages, elem_bytes, r_pad)  # noqa: E731
    fitting = [c for c in configs if limits is None or limits.fits(smem(c), None, c.num_warps)]
    configs = fitting or [min(configs, key=smem)]
    rules = [lambda c: c.kwargs["BLOCK_M"] <= _tile_cap(m),
             lambda c: c.kwargs["BLOCK_K"] <= _tile_cap(k),
             lambda c: c.kwargs["BLOCK_N"] <= _tile_cap(n)]
    kept = list(configs)
    for fits in rules:
        kept = [c for c in kept if fits(c)] or kept
    return kept


#: The kernel with its ``EVEN_*`` constexprs derived from the sizes and the (autotuned) tile.
_lora_dx_kernel_even = triton.heuristics({
    "EVEN_M": lambda args: args["M"] % args["BLOCK_M"] == 0,
    "EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0,
    "EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
})(_lora_dx_kernel)

_lora_dx_kernel_autotuned = triton.autotune(
    configs=gpu_configs(),
    key=["M_BUCKET", "N", "K", "R_PAD", "HAS_DROPOUT", "DOUBLE_QUANT", "BLOCKSIZE"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_lora_dx_kernel_even)


def _check_matrix(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {list(t.shape)}")


def _check_dx_inputs(dy, weight, lora_a, g, scale, dropout_p, seed) -> None:
    _check_matrix("dy", dy)
    device = dy.device
    if not can_launch(device):
        raise RuntimeError(f"cannot run Triton on {device}: use a CUDA device, or set TRITON_INTERPRET=1 "
                           "before importing lora_triton for CPU tensors")
    check_nf4_weight(weight, device)
    n, k = weight.shape
    if k > MAX_FUSED_K:
        raise ValueError(f"the fused dx kernel takes K <= {MAX_FUSED_K} (its {_MAX_BLOCK_N}-row weight panels use "
                         f"int32 byte offsets), got K={k}; compute dx through dequantize + cuBLAS (dx_method='dequant')")
    m = dy.shape[0]
    check_tensor("dy", dy, (m, n), device)
    _check_matrix("lora_a", lora_a)
    r = lora_a.shape[0]
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"LoRA rank must be in 1..{MAX_RANK}, got {r} (lora_a shape {list(lora_a.shape)})")
    check_tensor("lora_a", lora_a, (r, k), device, dtypes=(dy.dtype,))
    check_tensor("g", g, (m, r), device, dtypes=(dy.dtype,))
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite Python number, got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be a Python int, got {type(seed).__name__}")


def lora_dx_triton(dy: torch.Tensor, weight: NF4Weight, lora_a: torch.Tensor, g: torch.Tensor, scale: float,
                   dropout_p: float = 0.0, seed: int = 0, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``dx = dy @ dequant(W) + scale * (g @ lora_a) * mask`` in one fused kernel.

    Args:
        dy: ``[M, N]`` output gradient, fp16/bf16/fp32, contiguous.
        weight: ``NF4Weight`` ``[N, K]`` on dy's device, ``K`` divisible by its block size.
        lora_a: ``[r, K]`` in dy's dtype, ``1 <= r <= 128``.
        g: ``[M, r]`` = ``dy @ lora_b`` in dy's dtype (the caller reuses it for ``dA``).
        scale: the LoRA scale ``s``.
        dropout_p, seed: the forward's LoRA dropout; the mask is regenerated from ``seed``
            exactly as ``dropout.dropout_mask(seed, dropout_p, M, K)``. ``dropout_p=0``: no mask.
        out: optional contiguous ``[M, K]`` tensor in dy's dtype to write ``dx`` into.
    Returns:
        ``dx`` ``[M, K]`` in dy's dtype (accumulated in fp32); ``out`` when given.
    Raises:
        TypeError / ValueError on a wrong type, dtype, device, shape, layout or parameter;
        RuntimeError when Triton cannot run on dy's device.
    """
    _check_dx_inputs(dy, weight, lora_a, g, scale, dropout_p, seed)
    m, n = dy.shape
    k = weight.shape[1]
    r = lora_a.shape[0]
    if out is None:
        dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
    else:
        check_tensor("out", out, (m, k), dy.device, dtypes=(dy.dtype,))
        dx = out
    if m == 0:
        return dx

    run_dtype = kernel_dtype(dy.dtype, dy.device)  # bf16 -> fp32 under the interpreter only
    dy_k, a_k, g_k = (t.to(run_dtype) for t in (dy, lora_a, g))
    # The widened buffer exists only under the interpreter (tests): NaN-filled so that an
    # element the kernel fails to write cannot pass a comparison.
    dx_k = dx if run_dtype == dx.dtype else torch.full((m, k), float("nan"), dtype=run_dtype, device=dy.device)

    args = (dy_k, g_k, a_k, dx_k, *nf4_kernel_args(weight), float(scale), seed, float(dropout_p), m, n, k, r,
            m_bucket(m))
    meta = dict(BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=weight.double_quant, TABLE=default_table(dy.device),
                R_PAD=_tile_cap(r), HAS_DROPOUT=dropout_p > 0)
    with on_device(dy.device):
        if autotuning():
            grid = lambda meta_: (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(k, meta_["BLOCK_K"]),)  # noqa: E731
            _lora_dx_kernel_autotuned[grid](*args, **meta, enable_fp_fusion=False)
        elif interpreting():
            cfg = INTERPRETER_CONFIG
            _lora_dx_kernel_even[(triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(k, cfg["BLOCK_K"]),)](*args, **meta, **cfg)
        else:
            def launch(config: triton.Config) -> None:
                grid = (triton.cdiv(m, config.kwargs["BLOCK_M"]) * triton.cdiv(k, config.kwargs["BLOCK_K"]),)
                _lora_dx_kernel_even[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                           num_stages=config.num_stages, enable_fp_fusion=False)

            configs = fixed_gpu_configs(dy_k.element_size(), meta["R_PAD"], gpu_limits(dy.device))
            launch_first_fitting(("dx", dy.device, dy.dtype, tuple(sorted(meta.items()))), configs, launch)

    if dx_k is not dx:
        dx.copy_(dx_k)  # torch rounds fp32 -> bf16 to nearest even
    return dx


def lora_backward_triton(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    saved_s: torch.Tensor,
    dropout_p: float = 0.0,
    seed: int = 0,
    needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
    dx_method: str = "dequant",
) -> LoRAGrads:
    """Every gradient of the layer, each only when asked for (same contract as
    ``reference.lora_backward``, with the dropout mask given by ``(dropout_p, seed)``).

    Args:
        dy: ``[M, N]`` output gradient; any strides (stride-0 / non-contiguous gradients are
            made contiguous here). Cast to x's dtype, the compute dtype, like the reference.
        x: ``[M, K]`` forward input (fp16/bf16/fp32); weight: ``NF4Weight`` ``[N, K]``.
        lora_a: ``[r, K]``; lora_b: ``[N, r]`` (cast to x's dtype); scale: ``s``.
        saved_s: ``S [M, r]`` = ``drop(x) @ A^T`` saved by the forward.
        dropout_p, seed: the forward's LoRA dropout (mask regenerated, never saved).
        needs: which of ``(dx, dA, dB, dbias)`` to compute.
        dx_method: ``"fused"`` (``lora_dx_triton``), ``"dequant"`` (dequantize + cuBLAS) or ``"merged"``
            (``dy @ (W + s * B @ A)``; ``"dequant"`` when there is dropout), one of ``DX_METHODS``;
            ``ops.dispatch.choose_dx`` picks it from measurements.
    Returns:
        ``LoRAGrads`` in x's dtype; fields not asked for are None. ``G = dy @ B`` is computed
        once, and only when dA or a dx other than the merged one needs it; ``drop(x)`` exists only
        transiently for dA.
    """
    need_dx, need_da, need_db, need_dbias = needs
    if dx_method not in DX_METHODS:
        raise ValueError(f"dx_method must be one of {DX_METHODS}, got {dx_method!r}")
    dtype = x.dtype
    dy = dy.to(dtype).contiguous()
    merged = dx_method == "merged" and dropout_p == 0
    g = dy @ lora_b.to(dtype) if (need_dx and not merged) or need_da else None
    dx = da = db = dbias = None
    if need_dx:
        a = lora_a.to(dtype).contiguous()
        if merged:
            dx = dy @ dequantize_nf4_merged(weight, a, lora_b.to(dtype).contiguous(), scale, dtype)
        elif dx_method == "fused":
            dx = lora_dx_triton(dy, weight, a, g, scale, dropout_p, seed)
        else:
            dx = _dx_dequantized(dy, weight, a, g, scale, dropout_p, seed)
    if need_da:
        x_drop = x
        if dropout_p > 0:
            m, k = x.shape
            # fp32 mask times x, rounded once to the compute dtype
            x_drop = (x * dropout_mask(seed, dropout_p, m, k, x.device)).to(dtype)
        da = torch.mm(g.t(), x_drop).mul_(scale)
    if need_db:
        db = torch.mm(dy.t(), saved_s.to(dtype)).mul_(scale)
    if need_dbias:
        dbias = dy.sum(0)
    return LoRAGrads(dx, da, db, dbias)


def _dx_dequantized(dy: torch.Tensor, weight: NF4Weight, lora_a: torch.Tensor, g: torch.Tensor, scale: float,
                    dropout_p: float, seed: int) -> torch.Tensor:
    """``dx = dy @ dequant(W) + scale * (g @ lora_a) * mask`` through a dense ``W`` in dy's dtype
    (``dequantize_nf4``, freed on return) and cuBLAS; same arguments as ``lora_dx_triton``."""
    dx = dy @ dequantize_nf4(weight, dy.dtype)
    if dropout_p > 0:
        m, k = dx.shape
        return dx.addcmul_(g @ lora_a, dropout_mask(seed, dropout_p, m, k, dy.device).to(dy.dtype), value=scale)
    return dx.addmm_(g, lora_a, alpha=scale)
