"""The ``dx`` candidates (``ops.candidates.DX``: the fused dx kernel among them) and the layer's backward
(``ops.lora_nf4.layer_backward``) against the float64 reference.

Every comparison follows flash-attention's rule (``testing.assert_like_torch``): the error against
``reference.lora_backward`` in float64 on the same inputs (the same regenerated dropout mask included)
within a small multiple of plain torch's own error at the activation dtype. Shapes are small on purpose
(interpreter speed) but hit what matters on a GPU: M = 1 and M not a multiple
of the tile, N not a multiple of the reduction tile, ranks that need padding, partial K tiles.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lora_triton.kernels import lora_dx
from lora_triton.ops import candidates, configs
from lora_triton.ops.dropout import as_seed, dropout_mask
from lora_triton.ops.lora_nf4 import layer_backward
from lora_triton.reference import lora_backward, lora_forward
from lora_triton.testing import REL_TOL, assert_like_torch, random_lora_problem, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEED = 20261107
FIELDS = ("dx", "dA", "dB", "dbias")

pytestmark = pytest.mark.usefixtures("poisoned_kernel_outputs")  # outputs start as NaN (conftest)


def _setup(device, m, n, k, r, dtype=torch.float32, blocksize=64, double_quant=True, dropout_p=0.0):
    """Fresh random inputs, the forward's ``S``, an upstream gradient, and the mask (or None)."""
    prob = random_lora_problem(m, n, k, r, dtype, blocksize, double_quant, bias=False, device=device)
    mask = dropout_mask(SEED, dropout_p, m, k, device) if dropout_p > 0 else None
    _, s = lora_forward(prob["x"], prob["weight"], prob["lora_a"], prob["lora_b"], prob["scale"],
                        dropout_mask=mask)
    prob.update(s=s, mask=mask, dropout_p=dropout_p, dy=torch.randn(m, n, device=device).to(dtype))
    return prob


def _references(prob, needs=(True, True, True, True)):
    """``(float64, plain torch at the problem's dtype)`` ``LoRAGrads``."""
    f64 = lambda t: t.to(torch.float64)  # noqa: E731
    ref = lora_backward(f64(prob["dy"]), f64(prob["x"]), prob["weight"], f64(prob["lora_a"]), f64(prob["lora_b"]),
                        prob["scale"], f64(prob["s"]), prob["mask"], needs=needs)
    plain = lora_backward(prob["dy"], prob["x"], prob["weight"], prob["lora_a"], prob["lora_b"], prob["scale"],
                          prob["s"], prob["mask"], needs=needs)
    return ref, plain


def _dx(prob, method="fused", seed=SEED, dropout_p=None):
    return candidates.run_dx(method, prob["dy"], prob["x"], prob["weight"], prob["lora_a"], prob["lora_b"],
                             prob["scale"], prob["dropout_p"] if dropout_p is None else dropout_p, seed)


def _check_dx(prob, method="fused", what=""):
    dx = _dx(prob, method)
    ref, plain = _references(prob)
    assert dx.dtype == prob["x"].dtype
    assert_like_torch(dx, ref.dx, plain.dx, what=what or f"dx ({method})")


# ---------------------------------------------------------------------------- correctness
DX_METHODS = list(candidates.DX)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dx_matches_reference_over_m(device, dtype, m, dropout_p):
    _check_dx(_setup(device, m, n=130, k=192, r=8, dtype=dtype, dropout_p=dropout_p), what=f"dx M={m} p={dropout_p}")


@pytest.mark.parametrize(("blocksize", "double_quant"), [(64, True), (64, False), (128, True), (128, False)])
@pytest.mark.parametrize("r", [1, 8, 16, 64])
def test_dx_matches_reference_over_rank_and_format(device, r, blocksize, double_quant):
    # fp16 where the rank is odd-sized against the padded tile, fp32 elsewhere; dropout on for
    # half of the cases so both constexpr branches meet every format.
    dtype = torch.float16 if r in (1, 16) else torch.float32
    dropout_p = 0.1 if double_quant else 0.0
    prob = _setup(device, 17, n=77, k=256, r=r, dtype=dtype, blocksize=blocksize,
                  double_quant=double_quant, dropout_p=dropout_p)
    _check_dx(prob, what=f"dx r={r} bs={blocksize} dq={double_quant}")


