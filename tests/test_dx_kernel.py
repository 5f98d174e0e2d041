"""The fused ``dx`` kernel and ``lora_backward_triton`` against the float64 reference.

Every comparison is ``||out - ref|| / ||ref||`` against ``reference.lora_backward`` run in
float64 on the same inputs (the same regenerated dropout mask included), bounded by
``REL_TOL`` of the activation dtype. Shapes are small on purpose (interpreter speed, see
shared/TRITON_CPU.md) but hit what matters on a GPU: M = 1 and M not a multiple of the tile,
N not a multiple of the reduction tile, ranks that need padding, partial K tiles.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lora_triton.format import NF4Weight
from lora_triton.format.codebooks import nf4_code
from lora_triton.kernels import lora_dx
from lora_triton.kernels.dropout import dropout_mask
from lora_triton.kernels.lora_dx import lora_backward_triton, lora_dx_triton
from lora_triton.reference import lora_backward, lora_forward
from lora_triton.testing import REL_TOL, assert_rel_close, poison_, random_lora_problem, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEED = 20261107
FIELDS = ("dx", "dA", "dB", "dbias")


def _setup(device, m, n, k, r, dtype=torch.float32, blocksize=64, double_quant=True, dropout_p=0.0):
    """Fresh random inputs, the forward's ``S``, an upstream gradient, and the mask (or None)."""
    prob = random_lora_problem(m, n, k, r, dtype, blocksize, double_quant, bias=False, device=device)
    mask = dropout_mask(SEED, dropout_p, m, k, device) if dropout_p > 0 else None
    _, s = lora_forward(prob["x"], prob["weight"], prob["lora_a"], prob["lora_b"], prob["scale"],
                        dropout_mask=mask)
    prob.update(s=s, mask=mask, dropout_p=dropout_p, dy=torch.randn(m, n, device=device).to(dtype))
    return prob


def _reference(prob, needs=(True, True, True, True)):
    f64 = lambda t: t.to(torch.float64)  # noqa: E731
    return lora_backward(f64(prob["dy"]), f64(prob["x"]), prob["weight"], f64(prob["lora_a"]),
                         f64(prob["lora_b"]), prob["scale"], f64(prob["s"]), prob["mask"], needs=needs)


def _dx_kernel(prob, **kwargs):
    """dx through the launcher, with G computed as the ops layer computes it (dy @ B)."""
    g = prob["dy"] @ prob["lora_b"]
    return lora_dx_triton(prob["dy"], prob["weight"], prob["lora_a"], g, prob["scale"],
                          prob["dropout_p"], SEED, **kwargs)


def _poisoned_out(prob):
    m, k = prob["x"].shape
    return poison_(torch.empty(m, k, dtype=prob["dy"].dtype, device=prob["dy"].device))


# ---------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dx_matches_reference_over_m(device, dtype, m, dropout_p):
    prob = _setup(device, m, n=130, k=192, r=8, dtype=dtype, dropout_p=dropout_p)
    out = _poisoned_out(prob)
    dx = _dx_kernel(prob, out=out)
    assert dx is out and dx.dtype == dtype
    assert_rel_close(dx, _reference(prob).dx, dtype, what=f"dx M={m} p={dropout_p}")


@pytest.mark.parametrize(("blocksize", "double_quant"), [(64, True), (64, False), (128, True), (128, False)])
@pytest.mark.parametrize("r", [1, 8, 16, 64])
def test_dx_matches_reference_over_rank_and_format(device, r, blocksize, double_quant):
    # fp16 where the rank is odd-sized against the padded tile, fp32 elsewhere; dropout on for
    # half of the cases so both constexpr branches meet every format.
    dtype = torch.float16 if r in (1, 16) else torch.float32
    dropout_p = 0.1 if double_quant else 0.0
    prob = _setup(device, 17, n=77, k=256, r=r, dtype=dtype, blocksize=blocksize,
                  double_quant=double_quant, dropout_p=dropout_p)
    dx = _dx_kernel(prob, out=_poisoned_out(prob))
    assert_rel_close(dx, _reference(prob).dx, dtype, what=f"dx r={r} bs={blocksize} dq={double_quant}")


