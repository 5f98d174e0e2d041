"""Decode-size forward (few tokens): ``y = x @ dequant(W)^T + s * (drop(x) @ A^T) @ B^T + b`` in one launch.

Shapes: ``x [M, K]``, NF4 ``W [N, K]`` (bitsandbytes' bytes), ``A [r, K]``,
``B [N, r]``, ``b [N]``; ``y [M, N]`` and ``S [M, r]`` in x's dtype (fp16 / bf16 / fp32),
fp32 accumulation. Built for ``M <= 16`` and, with 32- or 64-token tiles, medium M (any M works:
more M tiles).

Design (memory-bound: the packed weight is read once, at full width):

* **Swap-AB**: each program computes ``y^T`` for ``BLOCK_N`` outputs and ``BLOCK_M`` tokens (16;
  32 or 64 for medium M, a config field),
  ``acc [BLOCK_N, 16] += W_tile [BLOCK_N, BLOCK_K] @ x^T [BLOCK_K, 16]``: the decoded weight is
  the *left* MMA operand (on sm_90 a register-A wgmma m64n16k16), the tokens the small side.
* **Split-K** over ``SPLIT_K`` programs per output tile so a few hundred tiles fill the GPU.
  The LoRA term goes in by linearity: each split adds ``s * B_n @ (A_ks @ drop(x_ks)^T)``; the
  shrink inside the K loop is a 3-D dot over ``LORA_CHUNKS`` K chunks, so the warps share it.
  The launcher leaves no split empty and the kernel peels its first K step (a zero-trip path
  would write the wgmma accumulator with moves: ptxas' C7515, serialized wgmma).
* **Absmax on the product**: each K step is cut into sub-tiles of ``min(BLOCK_K, BLOCKSIZE)``
  columns (one absmax per row in each); the decoded codes, rounded to x's dtype, go to the MMA
  as they are and the sub-tile's fp32 product is scaled by its rows' absmax with one FMA per
  accumulator element: ``acc += absmax[:, None] * (codes @ x_sub^T)``. That is ``BLOCK_M /
  BLOCKSIZE`` instructions per weight element instead of one fp32 multiply per element. The
  weight is rounded once, as its code rather than as ``code * absmax``; emulated for fp16 / bf16
  in tests/test_skinny_kernel.py, its error is no larger than the exactly dequantized weight's.
  The FMA reads the MMA's result in the same step, so Triton waits for each step's wgmma before
  the next tile decodes (``wgmma.wait_group 0`` in the loop). **Absmax on the weights**
  (``SCALE_WEIGHTS``, config ``scale_weights``): each weight is decoded as ``code * absmax`` in
  fp32 (``NF4Weight.dequantize``'s rounding) and accumulates inside the wgmma, which Triton then
  keeps asynchronous (the next tile decodes while the MMA runs: ``wait_group`` with pending
  groups); one fp32 multiply per weight element instead. A GPU run times the two.
* **Masks only where a tile can be ragged**: ``EVEN_N`` / ``EVEN_K`` (N, K multiples of the
  tile) drop the bound tests from the K loop.
* **Deterministic reduction**: each split writes its fp32 partial to a workspace, then bumps
  the tile's counter; the program that sees ``SPLIT_K - 1`` sums the partials in split order (the
  same order whichever program is last), adds the bias and stores ``y``. No fp32 atomics on
  data. ``S`` is reduced the same way by the programs of the first N tile.
* **S first** (``S_FIRST``, config ``s_first``): ``S`` comes from the S kernel, launched before;
  the K loop is the base product alone and the last program of each output tile adds the LoRA
  expand and the bias (fewer registers at ranks above 16, where the in-loop shrink needs 255).

Each launch gets its own counters, zeroed on its stream just before it (``launch_skinny``): no
state outlives a call, so launches on different streams, and CUDA graphs captured at different
times, never share a counter (the caching allocator, or the graph's pool, owns the memory).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dropout import dropout_scale, load_seed
from .nf4_decode import code_table, load_nf4_codes, load_tile_absmax
from .runtime import on_device, pipelined_smem

BLOCK_M = 16  # default tokens per program: the wgmma N dimension (>= 16 on every MMA)
BLOCK_MS = (16, 32, 64)  # the token tiles a config may name
#: The epilogue addresses a ``[BLOCK_M, N]`` output tile with int32 offsets from its first row.
MAX_TILE_OFFSET = 2**31 - 1


@triton.jit
def split_k_range(pid_k, K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """``(k_begin, k_end)`` of split ``pid_k``: ``SPLIT_K`` runs of whole ``BLOCK_K`` steps over ``[0, K)``
    (the last ones may be short or empty)."""
    steps_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = pid_k * steps_per_split * BLOCK_K
    return k_begin, tl.minimum(k_begin + steps_per_split * BLOCK_K, K)


@triton.jit
def _x_t_tile(x_ptr, offs_m, offs_k, M, K, EVEN_K: tl.constexpr):
    """``x^T [len(offs_k), len(offs_m)]`` (0 outside; ``EVEN_K``: every ``offs_k < K``)."""
    mask = offs_m[None, :] < M
    if not EVEN_K:
        mask = mask & (offs_k[:, None] < K)
    return tl.load(x_ptr + offs_m[None, :].to(tl.int64) * K + offs_k[:, None], mask=mask, other=0.0)


@triton.jit
def _lora_shrink_step(s_acc, x_t, a_ptr, offs_r, k0, R, K,
                      LORA_CHUNKS: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``s_acc [LORA_CHUNKS, R_PAD, BLOCK_M] += A[:, chunk c of k0:k0+BK] @ x^T[chunk c]``.

    The tile's K range is cut into ``LORA_CHUNKS`` chunks, one batch of a 3-D dot each, so the
    warps share the small product instead of each computing all of it; the caller sums the
    chunks once, after the loop.
    """
    BLOCK_K: tl.constexpr = x_t.shape[0]
    BLOCK_M: tl.constexpr = x_t.shape[1]
    CHUNK: tl.constexpr = BLOCK_K // LORA_CHUNKS
    offs_c = tl.arange(0, LORA_CHUNKS)[:, None, None] * CHUNK
    offs_k = k0 + offs_c + tl.arange(0, CHUNK)[None, None, :]  # [chunks, 1, CHUNK]
    mask = offs_r[None, :, None] < R
    if not EVEN_K:
        mask = mask & (offs_k < K)
    a = tl.load(a_ptr + offs_r[None, :, None].to(tl.int64) * K + offs_k, mask=mask, other=0.0)
    x3 = tl.reshape(x_t, (LORA_CHUNKS, CHUNK, BLOCK_M))
    return tl.dot(a, x3, s_acc, input_precision=DOT_PRECISION)