@pytest.mark.parametrize("m, n, k", [(32, 128, 128), (16, 64, 192), (48, 130, 128), (20, 64, 64)],
                         ids=["all-even", "even-m-n", "even-m-ragged-n", "ragged-m-even-n"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dx_even_and_ragged_tiles(device, m, n, k, dtype):
    """The ``EVEN_*`` specializations (no bound tests where M, N, K fill their tiles) beside the
    masked ones, under the interpreter's 16x64x64 tile and a GPU's autotuned tiles alike."""
    _check_dx(_setup(device, m, n=n, k=k, r=8, dtype=dtype, dropout_p=0.2), what=f"dx {m}x{n}x{k}")


@pytest.mark.parametrize("r", [33, 100, 128])
def test_dx_large_unaligned_ranks(device, r):
    _check_dx(_setup(device, 5, n=40, k=128, r=r, dtype=torch.float16, dropout_p=0.5))


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
    monkeypatch.setattr(configs, "interpreter_tile", lambda kernel: dict(tiles))
    _check_dx(_setup(device, 70, n=50, k=192, r=4, dtype=torch.float32, dropout_p=0.2))


@given(m=st.integers(1, 40), n=st.integers(1, 150), k_blocks=st.integers(1, 3), r=st.integers(1, 128),
       dtype=st.sampled_from(DTYPES), double_quant=st.booleans(), dropout=st.booleans(),
       method=st.sampled_from(DX_METHODS))
def test_dx_random_shapes(device, m, n, k_blocks, r, dtype, double_quant, dropout, method):
    prob = _setup(device, m, n, 64 * k_blocks, r, dtype, 64, double_quant, 0.3 if dropout else 0.0)
    p = candidates.Problem(prob["x"].device, m, n, 64 * k_blocks, r, dtype, dropout)
    if candidates.DX[method].supports(p):
        _check_dx(prob, method, what=f"dx ({method}) M={m} N={n} K={64 * k_blocks} r={r}")


def test_dx_mask_is_the_forward_mask(device):
    """The regenerated mask is the one ``dropout_mask`` gives for the seed: a different seed
    or no mask at all gives a result far outside the bound (so the tests above can fail)."""
    prob = _setup(device, 17, n=64, k=128, r=16, dtype=torch.float32, dropout_p=0.5)
    ref, plain = _references(prob)
    assert_like_torch(_dx(prob), ref.dx, plain.dx)
    assert relative_error(_dx(prob, seed=SEED + 1), ref.dx) > 100 * REL_TOL[torch.float32]
    assert relative_error(_dx(prob, dropout_p=0.0), ref.dx) > 100 * REL_TOL[torch.float32]


@pytest.mark.parametrize("method", DX_METHODS)
def test_dx_zero_rows(device, method):
    prob = _setup(device, 0, n=20, k=64, r=2)
    assert _dx(prob, method).shape == (0, 64)


@pytest.mark.parametrize(("m", "n", "k", "max_m", "max_k"), [
    (1, 20, 64, 16, 64),        # decode-like: 16-row tiles, K tile no wider than K
    (40, 4096, 4096, 64, 128),  # M caps the rows; N and K keep every width
    (4096, 4096, 4096, 128, 128),
])
def test_gpu_config_pruning(m, n, k, max_m, max_k):
    """The autotuner only tries tiles that fit the problem; every config is a legal GPU dot
    (all tile dims >= 16) and some config always survives."""
    tuned = [t.triton() for t in configs.tuned_tiles("dx")]
    assert all(min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) >= 16 for c in tuned)
    kept = lora_dx._prune_configs(tuned, {"M": m, "N": n, "K": k})
    assert kept
    assert max(c.kwargs["BLOCK_M"] for c in kept) == max_m
    assert max(c.kwargs["BLOCK_K"] for c in kept) <= max_k
    if m >= 4096:
        assert len(kept) == len(tuned)


def test_k_beyond_int32_panel_offsets_is_a_limit_of_the_fused_kernel(monkeypatch):
    """A K whose weight panel holds more than 2**31 packed bytes is refused by ``supports`` (the in-panel
    byte offsets are int32: past 2**31 - 1 they would wrap to other bytes)."""
    monkeypatch.setattr(candidates, "can_launch", lambda device: True)
    widest = max(t.blocks["BLOCK_N"] for t in (*configs.tuned_tiles("dx"), *configs.configs().dx["fixed"]))
    assert lora_dx.max_k(widest) == 2**25  # 128 rows * 2**25 / 2 bytes = 2**31: offsets up to 2**31 - 1
    fused = candidates.DX["fused"]
    assert fused.refuses(candidates.Problem(torch.device("cuda"), 2, 1, 2**25, 1, blocksize=4096)) is None
    reason = fused.refuses(candidates.Problem(torch.device("cuda"), 2, 1, 2**25 + 4096, 1, blocksize=4096))
    assert "K <= 33554432" in reason


# ---------------------------------------------------------------------------- whole backward


NEEDS = list(itertools.product([False, True], repeat=4))


def _layer_backward(prob, needs=(True, True, True, True), dy=None):
    seed = as_seed(SEED, prob["x"].device) if prob["dropout_p"] > 0 else None
    op = candidates.Operands(prob["x"], prob["weight"], prob["lora_a"], prob["lora_b"], None, prob["scale"],
                             prob["dropout_p"], seed)
    return layer_backward(op, prob["dy"] if dy is None else dy, prob["s"], "triton", needs)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dx_method", DX_METHODS)
@pytest.mark.parametrize("needs", NEEDS, ids=lambda t: "".join("1" if b else "0" for b in t))
def test_backward_every_needs_combination(device, monkeypatch, needs, dx_method, dropout_p):
    """Each requires_grad combination (x, A, B, bias) asks for a subset; exactly that subset
    comes back, and it matches the reference, whichever candidate computes dx (the rule's first)."""
    monkeypatch.setitem(candidates.RULE, "dx", (dx_method, "torch"))
    prob = _setup(device, 3, n=70, k=128, r=4, dtype=torch.float32, dropout_p=dropout_p)
    grads = _layer_backward(prob, needs)
    ref, plain = _references(prob, needs)
    for name, needed in zip(FIELDS, needs):
        got = getattr(grads, name)
        if not needed:
            assert got is None, f"{name} computed although not asked for"
            continue
        assert got.dtype == torch.float32
        assert_like_torch(got, getattr(ref, name), getattr(plain, name), what=name)


@pytest.mark.parametrize("dx_method", DX_METHODS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_all_grads_per_dtype(device, monkeypatch, dtype, dropout_p, dx_method):
    monkeypatch.setitem(candidates.RULE, "dx", (dx_method, "torch"))
    prob = _setup(device, 17, n=100, k=128, r=8, dtype=dtype, blocksize=128, dropout_p=dropout_p)
    grads = _layer_backward(prob)
    ref, plain = _references(prob)
    for name in FIELDS:
        got = getattr(grads, name)
        assert got.dtype == dtype, name
        assert_like_torch(got, getattr(ref, name), getattr(plain, name), what=f"{name} {dtype} p={dropout_p}")


@pytest.mark.parametrize("layout", ["expanded", "transposed"])
def test_backward_accepts_strided_dy(device, layout):
    """The gradient of ``y.sum()`` arrives as a stride-0 expansion; a transposed gradient is
    non-contiguous. The backward makes it contiguous; results match the reference."""
    m, n = 9, 60
    prob = _setup(device, m, n=n, k=128, r=8, dtype=torch.float32, dropout_p=0.2)
    if layout == "expanded":
        dy = torch.ones(1, device=device).expand(m, n)
    else:
        dy = torch.randn(n, m, device=device).t()
    assert not dy.is_contiguous()
    prob["dy"] = dy
    grads = _layer_backward(prob)
    ref, plain = _references(prob)
    for name in FIELDS:
        assert_like_torch(getattr(grads, name), getattr(ref, name), getattr(plain, name), what=name)


# ---------------------------------------------------------------------------- bad inputs


@pytest.fixture
def good(device):
    prob = _setup(device, 4, n=24, k=64, r=4)
    return dict(name="fused", dy=prob["dy"], x=prob["x"], weight=prob["weight"], lora_a=prob["lora_a"],
                lora_b=prob["lora_b"], scale=prob["scale"])


def _call(args, **changes):
    return candidates.run_dx(**{**args, **changes})


BAD_INPUTS = [
    ("dy int", lambda a: {"dy": a["dy"].to(torch.int32)}, TypeError, "dy must have dtype"),
    ("dy fp64", lambda a: {"dy": a["dy"].double()}, TypeError, "dy must have dtype"),
    ("dy list", lambda a: {"dy": a["dy"].tolist()}, TypeError, "dy must be a torch.Tensor"),
    ("dy 1-D", lambda a: {"dy": a["dy"][0]}, ValueError, r"dy must have shape \[4, 24\]"),
    ("dy wrong N", lambda a: {"dy": a["dy"][:, :-1].contiguous()}, ValueError, r"dy must have shape \[4, 24\]"),
    ("dy transposed", lambda a: {"dy": a["dy"].t().contiguous().t()}, ValueError, "dy must be contiguous"),
    ("dy stride 0", lambda a: {"dy": torch.ones(1, device=a["dy"].device).expand(4, 24)}, ValueError,
     "dy has a zero stride"),
    ("dy other device", lambda a: {"dy": a["dy"].to("meta")}, ValueError, "dy must be on"),
    ("a dtype", lambda a: {"lora_a": a["lora_a"].half()}, TypeError, "lora_a must have dtype"),
    ("a wrong K", lambda a: {"lora_a": a["lora_a"][:, :32].contiguous()}, ValueError,
     r"lora_a must be \[r, in_features=64\]"),
    ("a non-contiguous", lambda a: {"lora_a": torch.randn(64, 4, device=a["dy"].device).t()}, ValueError,
     "lora_a must be contiguous"),
    ("rank 0", lambda a: {"lora_a": a["lora_a"][:0], "lora_b": a["lora_b"][:, :0]}, ValueError, "with r >= 1"),
    ("rank 129 in the fused kernel", lambda a: {"lora_a": torch.randn(129, 64, device=a["dy"].device),
                                                "lora_b": torch.randn(24, 129, device=a["dy"].device)},
     ValueError, r"'fused' cannot run this problem: its rank tile lives in registers: r <= 128"),
    ("dense weight", lambda a: {"weight": a["weight"].dequantize(torch.float32)}, TypeError,
     "weight must be an NF4Weight"),
    ("weight on another device", lambda a: {"weight": a["weight"].to("meta")}, ValueError, "weight is on meta"),
    ("dropout 1", lambda a: {"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\)"),
    ("dropout negative", lambda a: {"dropout_p": -0.1}, ValueError, "dropout_p must be"),
    ("scale tensor", lambda a: {"scale": torch.tensor(1.0)}, TypeError, "scale must be a Python number"),
    ("scale nan", lambda a: {"scale": float("nan")}, ValueError, "scale must be finite"),
    ("seed float", lambda a: {"seed": 1.5}, TypeError, "seed must be a Python int"),
    ("K not a multiple of the block size",
     lambda a: {"weight": type(a["weight"]).quantize(torch.randn(24, 96), 64).to(a["dy"].device),
                "x": torch.randn(4, 96, device=a["dy"].device), "lora_a": torch.randn(4, 96, device=a["dy"].device)},
     ValueError, r"K=96 is not a multiple of the block size 64"),
]


@pytest.mark.parametrize(("change", "error", "message"), [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(good, change, error, message):
    with pytest.raises(error, match=message):
        _call(good, **change(good))


def test_good_inputs_pass(good):
    """The fixture the bad-input cases start from is itself valid (so each case fails for its one change)."""
    dx = _call(good)
    assert dx.shape == (4, 64) and torch.isfinite(dx).all()