@pytest.mark.parametrize("m, n, k", [(32, 128, 128), (16, 64, 192), (48, 130, 128), (20, 64, 64)],
                         ids=["all-even", "even-m-n", "even-m-ragged-n", "ragged-m-even-n"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dx_even_and_ragged_tiles(device, m, n, k, dtype):
    """The ``EVEN_*`` specializations (no bound tests where M, N, K fill their tiles) beside the
    masked ones, under the interpreter's 16x64x64 tile and a GPU's autotuned tiles alike."""
    prob = _setup(device, m, n=n, k=k, r=8, dtype=dtype, dropout_p=0.2)
    assert_rel_close(_dx_kernel(prob, out=_poisoned_out(prob)), _reference(prob).dx, dtype, what=f"dx {m}x{n}x{k}")


@pytest.mark.parametrize("r", [33, 100, 128])
def test_dx_large_unaligned_ranks(device, r):
    prob = _setup(device, 5, n=40, k=128, r=r, dtype=torch.float16, dropout_p=0.5)
    assert_rel_close(_dx_kernel(prob, out=_poisoned_out(prob)), _reference(prob).dx, torch.float16)


@pytest.mark.parametrize("tiles", [
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 2},   # partial K tile (K=192)
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1},    # no grouping
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 3},    # last group smaller than GROUP_M
], ids=["bk128", "group1", "group3"])
def test_dx_other_tilings(device, monkeypatch, tiles):
    """The one interpreter config divides K; GPU configs need not: check other tilings and
    grouped orderings (each output tile written exactly once, none skipped)."""
    if device.type != "cpu":
        pytest.skip("tile override applies to the interpreter path; the GPU autotunes")
    monkeypatch.setattr(lora_dx, "INTERPRETER_CONFIG", tiles)
    prob = _setup(device, 70, n=50, k=192, r=4, dtype=torch.float32, dropout_p=0.2)
    assert_rel_close(_dx_kernel(prob, out=_poisoned_out(prob)), _reference(prob).dx, torch.float32)


@given(m=st.integers(1, 40), n=st.integers(1, 150), k_blocks=st.integers(1, 3), r=st.integers(1, 128),
       dtype=st.sampled_from(DTYPES), double_quant=st.booleans(), dropout=st.booleans())
def test_dx_random_shapes(device, m, n, k_blocks, r, dtype, double_quant, dropout):
    prob = _setup(device, m, n, 64 * k_blocks, r, dtype, 64, double_quant, 0.3 if dropout else 0.0)
    assert_rel_close(_dx_kernel(prob, out=_poisoned_out(prob)), _reference(prob).dx, dtype,
                     what=f"dx M={m} N={n} K={64 * k_blocks} r={r}")


def test_dx_mask_is_the_forward_mask(device):
    """The regenerated mask is the one ``dropout_mask`` gives for the seed: a different seed
    or no mask at all gives a result far outside the bound (so the tests above can fail)."""
    prob = _setup(device, 17, n=64, k=128, r=16, dtype=torch.float32, dropout_p=0.5)
    ref = _reference(prob).dx
    g = prob["dy"] @ prob["lora_b"]
    args = (prob["dy"], prob["weight"], prob["lora_a"], g, prob["scale"])
    assert_rel_close(lora_dx_triton(*args, 0.5, SEED), ref, torch.float32)
    assert relative_error(lora_dx_triton(*args, 0.5, SEED + 1), ref) > 100 * REL_TOL[torch.float32]
    assert relative_error(lora_dx_triton(*args, 0.0, SEED), ref) > 100 * REL_TOL[torch.float32]


def test_dx_zero_rows(device):
    prob = _setup(device, 1, n=20, k=64, r=2)
    dy = prob["dy"][:0]
    dx = lora_dx_triton(dy, prob["weight"], prob["lora_a"], dy @ prob["lora_b"], prob["scale"])
    assert dx.shape == (0, 64)


@pytest.mark.parametrize(("m", "n", "k", "max_m", "max_k"), [
    (1, 20, 64, 16, 64),        # decode-like: 16-row tiles, K tile no wider than K
    (40, 4096, 4096, 64, 128),  # M caps the rows; N and K keep every width
    (4096, 4096, 4096, 128, 128),
])
def test_gpu_config_pruning(m, n, k, max_m, max_k):
    """The autotuner only tries tiles that fit the problem; every config is a legal GPU dot
    (all tile dims >= 16) and some config always survives."""
    configs = lora_dx.gpu_configs()
    assert all(min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) >= 16 for c in configs)
    kept = lora_dx._prune_configs(configs, {"M": m, "N": n, "K": k})
    assert kept
    assert max(c.kwargs["BLOCK_M"] for c in kept) == max_m
    assert max(c.kwargs["BLOCK_K"] for c in kept) <= max_k
    if m >= 4096:
        assert len(kept) == len(configs)


# ---------------------------------------------------------------------------- whole backward