@triton.jit
def _column(t, j: tl.constexpr):
    """Column ``j`` of ``t [ROWS, COLS]`` (``COLS`` a power of two) as ``[ROWS]``: ``tl.split`` for up to 4
    columns (no data movement when a thread holds its rows' columns), a masked sum beyond."""
    ROWS: tl.constexpr = t.shape[0]
    COLS: tl.constexpr = t.shape[1]
    if COLS == 1:
        return tl.reshape(t, (ROWS,))
    elif COLS == 2:
        c0, c1 = tl.split(t)
        return c1 if j == 1 else c0
    elif COLS == 4:
        lo, hi = tl.split(tl.reshape(t, (ROWS, 2, 2)))  # lo: columns 0, 2; hi: columns 1, 3
        c0, c1 = tl.split(hi if j % 2 == 1 else lo)
        return c1 if j >= 2 else c0
    else:
        return tl.sum(tl.where(tl.arange(0, COLS)[None, :] == j, t, 0.0), axis=1)


@triton.jit
def _k_step(acc, s_chunks, k0, x_ptr, packed_ptr, table, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
            a_ptr, offs_m, offs_n, offs_r, M, N, K, R, seed, p,
            BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, TABLE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
            DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, LORA_CHUNKS: tl.constexpr,
            EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, S_FIRST: tl.constexpr, SCALE_WEIGHTS: tl.constexpr):
    """One ``BLOCK_K`` step at ``k0``: ``acc += W_tile @ x^T`` and (unless ``S_FIRST``: ``S`` was
    computed before the launch) the LoRA shrink chunks.

    The absmax scale is applied to the product, not to each weight: per sub-tile of
    ``SUB = min(BLOCK_K, BLOCKSIZE)`` columns (one absmax per row), ``acc += absmax[:, None] *
    (codes @ x_sub^T)`` with the codes rounded to x's dtype (exact in fp32), one fp32 FMA per
    accumulator element and sub-tile instead of one multiply per weight element. ``SCALE_WEIGHTS``:
    ``acc += (codes * absmax[:, None]) @ x_sub^T`` instead, the weight rounded to x's dtype as ``code *
    absmax`` and the accumulation inside the (asynchronous) MMA.
    """
    SUB: tl.constexpr = BLOCK_K if BLOCK_K < BLOCKSIZE else BLOCKSIZE
    NSUB: tl.constexpr = BLOCK_K // SUB
    absmax = load_tile_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, offs_n, k0, N, K,
                              BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, EVEN_N, EVEN_K)  # [BLOCK_N, NSUB]
    for j in tl.static_range(NSUB):
        ks = k0 + j * SUB
        offs_k = ks + tl.arange(0, SUB)
        x_t = _x_t_tile(x_ptr, offs_m, offs_k, M, K, EVEN_K)
        if not S_FIRST:
            x_drop = x_t
            if HAS_DROPOUT:
                x_drop = x_t * tl.trans(dropout_scale(seed, offs_m, offs_k, K, p)).to(x_t.dtype)
            s_chunks = _lora_shrink_step(s_chunks, x_drop, a_ptr, offs_r, ks, R, K, LORA_CHUNKS, EVEN_K,
                                         DOT_PRECISION)
        codes = load_nf4_codes(packed_ptr, table, offs_n, ks, N, K, acc.shape[0], SUB, TABLE, EVEN_N, EVEN_K)
        if SCALE_WEIGHTS:
            scale_j = _column(absmax, j)
            acc = tl.dot((codes * scale_j[:, None]).to(x_t.dtype), x_t, acc, input_precision=DOT_PRECISION)
        else:
            part = tl.dot(codes.to(x_t.dtype), x_t, input_precision=DOT_PRECISION)
            scale_j = _column(absmax, j)
            acc = tl.fma(part, scale_j[:, None], acc)
    return acc, s_chunks


