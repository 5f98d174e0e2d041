"""Forward kernels (lora_triton/kernels/lora_forward.py) against the float64 reference.

On CPU every kernel runs through Triton's interpreter (conftest sets TRITON_INTERPRET=1);
bf16 goes through the runtime's widening shim. Outputs are poisoned with NaN, so an element a
kernel forgets to write fails the comparison. Shapes stay small: the interpreter costs about
1.6 ms per program per K step.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lora_triton.format import NF4Weight
from lora_triton.kernels import lora_forward as lf
from lora_triton.kernels.dropout import dropout_mask
from lora_triton.kernels.nf4_dequant import dequantize_nf4, dequantize_nf4_merged
from lora_triton.kernels.runtime import kernel_dtype
from lora_triton.ops import dispatch
from lora_triton.reference import lora_forward
from lora_triton.testing import assert_rel_close, random_lora_problem

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
METHODS = list(lf.METHODS) + [None]  # None: whatever the dispatcher picks

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


def reference(problem: dict, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, S)`` of the reference in float64 on the problem's (already rounded) inputs."""
    f64 = lambda t: None if t is None else t.to(torch.float64)  # noqa: E731
    return lora_forward(f64(problem["x"]), problem["weight"], f64(problem["lora_a"]), f64(problem["lora_b"]),
                        problem["scale"], f64(problem["bias"]), mask)


def run_kernel(problem: dict, method: str | None, dropout_p: float = 0.0, seed: int = 0):
    """The named candidate, or (``None``) whatever ``ops.dispatch`` chooses for the problem."""
    config = None
    if method is None:
        x, weight, r = problem["x"], problem["weight"], problem["lora_a"].shape[0]
        method, config = dispatch.choose(dispatch.Problem(x.device, x.shape[0], *weight.shape, r, x.dtype))
    return lf.lora_forward_triton(problem["x"], problem["weight"], problem["lora_a"], problem["lora_b"],
                                  problem["scale"], problem["bias"], dropout_p, seed, method, config)


def check_against_reference(problem: dict, method: str | None, dropout_p: float = 0.0, seed: int = 0) -> None:
    x = problem["x"]
    mask = dropout_mask(seed, dropout_p, *x.shape, x.device) if dropout_p > 0 else None
    y, s = run_kernel(problem, method, dropout_p, seed)
    y_ref, s_ref = reference(problem, mask)
    # Every method rounds S to the dtype it computes in (x's; fp32 for bf16 under the interpreter)
    # before the B product, S being what the backward reads; the float64 reference does the same
    # here, or a y whose terms cancel (N = 1, say) would turn that rounding into a large relative error.
    s_kernel = s_ref.to(kernel_dtype(x.dtype, x.device)).double()
    y_ref = y_ref + problem["scale"] * (s_kernel - s_ref) @ problem["lora_b"].double().t()
    assert y.dtype == s.dtype == x.dtype
    assert_rel_close(s, s_ref, x.dtype, what=f"S ({method})")
    assert_rel_close(y, y_ref, x.dtype, what=f"y ({method})")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-N{}-K{}-r{}-bs{}-dq{:d}-bias{:d}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_matches_reference(case, dtype, method, device):
    m, n, k, r, blocksize, double_quant, bias = case
    problem = random_lora_problem(m, n, k, r, dtype, blocksize, double_quant, bias, device)
    check_against_reference(problem, method)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_dropout_matches_reference_with_the_seed_mask(dtype, method, device):
    problem = random_lora_problem(17, 72, 128, 8, dtype, 64, True, True, device)
    check_against_reference(problem, method, dropout_p=0.25, seed=7)


@pytest.mark.parametrize("method", lf.METHODS)
def test_dropout_seed_decides_the_mask(method, device):
    problem = random_lora_problem(4, 72, 128, 8, torch.float32, 64, True, False, device)
    y1, s1 = run_kernel(problem, method, 0.5, seed=1)
    y1_again, s1_again = run_kernel(problem, method, 0.5, seed=1)
    _, s2 = run_kernel(problem, method, 0.5, seed=2)
    _, s_nodrop = run_kernel(problem, method)
    assert_rel_close(s1_again, s1, torch.float32, what="same seed")
    assert_rel_close(y1_again, y1, torch.float32, what="same seed")
    assert not torch.allclose(s1, s2), "another seed must give another mask"
    assert not torch.allclose(s1, s_nodrop), "dropout must change S"