NEEDS = list(itertools.product([False, True], repeat=4))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dx_method", lora_dx.DX_METHODS)
@pytest.mark.parametrize("needs", NEEDS, ids=lambda t: "".join("1" if b else "0" for b in t))
def test_backward_every_needs_combination(device, needs, dx_method, dropout_p):
    """Each requires_grad combination (x, A, B, bias) asks for a subset; exactly that subset
    comes back, and it matches the reference, whichever way dx is computed."""
    prob = _setup(device, 3, n=70, k=128, r=4, dtype=torch.float32, dropout_p=dropout_p)
    grads = lora_backward_triton(prob["dy"], prob["x"], prob["weight"], prob["lora_a"], prob["lora_b"],
                                 prob["scale"], prob["s"], prob["dropout_p"], SEED, needs=needs, dx_method=dx_method)
    ref = _reference(prob, needs)
    for name, needed in zip(FIELDS, needs):
        got = getattr(grads, name)
        if not needed:
            assert got is None, f"{name} computed although not asked for"
            continue
        assert got.dtype == torch.float32
        assert_rel_close(got, getattr(ref, name), torch.float32, what=name)


@pytest.mark.parametrize("dx_method", lora_dx.DX_METHODS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_all_grads_per_dtype(device, dtype, dropout_p, dx_method):
    prob = _setup(device, 17, n=100, k=128, r=8, dtype=dtype, blocksize=128, dropout_p=dropout_p)
    grads = lora_backward_triton(prob["dy"], prob["x"], prob["weight"], prob["lora_a"], prob["lora_b"],
                                 prob["scale"], prob["s"], dropout_p, SEED, dx_method=dx_method)
    ref = _reference(prob)
    for name in FIELDS:
        got = getattr(grads, name)
        assert got.dtype == dtype, name
        assert_rel_close(got, getattr(ref, name), dtype, what=f"{name} {dtype} p={dropout_p}")


@pytest.mark.parametrize("layout", ["expanded", "transposed"])
def test_backward_accepts_strided_dy(device, layout):
    """The gradient of ``y.sum()`` arrives as a stride-0 expansion; a transposed gradient is
    non-contiguous. lora_backward_triton makes it contiguous; results match the reference."""
    m, n = 9, 60
    prob = _setup(device, m, n=n, k=128, r=8, dtype=torch.float32, dropout_p=0.2)
    if layout == "expanded":
        dy = torch.ones(1, device=device).expand(m, n)
    else:
        dy = torch.randn(n, m, device=device).t()
    assert not dy.is_contiguous()
    prob["dy"] = dy
    grads = lora_backward_triton(dy, prob["x"], prob["weight"], prob["lora_a"], prob["lora_b"],
                                 prob["scale"], prob["s"], prob["dropout_p"], SEED)
    ref = _reference(prob)
    for name in FIELDS:
        assert_rel_close(getattr(grads, name), getattr(ref, name), torch.float32, what=name)


def test_backward_casts_mixed_dtypes_to_x(device):
    """fp32 adapter weights and an fp32 gradient with fp16 activations: everything is computed
    in x's dtype, as the reference does."""
    prob = _setup(device, 5, n=48, k=64, r=4, dtype=torch.float16)
    a32, b32 = prob["lora_a"].float(), prob["lora_b"].float()
    dy32 = prob["dy"].float()
    grads = lora_backward_triton(dy32, prob["x"], prob["weight"], a32, b32, prob["scale"], prob["s"])
    ref = _reference(prob)
    for name in FIELDS:
        assert getattr(grads, name).dtype == torch.float16
        assert_rel_close(getattr(grads, name), getattr(ref, name), torch.float16, what=name)


# ---------------------------------------------------------------------------- bad inputs


@pytest.fixture
def good(device):
    prob = _setup(device, 4, n=24, k=64, r=4)
    g = prob["dy"] @ prob["lora_b"]
    return dict(dy=prob["dy"], weight=prob["weight"], lora_a=prob["lora_a"], g=g, scale=prob["scale"])


def _call(args, **changes):
    return lora_dx_triton(**{**args, **changes})


BAD_INPUTS = [
    ("dy int", lambda a: {"dy": a["dy"].to(torch.int32)}, TypeError, "dy must have dtype"),
    ("dy fp64", lambda a: {"dy": a["dy"].double()}, TypeError, "dy must have dtype"),
    ("dy list", lambda a: {"dy": a["dy"].tolist()}, TypeError, "dy must be a torch.Tensor"),
    ("dy 1-D", lambda a: {"dy": a["dy"][0]}, ValueError, "dy must be 2-D"),
    ("dy wrong N", lambda a: {"dy": a["dy"][:, :-1].contiguous()}, ValueError, r"dy must have shape \[4, 24\]"),
    ("dy transposed", lambda a: {"dy": a["dy"].t().contiguous().t()}, ValueError, "dy must be contiguous"),
    ("dy stride 0", lambda a: {"dy": torch.ones(1, device=a["dy"].device).expand(4, 24)}, ValueError,
     "dy has a zero stride"),
    ("dy other device", lambda a: {"dy": a["dy"].to("meta")}, (ValueError, RuntimeError), "meta"),
    ("a dtype", lambda a: {"lora_a": a["lora_a"].half()}, TypeError, "lora_a must have dtype"),
    ("a wrong K", lambda a: {"lora_a": a["lora_a"][:, :32].contiguous()}, ValueError,
     r"lora_a must have shape \[4, 64\]"),
    ("a non-contiguous", lambda a: {"lora_a": torch.randn(64, 4, device=a["dy"].device).t()}, ValueError,
     "lora_a must be contiguous"),
    ("rank 0", lambda a: {"lora_a": a["lora_a"][:0], "g": a["g"][:, :0]}, ValueError, r"rank must be in 1\.\.128"),
    ("rank 129", lambda a: {"lora_a": torch.randn(129, 64, device=a["dy"].device),
                            "g": torch.randn(4, 129, device=a["dy"].device)}, ValueError, "rank must be in"),
    ("g dtype", lambda a: {"g": a["g"].half()}, TypeError, "g must have dtype"),
    ("g wrong rank", lambda a: {"g": a["g"][:, :3].contiguous()}, ValueError, r"g must have shape \[4, 4\]"),
    ("g wrong M", lambda a: {"g": a["g"][:3]}, ValueError, r"g must have shape \[4, 4\]"),
    ("dense weight", lambda a: {"weight": a["weight"].dequantize(torch.float32)}, TypeError,
     "weight must be an NF4Weight"),
    ("dropout 1", lambda a: {"dropout_p": 1.0}, ValueError, r"dropout_p must be a number in \[0, 1\)"),
    ("dropout negative", lambda a: {"dropout_p": -0.1}, ValueError, "dropout_p must be"),
    ("scale tensor", lambda a: {"scale": torch.tensor(1.0)}, TypeError, "scale must be a finite Python number"),
    ("scale nan", lambda a: {"scale": float("nan")}, TypeError, "scale must be a finite"),
    ("seed float", lambda a: {"seed": 1.5}, TypeError, "seed must be a Python int"),
    ("out dtype", lambda a: {"out": torch.empty(4, 64, device=a["dy"].device, dtype=torch.float16)}, TypeError,
     "out must have dtype"),
    ("out shape", lambda a: {"out": torch.empty(4, 65, device=a["dy"].device)}, ValueError,
     r"out must have shape \[4, 64\]"),
]


@pytest.mark.parametrize(("change", "error", "message"), [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(good, change, error, message):
    with pytest.raises(error, match=message):
        _call(good, **change(good))


def test_k_not_multiple_of_blocksize_raises(device):
    weight = NF4Weight.quantize(torch.randn(24, 96), blocksize=64).to(device)
    dy = torch.randn(4, 24, device=device)
    a = torch.randn(4, 96, device=device)
    with pytest.raises(ValueError, match=r"divisible by the NF4 block size: K=96, blocksize=64"):
        lora_dx_triton(dy, weight, a, torch.randn(4, 4, device=device), 1.0)


def test_k_beyond_int32_panel_offsets_raises(device):
    """A K whose 128-row weight panel holds more than 2**31 packed bytes is refused before any launch
    (the in-panel byte offsets are int32: past 2**31 - 1 they would wrap to other bytes)."""
    assert lora_dx.MAX_FUSED_K == 2**25  # 128 rows * 2**25 / 2 bytes = 2**31: offsets up to 2**31 - 1
    k = 2**25 + 4096
    weight = NF4Weight(packed=torch.randint(0, 256, (k // 2,), dtype=torch.uint8), absmax=torch.rand(k // 4096) + 0.5,
                       code=nf4_code(), shape=(1, k), blocksize=4096, dtype=torch.float32).to(device)
    dy = torch.randn(2, 1, device=device)
    with pytest.raises(ValueError, match=r"fused dx kernel takes K <= 33554432 .* got K=33558528"):
        lora_dx_triton(dy, weight, torch.randn(1, k, device=device), torch.randn(2, 1, device=device), 1.0)


def test_weight_on_other_device_raises(good):
    weight = good["weight"].to("meta")
    with pytest.raises(ValueError, match="NF4 weight must be on"):
        _call(good, weight=weight)


def test_good_inputs_pass(good):
    """The fixture the bad-input cases start from is itself valid (so each case fails for its one change)."""
    dx = _call(good)
    assert dx.shape == (4, 64) and torch.isfinite(dx).all()