@triton.jit(do_not_specialize=["M", "R"])
def _skinny_kernel(
        x_ptr, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
        a_ptr, b_ptr, bias_ptr, s_ptr, y_ptr, partial_y_ptr, partial_s_ptr, counter_ptr,
        M, N, K, R, scale, seed_ptr, p,
        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, TABLE: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
        LORA_CHUNKS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, S_FIRST: tl.constexpr,
        SCALE_WEIGHTS: tl.constexpr):
    """Program ``(n, k, m)``: output tile ``(n, m)``, K range ``k`` of ``SPLIT_K``.

    ``S_FIRST``: ``s_ptr`` holds ``S = drop(x) @ A^T`` already (the S kernel ran first); the K loop
    is the base product alone and the LoRA expand ``s * B_n @ S^T`` and the bias are added once
    per output tile, in the epilogue (by the last split's program when ``SPLIT_K > 1``).
    Otherwise ``S`` is accumulated in the K loop and stored."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seed = load_seed(seed_ptr, HAS_DROPOUT)
    k_begin, k_end = split_k_range(pid_k, K, BLOCK_K, SPLIT_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    table = code_table(code_ptr, TABLE)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T
    s_chunks = tl.zeros((LORA_CHUNKS, R_PAD, BLOCK_M), dtype=tl.float32)  # S^T of this K range, by chunk
    # The first step is peeled (every split has one: the launcher makes none empty), so no path
    # reaches the end of the MMA pipeline with an accumulator that no wgmma wrote (C7515).
    acc, s_chunks = _k_step(acc, s_chunks, k_begin, x_ptr, packed_ptr, table, absmax_ptr, nested_absmax_ptr,
                            nested_code_ptr, offset, a_ptr, offs_m, offs_n, offs_r, M, N, K, R, seed, p,
                            BLOCKSIZE, DOUBLE_QUANT, TABLE, HAS_DROPOUT, DOT_PRECISION, BLOCK_K, LORA_CHUNKS,
                            EVEN_N, EVEN_K, S_FIRST, SCALE_WEIGHTS)
    for k0 in range(k_begin + BLOCK_K, k_end, BLOCK_K):
        acc, s_chunks = _k_step(acc, s_chunks, k0, x_ptr, packed_ptr, table, absmax_ptr, nested_absmax_ptr,
                                nested_code_ptr, offset, a_ptr, offs_m, offs_n, offs_r, M, N, K, R, seed, p,
                                BLOCKSIZE, DOUBLE_QUANT, TABLE, HAS_DROPOUT, DOT_PRECISION, BLOCK_K, LORA_CHUNKS,
                                EVEN_N, EVEN_K, S_FIRST, SCALE_WEIGHTS)
    s_acc = tl.sum(s_chunks, axis=0)
    if not S_FIRST:  # LoRA expand of this K range (S rounded to x's dtype, as the reference)
        acc = _lora_expand(acc, s_acc, b_ptr, offs_n, offs_r, N, R, scale, DOT_PRECISION)
    # Tile offsets in int32 from row pid_m * BLOCK_M on (the launcher keeps BLOCK_M * N and
    # BLOCK_M * R below 2**31): half the registers of int64 offsets in the reduction epilogue.
    tile_rows = pid_m.to(tl.int64) * BLOCK_M
    y_ptr += tile_rows * N
    s_ptr += tile_rows * R
    partial_y_ptr += tile_rows * N
    partial_s_ptr += tile_rows * R
    offs_tile_m = tl.arange(0, BLOCK_M)
    partial_y_stride = M.to(tl.int64) * N  # one split's partial y (and S: M * R)
    partial_s_stride = M.to(tl.int64) * R
    y_offs = offs_tile_m[None, :] * N + offs_n[:, None]  # y^T tile -> y [M, N]
    y_mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    s_offs = offs_tile_m[None, :] * R + offs_r[:, None]  # S^T tile -> S [M, r]
    s_mask = (offs_r[:, None] < R) & (offs_m[None, :] < M)
    if SPLIT_K > 1:
        tl.store(partial_y_ptr + pid_k * partial_y_stride + y_offs, acc, mask=y_mask)
        if pid_n == 0 and not S_FIRST:
            tl.store(partial_s_ptr + pid_k * partial_s_stride + s_offs, s_acc, mask=s_mask)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            s_acc = tl.zeros((R_PAD, BLOCK_M), dtype=tl.float32)
            for split in range(0, SPLIT_K):
                acc += tl.load(partial_y_ptr + split * partial_y_stride + y_offs, mask=y_mask, other=0.0,
                               cache_modifier=".cg")
                if pid_n == 0 and not S_FIRST:
                    s_acc += tl.load(partial_s_ptr + split * partial_s_stride + s_offs, mask=s_mask, other=0.0,
                                     cache_modifier=".cg")
            if S_FIRST:
                acc = _lora_expand_of_s(acc, s_ptr, b_ptr, offs_n, offs_r, N, R, scale, s_offs, s_mask, DOT_PRECISION)
            _store_outputs(acc, s_acc, bias_ptr, y_ptr, s_ptr, offs_n, N, y_offs, y_mask, s_offs, s_mask,
                           pid_n == 0, HAS_BIAS, not S_FIRST)
    else:
        if S_FIRST:
            acc = _lora_expand_of_s(acc, s_ptr, b_ptr, offs_n, offs_r, N, R, scale, s_offs, s_mask, DOT_PRECISION)
        _store_outputs(acc, s_acc, bias_ptr, y_ptr, s_ptr, offs_n, N, y_offs, y_mask, s_offs, s_mask,
                       pid_n == 0, HAS_BIAS, not S_FIRST)


@triton.jit
def _lora_expand(acc, s_t, b_ptr, offs_n, offs_r, N, R, scale, DOT_PRECISION: tl.constexpr):
    """``acc [BLOCK_N, BLOCK_M] + scale * B[offs_n] @ S^T``; ``s_t [R_PAD, BLOCK_M]`` (fp32 or x's dtype) is
    rounded to B's dtype first, as the reference rounds ``S``."""
    b_mask = (offs_n[:, None] < N) & (offs_r[None, :] < R)
    b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * R + offs_r[None, :], mask=b_mask, other=0.0)
    return acc + scale * tl.dot(b, s_t.to(b.dtype), input_precision=DOT_PRECISION)