def test_all_candidates_agree_with_each_other(device):
    problem = random_lora_problem(20, 136, 192, 32, torch.float32, 64, True, True, device)
    results = {method: run_kernel(problem, method) for method in lf.METHODS}
    y0, s0 = results["fused"]
    for method, (y, s) in results.items():
        assert_rel_close(y, y0, torch.float32, what=f"y {method} vs fused")
        assert_rel_close(s, s0, torch.float32, what=f"S {method} vs fused")


def test_dispatch_falls_back_to_reference_where_triton_cannot_run(monkeypatch):
    import lora_triton.kernels.runtime as runtime

    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    problem = random_lora_problem(5, 40, 128, 4, torch.float32, 64, True, True)
    assert dispatch.choose_method(torch.device("cpu"), 5, 40, 128, 4) == "torch"
    check_against_reference(problem, None)
    with pytest.raises(RuntimeError, match="LoRA dropout needs the Triton mask generator"):
        run_kernel(problem, None, dropout_p=0.1)
    with pytest.raises(RuntimeError, match="cannot run Triton kernels on cpu"):
        run_kernel(problem, "fused")
    plain, old_name = run_kernel(problem, "torch"), run_kernel(problem, "reference")  # the old name is an alias
    assert all(torch.equal(a, b) for a, b in zip(plain, old_name))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((70, 192), 64), ((33, 256), 128), ((5, 96), 32), ((3, 4096), 4096)],
                         ids=["bs64", "bs128", "bs32", "bs4096"])
def test_dequantize_kernel_is_bit_exact(dtype, double_quant, shape, blocksize, device):
    """Every block size from 32 (many blocks per program) to 4096 (one block, 2048 bytes, per program)."""
    weight = NF4Weight.quantize(torch.randn(*shape), blocksize, double_quant).to(device)
    out = dequantize_nf4(weight, dtype)
    assert out.dtype == dtype
    assert torch.equal(out, weight.dequantize(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize,r", [((70, 192), 64, 8), ((33, 256), 128, 1), ((5, 96), 32, 64),
                                               ((3, 4096), 4096, 17), ((130, 128), 64, 128), ((600, 64), 64, 4)],
                         ids=["bs64-r8", "bs128-r1", "bs32-r64", "bs4096-r17", "bs64-r128", "two-row-programs"])
