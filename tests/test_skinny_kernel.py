"""The decode-size kernel (lora_triton/kernels/nf4_skinny.py, the ``skinny`` candidate) against the float64
reference.

Interpreter shapes stay small; split-K is forced to several values (the GPU picks it from the
SM count) so the last-program reduction runs on every shape. Outputs are poisoned with NaN.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given
from hypothesis import strategies as st

from lora_triton.kernels import nf4_skinny, runtime
from lora_triton.ops import candidates, configs
from lora_triton.ops.dropout import dropout_mask
from lora_triton.reference import lora_forward
from lora_triton.format import NF4Weight
from lora_triton.format.nf4 import unpack_nibbles
from lora_triton.testing import REL_TOL, assert_like_torch, assert_rel_close, random_lora_problem, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, N, K, r, blocksize, double_quant, bias): M 1, 2, 3, 16, 17; N never a multiple of the tile;
# K = 96 with blocksize 32 leaves a partial K step; blocksize 256 > BLOCK_K (one absmax per row).
CASES = [
    (1, 200, 256, 8, 64, True, False),
    (2, 72, 128, 1, 128, False, True),
    (3, 130, 96, 16, 32, True, True),
    (16, 100, 256, 64, 256, True, True),
    (17, 66, 128, 128, 64, False, False),
]


pytestmark = pytest.mark.usefixtures("poisoned_kernel_outputs")  # outputs start as NaN (conftest)


def _run(problem, config=None, dropout_p=0.0, seed=0):
    return candidates.run_forward("skinny", problem["x"], problem["weight"], problem["lora_a"], problem["lora_b"],
                                  problem["scale"], problem["bias"], dropout_p, seed, config)


def _check(problem, config=None, dropout_p=0.0, seed=0):
    x = problem["x"]
    mask = dropout_mask(seed, dropout_p, *x.shape, x.device).double() if dropout_p > 0 else None
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    y_ref, s_ref = lora_forward(f64(x), problem["weight"], f64(problem["lora_a"]), f64(problem["lora_b"]),
                                problem["scale"], f64(problem["bias"]), mask)
    y_plain, s_plain = lora_forward(x, problem["weight"], problem["lora_a"], problem["lora_b"], problem["scale"],
                                    problem["bias"], mask)
    y, s = _run(problem, config, dropout_p, seed)
    assert y.dtype == s.dtype == x.dtype
    assert_like_torch(s, s_ref, s_plain, what="S (skinny)")
    assert_like_torch(y, y_ref, y_plain, what="y (skinny)")
    return y, s


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-N{}-K{}-r{}-bs{}-dq{:d}-bias{:d}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(case, dtype, split_k, device):
    m, n, k, r, blocksize, double_quant, bias = case
    problem = random_lora_problem(m, n, k, r, dtype, blocksize, double_quant, bias, device)
    _check(problem, dict(split_k=split_k, block_k=32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_uses_the_seed_mask(dtype, device):
    problem = random_lora_problem(17, 72, 128, 8, dtype, 64, True, True, device)
    _check(problem, dict(split_k=2), dropout_p=0.25, seed=7)


def test_split_k_does_not_change_the_result_beyond_rounding_and_is_deterministic(device):
    problem = random_lora_problem(4, 72, 256, 16, torch.float32, 64, True, True, device)
    results = [_run(problem, dict(split_k=split, block_k=32)) for split in (1, 2, 5, 8)]
    for y, s in results[1:]:
        assert_rel_close(y, results[0][0], torch.float32, what="y across splits")
        assert_rel_close(s, results[0][1], torch.float32, what="S across splits")
    again = _run(problem, dict(split_k=5, block_k=32))
    assert torch.equal(again[0], results[2][0]) and torch.equal(again[1], results[2][1])


def test_default_config_picks_a_split(device):
    problem = random_lora_problem(1, 64, 512, 4, torch.float32, 64, True, False, device)
    _check(problem)  # split from the device (2 "SMs" on CPU): 1 N tile, 8 K steps of 64 -> split 8


# (M, N, K, blocksize, config): every combination of the kernel's EVEN_N / EVEN_K specializations,
# BLOCK_K above, at and below the block size, and 1, 2 or 4 chunks of the in-loop LoRA shrink.
TILE_CASES = [
    (3, 64, 96, 32, dict(block_n=32, block_k=64, split_k=1)),    # EVEN_N, K tail: 96 = 64 + 32
    (5, 70, 192, 64, dict(block_n=32, block_k=128, split_k=2)),  # neither even; 2 blocks per step, tail
    (2, 48, 128, 128, dict(block_n=16, block_k=16, split_k=3)),  # both even; one LoRA chunk
    (16, 40, 256, 64, dict(block_n=64, block_k=32, split_k=4)),  # K even, N not; 2 LoRA chunks
    (40, 70, 192, 64, dict(block_m=32, block_n=32, block_k=128, split_k=2)),  # medium-M tile, 2 M tiles
    (17, 64, 128, 32, dict(block_m=64, block_n=64, block_k=64, split_k=1)),   # 64 tokens, 47 of them masked
    (6, 50, 160, 32, dict(block_n=32, block_k=128, split_k=2)),  # 4 absmax sub-tiles per step, 3 past K
    (40, 300, 192, 64, dict(block_m=32, block_n=256, block_k=64, split_k=2)),  # the medium-M default's tile
]


@pytest.mark.parametrize("case", TILE_CASES, ids=lambda c: "M{}-N{}-K{}-bs{}-{}x{block_n}x{block_k}".format(
    *c[:4], c[4].get("block_m", 16), **c[4]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_even_and_ragged_tiles(case, dtype, device):
    m, n, k, blocksize, config = case
    problem = random_lora_problem(m, n, k, 16, dtype, blocksize, True, True, device)
    _check(problem, config, dropout_p=0.2, seed=3)


# S first (the S kernel, then only the LoRA expand and bias in the skinny epilogue): split 1 and the
# last-program reduction, medium token tiles, ragged M / N / K, ranks 1..128, dropout through the S kernel.
S_FIRST_CASES = [
    (3, 70, 96, 5, 32, True, True, dict(block_n=32, block_k=64, split_k=1)),
    (40, 66, 192, 64, 64, False, True, dict(block_m=32, block_n=32, block_k=64, split_k=3)),
    (17, 64, 128, 128, 128, True, False, dict(block_m=64, block_n=64, block_k=32, split_k=2)),
    (33, 40, 128, 1, 64, True, True, dict(block_m=32, block_n=16, block_k=128, split_k=1)),
]


@pytest.mark.parametrize("case", S_FIRST_CASES, ids=lambda c: "M{}-N{}-K{}-r{}-bs{}".format(*c[:5]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_s_first_matches_reference(case, dtype, device):
    m, n, k, r, blocksize, double_quant, bias, config = case
    problem = random_lora_problem(m, n, k, r, dtype, blocksize, double_quant, bias, device)
    _check(problem, dict(config, s_first=True), dropout_p=0.2, seed=11)


@pytest.mark.parametrize("s_first", [False, True])
@pytest.mark.parametrize("case", TILE_CASES, ids=lambda c: "M{}-N{}-K{}-bs{}-{}x{block_n}x{block_k}".format(
    *c[:4], c[4].get("block_m", 16), **c[4]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_weights_matches_reference(case, dtype, s_first, device):
    """The absmax on each weight before the MMA (``scale_weights``), on every tiling of the tile cases
    (1 to 4 absmax sub-tiles per step, partial steps, 16- to 64-token tiles), in the loop or S first."""
    m, n, k, blocksize, config = case
    problem = random_lora_problem(m, n, k, 16, dtype, blocksize, True, True, device)
    _check(problem, dict(config, scale_weights=True, s_first=s_first), dropout_p=0.2, seed=3)


def test_scale_weights_rounds_like_the_dequantized_weight(device):
    """In fp32 the weights are exact either way, so both placements of the absmax give the dequant
    path's numbers to fp32 summation order."""
    problem = random_lora_problem(20, 72, 256, 8, torch.float32, 64, True, True, device)
    config = dict(block_m=32, block_n=32, block_k=128, split_k=2)
    y_weights, s_weights = _run(problem, dict(config, scale_weights=True), dropout_p=0.1, seed=5)
    y_product, s_product = _run(problem, dict(config, scale_weights=False), dropout_p=0.1, seed=5)
    y_dequant, _ = candidates.run_forward("dequant", problem["x"], problem["weight"], problem["lora_a"],
                                          problem["lora_b"], problem["scale"], problem["bias"], 0.1, 5)
    assert relative_error(y_weights, y_dequant) < 1e-6 and relative_error(y_product, y_dequant) < 1e-6
    assert torch.equal(s_weights, s_product)