@triton.jit
def _lora_expand_of_s(acc, s_ptr, b_ptr, offs_n, offs_r, N, R, scale, s_offs, s_mask, DOT_PRECISION: tl.constexpr):
    """``_lora_expand`` with ``S^T [R_PAD, BLOCK_M]`` read from ``S [M, r]`` (written before the launch)."""
    s_t = tl.load(s_ptr + s_offs, mask=s_mask, other=0.0)
    return _lora_expand(acc, s_t, b_ptr, offs_n, offs_r, N, R, scale, DOT_PRECISION)


@triton.jit
def _store_outputs(acc, s_acc, bias_ptr, y_ptr, s_ptr, offs_n, N, y_offs, y_mask, s_offs, s_mask, STORE_S,
                   HAS_BIAS: tl.constexpr, WRITES_S: tl.constexpr):
    """``y = acc + bias`` and (when ``WRITES_S`` and ``STORE_S``) ``S``, both in their tensors' dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    if WRITES_S:
        if STORE_S:
            tl.store(s_ptr + s_offs, s_acc.to(s_ptr.dtype.element_ty), mask=s_mask)


# ====================================================================== launcher
def split_k_for(n_tiles: int, m_tiles: int, k_steps: int, programs_wanted: int) -> int:
    """Splits of K so that ``n_tiles * m_tiles * split`` reaches ``programs_wanted`` (no more
    splits than K steps: each split keeps at least one ``BLOCK_K`` step)."""
    tiles = n_tiles * m_tiles
    return max(1, min(k_steps, -(-programs_wanted // tiles)))


def nonempty_split_k(k_steps: int, split_k: int) -> int:
    """The largest split ``<= split_k`` whose every split gets at least one of the ``k_steps``
    ``BLOCK_K`` steps under ``split_k_range`` (the kernel peels its first step)."""
    steps_per_split = triton.cdiv(k_steps, max(1, min(split_k, k_steps)))
    return triton.cdiv(k_steps, steps_per_split)


def lora_chunks(block_k: int, r_pad: int, blocksize: int | None = None) -> int:
    """K chunks of the in-loop LoRA shrink (one 3-D dot batch each, >= 16 columns per chunk) of one
    sub-tile of ``min(block_k, blocksize)`` columns (the kernel's K step runs one per absmax block),
    at most 64 rank rows of accumulator in all (rank 16: 4 chunks; rank 64: 1) so the chunks'
    accumulators stay small next to the weight tile."""
    sub = block_k if blocksize is None else min(block_k, blocksize)
    return max(1, min(4, sub // 16, 64 // r_pad))


def skinny_smem(config: dict, elem_bytes: int, r_pad: int) -> int:
    """Upper bound of the skinny kernel's shared memory for ``config`` (a skinny config's keys), activations of
    ``elem_bytes`` and padded rank ``r_pad``: the packed weight tile (half a byte per element, one absmax
    byte per 32 columns) once per pipeline stage, the ``[r_pad, BLOCK_K]`` A chunks of the in-loop
    shrink once per stage after the first, and once the ``x^T`` tile, the epilogue's B tile and the
    ``S`` tile (its fp32 accumulator with the shrink in the loop)."""
    bm, bn, bk, stages = config["block_m"], config["block_n"], config["block_k"], config["num_stages"]
    once = (bm * bk + r_pad * bn) * elem_bytes
    if config.get("s_first", False):
        once += r_pad * bm * elem_bytes
    else:
        once += max(1, stages - 1) * r_pad * bk * elem_bytes + r_pad * bm * 4
    return pipelined_smem(stages, bn * bk // 2 + bn * max(1, bk // 32), once)


def launch_skinny(x, weight_args, lora_a, lora_b, bias, y, s, scale: float, dropout_p: float,
                  seed: torch.Tensor | None, *, blocksize: int, double_quant: bool, r_pad: int, dot_precision: str,
                  table: str, block_n: int, block_k: int, split_k: int, block_m: int = BLOCK_M, num_warps: int = 4,
                  num_stages: int = 3, maxnreg: int | None = None, s_first: bool = False,
                  scale_weights: bool = False) -> None:
    """Fill ``y [M, N]`` and ``S [M, r]`` (preallocated, x's dtype) with one launch.

    ``s_first``: ``s`` already holds ``S = drop(x) @ A^T`` (the caller ran the S kernel); the launch
    only reads it, for the LoRA expand in the epilogue (``dropout_p`` and ``seed`` are then unused).
    ``seed``: int32 0-d on x's device (None without dropout).
    ``scale_weights``: the absmax multiplies each decoded weight before the MMA (``SCALE_WEIGHTS``).
    ``weight_args`` is ``nf4_decode.kernel_args(weight)``; every tensor is contiguous on x's
    device (validated by the ops layer, which also checks the config: ``ops.configs.check_skinny_config``).
    ``split_k`` is used as given (``split_k_for`` picks one).
    """
    m, k = x.shape
    n, r = y.shape[1], lora_a.shape[0]
    assert block_m in BLOCK_MS and block_m * max(n, r) <= MAX_TILE_OFFSET, (block_m, n, r)
    n_tiles, m_tiles = triton.cdiv(n, block_n), triton.cdiv(m, block_m)
    split_k = nonempty_split_k(triton.cdiv(k, block_k), split_k)
    with on_device(x.device):
        if split_k > 1:
            partial_y = torch.empty(split_k * m * n, dtype=torch.float32, device=x.device)
            partial_s = y if s_first else torch.empty(split_k * m * r, dtype=torch.float32, device=x.device)
            # The launch's own counters, zeroed on its stream: no other launch ever reads them.
            counters = torch.zeros(n_tiles * m_tiles, dtype=torch.int32, device=x.device)
        else:
            partial_y = partial_s = counters = y  # never read
        _skinny_kernel[(n_tiles, split_k, m_tiles)](
            x, *weight_args, lora_a, lora_b, x if bias is None else bias, s, y, partial_y, partial_s, counters,
            m, n, k, r, float(scale), x if seed is None else seed, float(dropout_p),
            BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, TABLE=table, HAS_BIAS=bias is not None,
            HAS_DROPOUT=dropout_p > 0 and not s_first, R_PAD=r_pad, DOT_PRECISION=dot_precision, BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, LORA_CHUNKS=lora_chunks(block_k, r_pad, blocksize),
            EVEN_N=n % block_n == 0, EVEN_K=k % block_k == 0, S_FIRST=s_first, SCALE_WEIGHTS=scale_weights,
            num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg,
            enable_fp_fusion=False)  # absmax = nested * q + offset rounds twice, as NF4Weight.dequantize
