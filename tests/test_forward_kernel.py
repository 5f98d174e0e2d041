"""Forward candidates (``ops.candidates.FORWARD``) and the dequant kernels against the float64 reference.

On CPU every kernel runs through Triton's interpreter (conftest sets TRITON_INTERPRET=1); bf16 goes
through the runtime's widening shim. Outputs are poisoned with NaN, so an element a kernel forgets to
write fails the comparison. Each output is held to flash-attention's rule (``testing.assert_like_torch``):
its error against float64 within a small multiple of plain torch's at the same dtype on the same inputs.
Shapes stay small: the interpreter costs about 1.6 ms per program per K step.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lora_triton.format import NF4Weight
from lora_triton.kernels.runtime import kernel_dtype, padded_rank
from lora_triton.ops import candidates, dispatch
from lora_triton.ops.dropout import dropout_mask
from lora_triton.reference import lora_forward
from lora_triton.testing import assert_like_torch, assert_rel_close, random_lora_problem

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: Every forward candidate that runs on the CPU through the interpreter (``native`` is CUDA-only:
#: tests/test_native.py), and None: whatever the dispatcher picks.
METHODS = [name for name in candidates.FORWARD if name != "native"] + [None]

# (M, N, K, r, blocksize, double_quant, bias): M covers 1, 3, 16, 17 and 64+; N is never a
# multiple of the 64-wide interpreter tile; K=160 leaves a partial K tile; ranks 1..64.
CASES = [
    (1, 200, 256, 8, 64, True, False),
    (3, 72, 128, 1, 128, False, True),
    (16, 130, 256, 16, 128, True, True),
    (17, 200, 160, 64, 32, False, False),
    (80, 100, 128, 16, 64, True, True),
]


pytestmark = pytest.mark.usefixtures("poisoned_kernel_outputs")  # outputs start as NaN (conftest)


def references(problem: dict, mask: torch.Tensor | None = None) -> tuple[tuple, tuple]:
    """``((y, S) in float64, (y, S) of plain torch at x's dtype)`` on the problem's (rounded) inputs."""
    f64 = lambda t: None if t is None else t.to(torch.float64)  # noqa: E731
    args = (problem["x"], problem["weight"], problem["lora_a"], problem["lora_b"], problem["scale"], problem["bias"])
    ref = lora_forward(*(f64(a) if isinstance(a, torch.Tensor) else a for a in args), mask)
    return ref, lora_forward(*args, mask)


def run_candidate(problem: dict, method: str | None, dropout_p: float = 0.0, seed: int = 0):
    """The named candidate, or (``None``) whatever ``ops.dispatch`` chooses for the problem."""
    config = None
    x = problem["x"]
    if method is None:
        weight, r = problem["weight"], problem["lora_a"].shape[0]
        chosen, config = dispatch.choose("forward", candidates.Problem(x.device, x.shape[0], *weight.shape, r, x.dtype,
                                                                       dropout_p > 0, weight.blocksize))
        method = chosen.name
    return candidates.run_forward(method, x, problem["weight"], problem["lora_a"], problem["lora_b"],
                                  problem["scale"], problem["bias"], dropout_p, seed, config)


def check_against_reference(problem: dict, method: str | None, dropout_p: float = 0.0, seed: int = 0) -> None:
    x = problem["x"]
    mask = dropout_mask(seed, dropout_p, *x.shape, x.device) if dropout_p > 0 else None
    y, s = run_candidate(problem, method, dropout_p, seed)
    (y_ref, s_ref), (y_plain, s_plain) = references(problem, mask)
    # Every method rounds S to the dtype it computes in (x's; fp32 for bf16 under the interpreter)
    # before the B product, S being what the backward reads; the float64 reference does the same
    # here, or a y whose terms cancel (N = 1, say) would turn that rounding into a large relative error.
    s_kernel = s_ref.to(kernel_dtype(x.dtype, x.device)).double()
    y_ref = y_ref + problem["scale"] * (s_kernel - s_ref) @ problem["lora_b"].double().t()
    assert y.dtype == s.dtype == x.dtype
    assert_like_torch(s, s_ref, s_plain, what=f"S ({method})")
    assert_like_torch(y, y_ref, y_plain, what=f"y ({method})")


def _supported(method: str | None, problem: dict, dropout_p: float = 0.0) -> bool:
    if method is None:
        return True
    x, weight = problem["x"], problem["weight"]
    p = candidates.Problem(x.device, x.shape[0], *weight.shape, problem["lora_a"].shape[0], x.dtype, dropout_p > 0,
                           weight.blocksize)
    return candidates.FORWARD[method].supports(p)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-N{}-K{}-r{}-bs{}-dq{:d}-bias{:d}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_matches_reference(case, dtype, method, device):
    m, n, k, r, blocksize, double_quant, bias = case
    problem = random_lora_problem(m, n, k, r, dtype, blocksize, double_quant, bias, device)
    if not _supported(method, problem):
        pytest.skip(f"{method} does not take this problem")
    check_against_reference(problem, method)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_dropout_matches_reference_with_the_seed_mask(dtype, method, device):
    problem = random_lora_problem(17, 72, 128, 8, dtype, 64, True, True, device)
    if not _supported(method, problem, 0.25):
        pytest.skip(f"{method} has no dropout")
    check_against_reference(problem, method, dropout_p=0.25, seed=7)


@pytest.mark.parametrize("method", [m for m in METHODS if m is not None and m != "merged"])
def test_dropout_seed_decides_the_mask(method, device):
    problem = random_lora_problem(4, 72, 128, 8, torch.float32, 64, True, False, device)
    y1, s1 = run_candidate(problem, method, 0.5, seed=1)
    y1_again, s1_again = run_candidate(problem, method, 0.5, seed=1)
    _, s2 = run_candidate(problem, method, 0.5, seed=2)
    _, s_nodrop = run_candidate(problem, method)
    assert torch.equal(s1_again, s1) and torch.equal(y1_again, y1), "the same seed must give the same output"
    assert not torch.allclose(s1, s2), "another seed must give another mask"
    assert not torch.allclose(s1, s_nodrop), "dropout must change S"


def test_the_candidates_agree_with_each_other(device):
    problem = random_lora_problem(20, 136, 192, 32, torch.float32, 64, True, True, device)
    results = {method: run_candidate(problem, method) for method in METHODS if method is not None}
    y0, s0 = results["torch"]
    for method, (y, s) in results.items():
        assert_rel_close(y, y0, torch.float32, what=f"y {method} vs torch")
        assert_rel_close(s, s0, torch.float32, what=f"S {method} vs torch")


def test_the_experimental_fused_kernel_matches_reference(device):
    """Not dispatched, timed by the benchmark: it must still compute the layer."""
    problem = random_lora_problem(17, 72, 128, 8, torch.float32, 64, True, True, device)
    y, s = candidates.run_experimental_fused(problem["x"], problem["weight"], problem["lora_a"], problem["lora_b"],
                                             problem["scale"], problem["bias"])
    (y_ref, s_ref), (y_plain, s_plain) = references(problem)
    assert_like_torch(s, s_ref, s_plain, what="S (fused)")
    assert_like_torch(y, y_ref, y_plain, what="y (fused)")


def test_where_triton_cannot_run_only_torch_supports_the_problem(monkeypatch):
    import lora_triton.kernels.runtime as runtime

    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    problem = random_lora_problem(5, 40, 128, 4, torch.float32, 64, True, True)
    p = candidates.Problem(torch.device("cpu"), 5, 40, 128, 4)
    assert dispatch.choose("forward", p)[0].name == "torch"
    assert [name for name, c in candidates.FORWARD.items() if c.supports(p)] == ["torch"]
    check_against_reference(problem, None)
    check_against_reference(problem, None, dropout_p=0.1, seed=3)  # torch's CPU generator draws the mask
    with pytest.raises(ValueError, match="'skinny' cannot run this problem: Triton cannot run on cpu"):
        run_candidate(problem, "skinny")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((70, 192), 64), ((33, 256), 128), ((5, 96), 32), ((3, 4096), 4096)],
                         ids=["bs64", "bs128", "bs32", "bs4096"])
def test_dequantize_kernel_is_bit_exact(dtype, double_quant, shape, blocksize, device):
    """Every block size from 32 (many blocks per program) to 4096 (one block, 2048 bytes, per program)."""
    weight = NF4Weight.quantize(torch.randn(*shape), blocksize, double_quant).to(device)
    out = candidates.dequantize_kernel(weight, dtype)
    assert out.dtype == dtype
    assert torch.equal(out, weight.dequantize(dtype))


def _merged(weight, a, b, scale, dtype):
    op = candidates.Operands(torch.empty(0, weight.shape[1], dtype=dtype, device=a.device), weight, a.to(dtype),
                             b.to(dtype), None, scale, 0.0, None)
    return candidates.merged_weight(op)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize,r", [((70, 192), 64, 8), ((33, 256), 128, 1), ((5, 96), 32, 64),
                                               ((3, 4096), 4096, 17), ((130, 128), 64, 128), ((600, 64), 64, 4)],
                         ids=["bs64-r8", "bs128-r1", "bs32-r64", "bs4096-r17", "bs64-r128", "two-row-programs"])
def test_merged_weight_matches_float64(dtype, double_quant, shape, blocksize, r, device):
    """``W + s * B @ A`` summed in fp32 and rounded once: within twice plain torch's error (fp32 sum,
    rounded once to the dtype) of the float64 sum; with ``s = 0`` the dequantized weight bit for bit."""
    n, k = shape
    weight = NF4Weight.quantize(torch.randn(*shape), blocksize, double_quant).to(device)
    a = (torch.randn(r, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(n, r, device=device).to(dtype)
    kdt = kernel_dtype(dtype, torch.device(device))
    out = _merged(weight, a, b, 0.7, kdt).to(dtype)
    ref = weight.dequantize(torch.float64) + 0.7 * b.double() @ a.double()
    plain = (weight.dequantize(torch.float32) + 0.7 * b.float() @ a.float()).to(dtype)
    assert_like_torch(out, ref, plain, what="W + sBA")
    assert torch.equal(_merged(weight, a, b, 0.0, kdt).to(dtype), weight.dequantize(dtype))


def test_empty_batch(device):
    problem = random_lora_problem(0, 40, 128, 4, torch.float32, 64, True, False, device)
    for method in METHODS:
        y, s = run_candidate(problem, method)
        assert y.shape == (0, 40) and s.shape == (0, 4), method


def test_padded_rank():
    assert [padded_rank(r) for r in (1, 16, 17, 64, 100, 128)] == [16, 16, 32, 64, 128, 128]


@given(m=st.integers(1, 80), n=st.integers(1, 200), k_blocks=st.integers(1, 4), r=st.integers(1, 128),
       blocksize=st.sampled_from([32, 64, 128]), double_quant=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from(DTYPES), method=st.sampled_from(METHODS), dropout=st.sampled_from([0.0, 0.3]))
def test_random_shapes(m, n, k_blocks, r, blocksize, double_quant, bias, dtype, method, dropout, device):
    k = min(k_blocks * blocksize, 256 // blocksize * blocksize)
    # inputs seeded by the example, so hypothesis can replay a failure
    seed = (m * 211 + n) * 131 + r
    problem = random_lora_problem(m, n, k, r, dtype, blocksize, double_quant, bias, device, seed=seed)
    if _supported(method, problem, dropout):
        check_against_reference(problem, method, dropout_p=dropout, seed=m + n)


# ---------------------------------------------------------------------- bad inputs
def _valid_call(device, **changes) -> dict:
    """Keyword arguments of a valid call (M=4, N=40, K=128, r=4, fp32, bias), then ``changes``."""
    problem = random_lora_problem(4, 40, 128, 4, torch.float32, 64, True, True, device)
    args = dict(name="dequant", x=problem["x"], weight=problem["weight"], lora_a=problem["lora_a"],
                lora_b=problem["lora_b"], scale=problem["scale"], bias=problem["bias"])
    args.update(changes)
    return args


def _randn(*shape, device, dtype=torch.float32):
    return torch.randn(*shape, device=device, dtype=dtype)


# (label, changes(device, x) -> kwargs replacing those of a valid call, error type, message pattern)
BAD_INPUTS = [
    ("x-int-dtype", lambda d, x: dict(x=x.to(torch.int32)), TypeError, r"x must have dtype in"),
    ("x-float64-in-a-kernel", lambda d, x: dict(x=x.double()), TypeError, r"lora_a must have dtype in"),
    ("x-not-a-tensor", lambda d, x: dict(x=x.tolist()), TypeError, r"x must be a torch.Tensor"),
    ("x-3d", lambda d, x: dict(x=x[None]), ValueError, r"x must be 2-D \[M, K\]"),
    ("x-wrong-K", lambda d, x: dict(x=_randn(4, 256, device=d)), ValueError,
     r"x must have shape \[4, 128\], got \[4, 256\]"),
    ("x-non-contiguous", lambda d, x: dict(x=_randn(4, 256, device=d)[:, ::2]), ValueError, r"x must be contiguous"),
    ("x-stride-0", lambda d, x: dict(x=x[:1].expand(4, 128)), ValueError, r"x has a zero stride"),
    ("x-other-device", lambda d, x: dict(x=x.to("meta")), ValueError, r"weight is on .* but x is on meta"),
    ("lora_a-dtype", lambda d, x: dict(lora_a=_randn(4, 128, device=d, dtype=torch.float16)), TypeError,
     r"lora_a must have dtype in \['torch.float32'\]"),
    ("lora_a-wrong-K", lambda d, x: dict(lora_a=_randn(4, 64, device=d)), ValueError,
     r"lora_a must be \[r, in_features=128\]"),
    ("lora_a-non-contiguous", lambda d, x: dict(lora_a=_randn(128, 4, device=d).t()), ValueError,
     r"lora_a must be contiguous"),
    ("mismatched-ranks", lambda d, x: dict(lora_b=_randn(40, 8, device=d)), ValueError,
     r"lora_b \[out_features=40, r\]"),
    ("lora_b-stride-0", lambda d, x: dict(lora_b=_randn(1, 4, device=d).expand(40, 4)), ValueError,
     r"lora_b has a zero stride"),
    ("skinny-rank-129", lambda d, x: dict(name="skinny", lora_a=_randn(129, 128, device=d),
                                          lora_b=_randn(40, 129, device=d)),
     ValueError, r"'skinny' cannot run this problem: its rank tile lives in registers: r <= 128, got r=129"),
    ("bias-shape", lambda d, x: dict(bias=_randn(41, device=d)), ValueError, r"bias must have shape \[40\]"),
    ("bias-dtype", lambda d, x: dict(bias=_randn(40, device=d, dtype=torch.float16)), TypeError,
     r"bias must have dtype in"),
    ("K-not-multiple-of-blocksize",
     lambda d, x: dict(weight=NF4Weight.quantize(torch.randn(40, 96), 64, True).to(d), x=_randn(4, 96, device=d),
                       lora_a=_randn(4, 96, device=d)),
     ValueError, r"K=96 is not a multiple of the block size 64"),
    ("weight-not-nf4", lambda d, x: dict(weight=_randn(40, 128, device=d)), TypeError,
     r"weight must be an NF4Weight, got Tensor"),
    ("scale-tensor", lambda d, x: dict(scale=torch.tensor(0.5)), TypeError, r"scale must be a Python number"),
    ("scale-nan", lambda d, x: dict(scale=float("nan")), ValueError, r"scale must be finite, got nan"),
    ("dropout-1", lambda d, x: dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    ("negative-seed", lambda d, x: dict(dropout_p=0.1, seed=-1), ValueError, r"seed must be in \[0, 2\*\*31\)"),
    ("unknown-candidate", lambda d, x: dict(name="cublas"), KeyError, r"cublas"),
    ("merged-with-dropout", lambda d, x: dict(name="merged", dropout_p=0.1), ValueError,
     r"'merged' cannot run this problem: the merged weight computes x @ A\^T"),
    ("config-for-a-candidate-without", lambda d, x: dict(config={"split_k": 2}), ValueError, r"takes no config"),
]


@pytest.mark.parametrize("label,changes,error,pattern", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_rejects_bad_input(label, changes, error, pattern, device):
    x = _valid_call(device)["x"]
    args = _valid_call(device, **changes(device, x))
    with pytest.raises(error, match=pattern):
        candidates.run_forward(args.pop("name"), args.pop("x"), **args)
