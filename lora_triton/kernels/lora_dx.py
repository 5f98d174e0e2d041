"""The fused input gradient of the QLoRA layer in one Triton kernel.

For ``dy [M, N]``, NF4 ``W [N, K]``, ``A [r, K]`` and ``G = dy @ B [M, r]``:

    dx = dy @ dequant(W) + s * (G @ A) * mask                                  [M, K]

``_lora_dx_kernel`` computes one ``[BLOCK_M, BLOCK_K]`` tile of ``dx`` per program: it reduces
over ``N`` with ``[BLOCK_N, BLOCK_K]`` tiles of ``W`` decoded from the packed bytes in
registers (the dequantized weight never reaches memory), then adds the LoRA term from ``G``
and ``A`` in the same fp32 accumulator, with the dropout mask regenerated from the forward's
seed. ``G`` is an input because the caller needs it for ``dA`` as well.

``launch_dx`` only launches, with the config it is given or autotuned over the configs it is given
(``ops.configs`` chooses them per GPU). The byte offsets inside a ``[BLOCK_N, K]`` panel of ``W``
are int32 (``load_nf4_tile(..., LOCAL_ROWS=True)``), so ``K <= max_k(block_n)``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .dropout import dropout_scale, load_seed
from .nf4_decode import code_table, in_bounds, load_nf4_tile
from .runtime import on_device, pipelined_smem


@triton.jit
def _lora_dx_kernel(
    dy_ptr, g_ptr, a_ptr, dx_ptr,
    packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
    scale, seed_ptr, dropout_p,
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
        lora = lora * dropout_scale(load_seed(seed_ptr, HAS_DROPOUT), offs_m, offs_k, K, dropout_p)
    acc += lora

    dx_ptrs = dx_ptr + rows[:, None] * K + offs_k[None, :]
    if EVEN_M and EVEN_K:
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty))
    else:
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=in_m[:, None] & in_k[None, :])


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


def max_k(block_n: int) -> int:
    """The largest ``K`` a ``BLOCK_N``-row weight panel addresses with int32 byte offsets (< 2**31 bytes)."""
    return 2 * 2**31 // block_n


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs with tiles larger than the problem needs (they only waste lanes).

    Rules apply in order of what they save (rows of M first: a 128-row tile at M = 1 wastes
    127 rows of every MMA), each only if it leaves a config, so some config always remains.
    """
    m, n, k = named_args["M"], named_args["N"], named_args["K"]
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


@functools.lru_cache(maxsize=None)
def _autotuned(configs: tuple[triton.Config, ...]):
    """The kernel autotuned over ``configs`` (one autotuner per config list: its timings are per list)."""
    return triton.autotune(configs=list(configs), key=["M_BUCKET", "N", "K", "R_PAD", "HAS_DROPOUT", "DOUBLE_QUANT",
                                                         "BLOCKSIZE"],
                           prune_configs_by={"early_config_prune": _prune_configs})(_lora_dx_kernel_even)


def launch_dx(dy: torch.Tensor, g: torch.Tensor, lora_a: torch.Tensor, dx: torch.Tensor, weight_args: tuple,
              scale: float, seed: torch.Tensor | None, dropout_p: float, *, blocksize: int, double_quant: bool,
              table: str, r_pad: int, m_bucket: int, config: triton.Config | dict | None = None,
              autotune: tuple[triton.Config, ...] | None = None) -> torch.Tensor:
    """Fill ``dx [M, K]`` with ``dy @ dequant(W) + scale * (g @ lora_a) * mask`` (``dy [M, N]``, ``g [M, r]``,
    ``lora_a [r, K]``, ``dx`` in one dtype, contiguous; ``weight_args`` = ``nf4_decode.kernel_args``),
    with ``config`` (a ``triton.Config``, or a dict of ``BLOCK_*`` / ``GROUP_M`` for the interpreter) or
    autotuned over ``autotune``."""
    m, n = dy.shape
    k, r = dx.shape[1], lora_a.shape[0]
    args = (dy, g, lora_a, dx, *weight_args, float(scale), dy if seed is None else seed, float(dropout_p), m, n, k, r,
            m_bucket)
    meta = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, TABLE=table, R_PAD=r_pad, HAS_DROPOUT=dropout_p > 0)
    with on_device(dy.device):
        if autotune is not None:
            grid = lambda meta_: (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(k, meta_["BLOCK_K"]),)  # noqa: E731
            _autotuned(tuple(autotune))[grid](*args, **meta, enable_fp_fusion=False)
        elif isinstance(config, triton.Config):
            grid = (triton.cdiv(m, config.kwargs["BLOCK_M"]) * triton.cdiv(k, config.kwargs["BLOCK_K"]),)
            _lora_dx_kernel_even[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                       num_stages=config.num_stages, enable_fp_fusion=False)
        else:
            grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(k, config["BLOCK_K"]),)
            _lora_dx_kernel_even[grid](*args, **meta, **config)
    return dx