def test_merged_weight_matches_float64(dtype, double_quant, shape, blocksize, r, device):
    """``W + s * B @ A`` summed in fp32 and rounded once: within the dtype's bound of the float64 sum;
    with ``s = 0`` it is the dequantized weight bit for bit."""
    n, k = shape
    weight = NF4Weight.quantize(torch.randn(*shape), blocksize, double_quant).to(device)
    a = (torch.randn(r, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(n, r, device=device).to(dtype)
    out = dequantize_nf4_merged(weight, a, b, 0.7, dtype)
    assert out.dtype == dtype
    assert_rel_close(out, weight.dequantize(torch.float64) + 0.7 * b.double() @ a.double(), dtype, what="W + sBA")
    assert torch.equal(dequantize_nf4_merged(weight, a, b, 0.0, dtype), dequantize_nf4(weight, dtype))


MERGED_BAD = [
    ("a-wrong-K", lambda a, b: dict(lora_a=a[:, :64].contiguous()), ValueError, r"lora_a must have shape \[4, 128\]"),
    ("b-wrong-N", lambda a, b: dict(lora_b=b[:30]), ValueError, r"lora_b must have shape \[40, 4\]"),
    ("a-dtype", lambda a, b: dict(lora_a=a.half()), TypeError, r"lora_a must have dtype in \['torch.float32'\]"),
    ("b-non-contiguous", lambda a, b: dict(lora_b=b.t().contiguous().t()), ValueError, r"lora_b must be contiguous"),
    ("a-stride-0", lambda a, b: dict(lora_a=a[:1].expand(4, 128)), ValueError, r"lora_a has a zero stride"),
    ("a-1d", lambda a, b: dict(lora_a=a[0]), ValueError, r"lora_a must be \[r, K=128\] with r >= 1"),
    ("scale-tensor", lambda a, b: dict(scale=torch.tensor(0.5)), TypeError, r"scale must be a Python number"),
    ("scale-nan", lambda a, b: dict(scale=float("nan")), ValueError, r"scale must be finite, got nan"),
    ("scale-inf", lambda a, b: dict(scale=float("inf")), ValueError, r"scale must be finite, got inf"),
    ("table", lambda a, b: dict(table="prmt"), ValueError, r"table must be one of"),
    ("dtype", lambda a, b: dict(dtype=torch.float64), TypeError, r"float16, bfloat16 or float32 only"),
]


@pytest.mark.parametrize("label,change,error,message", MERGED_BAD, ids=[c[0] for c in MERGED_BAD])
def test_merged_weight_bad_inputs_raise(label, change, error, message, device):
    weight = NF4Weight.quantize(torch.randn(40, 128), 64, True).to(device)
    a, b = torch.randn(4, 128, device=device), torch.randn(40, 4, device=device)
    args = dict(weight=weight, lora_a=a, lora_b=b, scale=0.5, dtype=torch.float32)
    with pytest.raises(error, match=message):
        dequantize_nf4_merged(**{**args, **change(a, b)})


def test_dequantize_refuses_an_unknown_table(device):
    weight = NF4Weight.quantize(torch.randn(8, 64), 64, True).to(device)
    with pytest.raises(ValueError, match=r"table must be one of \('gather', 'shfl'\) or None"):
        dequantize_nf4(weight, torch.float32, "prmt")


def test_empty_batch(device):
    problem = random_lora_problem(0, 40, 128, 4, torch.float32, 64, True, False, device)
    y, s = run_kernel(problem, "fused")
    assert y.shape == (0, 40) and s.shape == (0, 4)


def test_padded_rank():
    assert [lf.padded_rank(r) for r in (1, 16, 17, 64, 100, 128)] == [16, 16, 32, 64, 128, 128]


@given(m=st.integers(1, 80), n=st.integers(1, 200), k_blocks=st.integers(1, 4), r=st.integers(1, 128),
       blocksize=st.sampled_from([32, 64, 128]), double_quant=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from(DTYPES), method=st.sampled_from(METHODS), dropout=st.sampled_from([0.0, 0.3]))
def test_random_shapes(m, n, k_blocks, r, blocksize, double_quant, bias, dtype, method, dropout, device):
    k = min(k_blocks * blocksize, 256 // blocksize * blocksize)
    # inputs seeded by the example, so hypothesis can replay a failure
    seed = (m * 211 + n) * 131 + r
    problem = random_lora_problem(m, n, k, r, dtype, blocksize, double_quant, bias, device, seed=seed)
    check_against_reference(problem, method, dropout_p=dropout, seed=m + n)


# ---------------------------------------------------------------------- bad inputs
def _valid_call(device, **changes) -> dict:
    """Keyword arguments of a valid call (M=4, N=40, K=128, r=4, fp32, bias), then ``changes``."""
    problem = random_lora_problem(4, 40, 128, 4, torch.float32, 64, True, True, device)
    args = dict(x2d=problem["x"], weight=problem["weight"], lora_a=problem["lora_a"], lora_b=problem["lora_b"],
                scale=problem["scale"], bias=problem["bias"])
    args.update(changes)
    return args


def _randn(*shape, device, dtype=torch.float32):
    return torch.randn(*shape, device=device, dtype=dtype)


# (label, changes(device, x) -> kwargs replacing those of a valid call, error type, message pattern)
BAD_INPUTS = [
    ("x-int-dtype", lambda d, x: dict(x2d=x.to(torch.int32)), TypeError, r"x must have dtype in"),
    ("x-float64", lambda d, x: dict(x2d=x.double()), TypeError, r"x must have dtype in"),
    ("x-not-a-tensor", lambda d, x: dict(x2d=x.tolist()), TypeError, r"x must be a torch.Tensor"),
    ("x-3d", lambda d, x: dict(x2d=x[None]), ValueError, r"x must be 2-D \[M, K\]"),
    ("x-wrong-K", lambda d, x: dict(x2d=_randn(4, 256, device=d)), ValueError,
     r"x must have shape \[4, 128\], got \[4, 256\]"),
    ("x-non-contiguous", lambda d, x: dict(x2d=_randn(4, 256, device=d)[:, ::2]), ValueError, r"x must be contiguous"),
    ("x-stride-0", lambda d, x: dict(x2d=x[:1].expand(4, 128)), ValueError, r"x has a zero stride"),
    ("x-other-device", lambda d, x: dict(x2d=x.to("meta")), ValueError, r"NF4 weight must be on meta"),
    ("lora_a-dtype", lambda d, x: dict(lora_a=_randn(4, 128, device=d, dtype=torch.float16)), TypeError,
     r"lora_a must have dtype in \['torch.float32'\]"),
    ("lora_a-wrong-K", lambda d, x: dict(lora_a=_randn(4, 64, device=d)), ValueError,
     r"lora_a must have shape \[4, 128\]"),
    ("lora_a-non-contiguous", lambda d, x: dict(lora_a=_randn(128, 4, device=d).t()), ValueError,
     r"lora_a must be contiguous"),
    ("mismatched-ranks", lambda d, x: dict(lora_b=_randn(40, 8, device=d)), ValueError, r"mismatched LoRA ranks"),
    ("lora_b-wrong-N", lambda d, x: dict(lora_b=_randn(41, 4, device=d)), ValueError,
     r"lora_b must have shape \[40, 4\]"),
    ("lora_b-stride-0", lambda d, x: dict(lora_b=_randn(1, 4, device=d).expand(40, 4)), ValueError,
     r"lora_b has a zero stride"),
    ("rank-129", lambda d, x: dict(lora_a=_randn(129, 128, device=d), lora_b=_randn(40, 129, device=d)),
     ValueError, r"LoRA rank must be in 1..128, got r=129"),
    ("bias-shape", lambda d, x: dict(bias=_randn(41, device=d)), ValueError, r"bias must have shape \[40\]"),
    ("bias-dtype", lambda d, x: dict(bias=_randn(40, device=d, dtype=torch.float16)), TypeError,
     r"bias must have dtype in"),
    ("K-not-multiple-of-blocksize",
     lambda d, x: dict(weight=NF4Weight.quantize(torch.randn(40, 96), 64, True).to(d), x2d=_randn(4, 96, device=d)),
     ValueError, r"K divisible by the NF4 block size: K=96, blocksize=64"),
    ("weight-not-nf4", lambda d, x: dict(weight=_randn(40, 128, device=d)), TypeError,
     r"weight must be an NF4Weight, got Tensor"),
    ("scale-tensor", lambda d, x: dict(scale=torch.tensor(0.5)), TypeError, r"scale must be a Python float"),
    ("dropout-1", lambda d, x: dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    ("negative-seed", lambda d, x: dict(dropout_p=0.1, seed=-1), ValueError, r"seed must be an int"),
    ("unknown-method", lambda d, x: dict(method="cublas"), ValueError, r"unknown method 'cublas'"),
    ("config-for-autotuned", lambda d, x: dict(method="fused", config={"split_k": 2}), ValueError, r"takes no config"),
    ("skinny-config-key", lambda d, x: dict(method="skinny", config={"blok_n": 64}), ValueError,
     r"unknown keys \['blok_n'\]"),
    ("skinny-block-k", lambda d, x: dict(method="skinny", config={"block_k": 48}), ValueError,
     r"block_k must be a power of two >= 16, got 48"),
    ("skinny-split-0", lambda d, x: dict(method="skinny", config={"split_k": 0}), ValueError,
     r"split_k must be a positive int, got 0"),
    ("skinny-table", lambda d, x: dict(method="skinny", config={"table": "prmt"}), ValueError,
     r"table must be one of \('gather', 'shfl'\), got 'prmt'"),
]


@pytest.mark.parametrize("label,changes,error,pattern", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_rejects_bad_input(label, changes, error, pattern, device):
    x = _valid_call(device)["x2d"]
    with pytest.raises(error, match=pattern):
        lf.lora_forward_triton(**_valid_call(device, **changes(device, x)))