def test_each_absmax_placement_computes_its_own_rounding(device):
    """fp16 (which the interpreter does not widen): with ``scale_weights`` the kernel multiplies weights
    rounded as ``code * absmax``, without it codes rounded alone and then scaled in fp32. Each output
    lies closer to a float64 emulation of its own arithmetic than to the other's (measured margin
    ~1.38x over seeds 0-3; output rounding is common to both), so the switch cannot be lost on the way
    to the kernel."""
    m, n, k, blocksize = 24, 96, 512, 64
    problem = random_lora_problem(m, n, k, 8, torch.float16, blocksize, True, True, device, seed=1)
    config = dict(block_m=32, block_n=32, block_k=128, split_k=1)
    y_weights, _ = _run(problem, dict(config, scale_weights=True))
    y_product, _ = _run(problem, dict(config, scale_weights=False))
    weight = problem["weight"]
    x = problem["x"].double()
    codes = weight.code[unpack_nibbles(weight.packed, n * k).long()].reshape(n, k).to(torch.float16).double()
    absmax = weight.absmax_float32().reshape(n, k // blocksize, 1).double().to(codes.device)
    lora = problem["scale"] * (x @ problem["lora_a"].double().t()) @ problem["lora_b"].double().t()
    rest = lora + problem["bias"].double()
    emulated_weights = x @ weight.dequantize(torch.float16).double().t() + rest
    emulated_product = x @ (codes.reshape(n, k // blocksize, blocksize) * absmax).reshape(n, k).t() + rest
    assert relative_error(y_weights, emulated_weights) * 1.2 < relative_error(y_weights, emulated_product)
    assert relative_error(y_product, emulated_product) * 1.2 < relative_error(y_product, emulated_weights)


def test_s_first_agrees_with_the_in_loop_shrink(device):
    problem = random_lora_problem(20, 72, 256, 16, torch.float32, 64, True, True, device)
    config = dict(block_m=32, block_n=32, block_k=64, split_k=2)
    y_loop, s_loop = _run(problem, dict(config, s_first=False), dropout_p=0.1, seed=5)
    y_first, s_first = _run(problem, dict(config, s_first=True), dropout_p=0.1, seed=5)
    assert_rel_close(y_first, y_loop, torch.float32, what="y, S first vs in the loop")
    assert_rel_close(s_first, s_loop, torch.float32, what="S, S kernel vs in the loop")


@pytest.mark.parametrize("key", ["s_first", "scale_weights"])
def test_switches_must_be_bools(key, device):
    problem = random_lora_problem(2, 40, 128, 4, torch.float32, 64, True, False, device)
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match=f"{key} must be a bool"):
            _run(problem, {key: bad})


def test_configs_without_s_first_still_load():
    """Dispatch tables written before ``s_first`` and ``scale_weights`` existed name configs without
    them (False)."""
    configs.check_skinny_config(dict(block_m=16, block_n=128, block_k=128, split_k=1, num_warps=8, num_stages=2,
                                     maxnreg=None, table="gather"))
    with pytest.raises(ValueError, match="missing keys \\['table'\\]"):
        configs.check_skinny_config(dict(block_m=16, block_n=128, block_k=128, split_k=1, num_warps=8, num_stages=2,
                                         maxnreg=None))


def test_medium_m_default_is_the_32_token_tile_with_s_first_above_rank_16():
    skinny = configs.configs().skinny
    assert configs.skinny_default(16, 1) == skinny["decode"]
    assert configs.skinny_default(64, 16)["maxnreg"] is None and configs.skinny_default(64, 16)["block_m"] == 16
    medium = configs.skinny_default(16, 17)
    assert medium["block_m"] == 32 and medium["maxnreg"] == 168 and medium["s_first"] is False
    assert configs.skinny_default(64, 128)["s_first"] is True and configs.skinny_default(128, 200)["block_m"] == 32
    assert medium["block_k"] == 64  # one absmax per row and K step at bitsandbytes' blocksize 64
    for config in (skinny["decode"], skinny["medium"], skinny["interpreter"], *configs.skinny_bench_configs()):
        configs.check_skinny_config(dict(config, split_k=1, table="shfl"))


@pytest.mark.parametrize("k_steps", range(1, 40))
def test_nonempty_split_k_leaves_no_split_empty(k_steps):
    for wanted in range(1, 45):
        split = nf4_skinny.nonempty_split_k(k_steps, wanted)
        assert 1 <= split <= min(wanted, k_steps)
        per_split = -(-k_steps // split)  # split_k_range's steps per split
        starts = [i * per_split for i in range(split)]
        assert all(start < k_steps for start in starts), (k_steps, wanted, split)
        assert split * per_split >= k_steps


def test_maxnreg_is_a_config_field(device):
    problem = random_lora_problem(2, 40, 128, 4, torch.float32, 64, True, False, device)
    _check(problem, dict(maxnreg=128, num_warps=8))
    for bad in (16, 300, 1.5, True):
        with pytest.raises(ValueError, match="maxnreg must be None or an int"):
            _run(problem, dict(maxnreg=bad))
    for bad in (8, 48, 128, True):
        with pytest.raises(ValueError, match="block_m must be one of"):
            _run(problem, dict(block_m=bad))


def test_split_k_for_fills_the_programs_wanted():
    assert nf4_skinny.split_k_for(n_tiles=32, m_tiles=1, k_steps=16, programs_wanted=528) == 16
    assert nf4_skinny.split_k_for(n_tiles=86, m_tiles=1, k_steps=16, programs_wanted=528) == 7
    assert nf4_skinny.split_k_for(n_tiles=1000, m_tiles=1, k_steps=16, programs_wanted=528) == 1
    assert nf4_skinny.split_k_for(n_tiles=1, m_tiles=1, k_steps=3, programs_wanted=528) == 3


def test_empty_batch(device):
    problem = random_lora_problem(0, 40, 128, 4, torch.float32, 64, True, False, device)
    y, s = _run(problem)
    assert y.shape == (0, 40) and s.shape == (0, 4)


def test_config_is_refused_by_candidates_that_take_none(device):
    problem = random_lora_problem(2, 40, 128, 4, torch.float32, 64, True, False, device)
    with pytest.raises(ValueError, match="takes no config"):
        candidates.run_forward("dequant", problem["x"], problem["weight"], problem["lora_a"], problem["lora_b"], 1.0,
                               config=dict(split_k=2))


def test_shfl_table_is_refused_by_the_interpreter(device):
    if device.type != "cpu":
        pytest.skip("the interpreter only runs on CPU")
    problem = random_lora_problem(2, 40, 128, 4, torch.float32, 64, True, False, device)
    with pytest.raises(ValueError, match="runs on a GPU, not in Triton's interpreter"):
        _run(problem, dict(table="shfl"))


@given(m=st.integers(1, 20), n=st.integers(1, 150), k_blocks=st.integers(1, 4), r=st.integers(1, 128),
       blocksize=st.sampled_from([32, 64, 128]), double_quant=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from(DTYPES), split_k=st.integers(1, 4), dropout=st.sampled_from([0.0, 0.3]),
       seed=st.integers(0, 2**16))
def test_random_shapes(m, n, k_blocks, r, blocksize, double_quant, bias, dtype, split_k, dropout, seed, device):
    k = min(k_blocks * blocksize, 256 // blocksize * blocksize)
    problem = random_lora_problem(m, n, k, r, dtype, blocksize, double_quant, bias, device, seed=seed)
    _check(problem, dict(split_k=split_k, block_k=32), dropout_p=dropout, seed=seed % 1000)


@pytest.mark.parametrize("block_k", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 4096])
def test_lora_chunks_keep_16_columns_per_chunk_of_every_absmax_sub_tile(block_k, blocksize):
    """The K step runs one shrink per sub-tile of min(block_k, blocksize) columns; a GPU dot needs K >= 16."""
    for r_pad in (16, 32, 64, 128):
        chunks = nf4_skinny.lora_chunks(block_k, r_pad, blocksize)
        assert min(block_k, blocksize) // chunks >= 16
        assert chunks == 1 or chunks * r_pad <= 64


def test_output_tiles_too_large_for_int32_offsets_are_refused(monkeypatch):
    """A limit of the candidate (``supports``), known before anything is allocated."""
    monkeypatch.setattr(candidates, "can_launch", lambda device: True)
    problem = candidates.Problem(torch.device("cuda"), 64, 2**26, 128, 16)
    assert "int32 offsets" in candidates.FORWARD["skinny"].refuses(problem)
    assert candidates.FORWARD["skinny"].refuses(candidates.Problem(torch.device("cuda"), 64, 2**24, 128, 16)) is None


@triton.jit
def _column_kernel(t_ptr, out_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = tl.arange(0, ROWS)
    t = tl.load(t_ptr + rows[:, None] * COLS + tl.arange(0, COLS)[None, :])
    for j in tl.static_range(COLS):
        tl.store(out_ptr + j * ROWS + rows, nf4_skinny._column(t, j))


@pytest.mark.parametrize("cols", [1, 2, 4, 8])
def test_column_picks_each_column(cols, device):
    t = torch.randn(16, cols, device=device)
    out = torch.full((cols, 16), float("nan"), device=device)
    _column_kernel[(1,)](t, out, ROWS=16, COLS=cols)
    assert torch.equal(out.cpu(), t.cpu().t())


@pytest.mark.parametrize("blocksize,double_quant", [(32, True), (64, True), (64, False), (256, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_codes_rounded_then_scaled_in_fp32_stay_within_the_dtype_bound(dtype, blocksize, double_quant):
    """The GPU build's arithmetic for fp16 / bf16 activations, emulated in torch (the interpreter widens bf16
    to fp32, so it cannot show it): each code rounded to x's dtype, each block's product accumulated in fp32
    and scaled by the block's fp32 absmax. Its error against the float64 reference stays within the dtype's
    bound, and within 5% of the error of the exactly dequantized weight (``code * absmax`` rounded once,
    what the other candidates multiply)."""
    n, k, m = 256, 1024, 48
    weight = NF4Weight.quantize(torch.randn(n, k) * 0.02, blocksize, double_quant)
    x = torch.randn(m, k).to(dtype)
    ref = x.double() @ weight.dequantize(torch.float64).t()
    exact = (x.float() @ weight.dequantize(dtype).float().t()).double()
    codes = weight.code[unpack_nibbles(weight.packed, n * k).long()].reshape(n, k).to(dtype).float()
    absmax = weight.absmax_float32().reshape(n, k // blocksize)
    scaled = torch.zeros(n, m)
    for b in range(k // blocksize):
        cols = slice(b * blocksize, (b + 1) * blocksize)
        scaled += absmax[:, b:b + 1] * (codes[:, cols] @ x[:, cols].float().t())
    err_scaled, err_exact = relative_error(scaled.t(), ref), relative_error(exact, ref)
    assert err_scaled <= REL_TOL[dtype]
    assert err_scaled <= 1.05 * err_exact, (err_scaled, err_exact)
