"""The custom op: gradients for every requires_grad combination on both backends, gradcheck,
opcheck, torch.compile without graph breaks, autocast and mixed quant-state dtypes."""

from __future__ import annotations

import itertools

import pytest
import torch

from lora_triton.format import NF4Weight
from lora_triton.ops import lora_nf4_linear, resolve_backend
from lora_triton.ops.lora_nf4 import _dropout_mask
from lora_triton.reference import lora_backward, lora_forward
from lora_triton.testing import REL_TOL, random_lora_problem, relative_error

COMBOS = [c for c in itertools.product([True, False], [True, False], [True, False], ["none", "frozen", "train"])
          if any(c[:3]) or c[3] == "train"]


def _leaves(p, need_x, need_a, need_b, bias_mode):
    x = p["x"].clone().requires_grad_(need_x)
    a = p["lora_a"].clone().requires_grad_(need_a)
    b = p["lora_b"].clone().requires_grad_(need_b)
    bias = None if bias_mode == "none" else p["bias"].clone().requires_grad_(bias_mode == "train")
    return x, a, b, bias


def _triton_dropout_mask(seed, p, m, k, like):
    from lora_triton.kernels.dropout import dropout_mask

    return dropout_mask(seed, p, m, k, like.device, torch.float64)


def _expected(p, dy, seed, dropout_p, backend, with_bias=True):
    """float64 reference output and gradients, with the mask the backend regenerates."""
    as64 = {key: v.double() if isinstance(v, torch.Tensor) else v for key, v in p.items()}
    if not with_bias:
        as64["bias"] = None
    m, k = p["x"].shape
    mask = None
    if dropout_p > 0:
        mask = (_triton_dropout_mask(seed, dropout_p, m, k, as64["x"]) if backend == "triton"
                else _dropout_mask("torch", seed, dropout_p, m, k, as64["x"])).double()
    y, s = lora_forward(as64["x"], p["weight"], as64["lora_a"], as64["lora_b"], p["scale"], as64["bias"], mask)
    grads = lora_backward(dy.double(), as64["x"], p["weight"], as64["lora_a"], as64["lora_b"], p["scale"], s, mask)
    return y, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "triton", "triton-skinny", "triton-merged", "triton-fused"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("need_x, need_a, need_b, bias_mode", COMBOS)
def test_every_requires_grad_combination(backend, dropout_p, need_x, need_a, need_b, bias_mode, dtype, device,
                                         monkeypatch):
    """``triton-skinny``: the Triton backend with every forward dispatched to the skinny kernel;
    ``triton-merged``: forward and dx dispatched to the merged weight ``W + s * B @ A``;
    ``triton-fused``: the fused tile forward and the fused dx kernel (in-loop NF4 decode)."""
    if backend != "triton" and backend.startswith("triton-"):
        from lora_triton.ops import dispatch

        candidate = backend.removeprefix("triton-")
        monkeypatch.setitem(dispatch.RULE, "forward", candidate)
        if candidate in dispatch.DX_CANDIDATES:
            monkeypatch.setitem(dispatch.RULE, "dx", candidate)
        backend = "triton"
    p = random_lora_problem(17, 48, 64, 8, dtype=dtype, bias=True, device=device, seed=7)
    x, a, b, bias = _leaves(p, need_x, need_a, need_b, bias_mode)
    seed = 1234
    monkeypatch.setattr(torch, "randint", lambda *args, **kw: torch.tensor(seed))  # pin the dropout seed
    y = lora_nf4_linear(x, p["weight"], a, b, p["scale"], bias, dropout_p, training=True, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, ref = _expected(p, dy, seed, dropout_p, backend, with_bias=bias is not None)
    assert relative_error(y, y_ref) < REL_TOL[dtype]
    for tensor, wanted, expected in [(x, need_x, ref.dx), (a, need_a, ref.dA), (b, need_b, ref.dB)]:
        if wanted:
            assert relative_error(tensor.grad, expected) < REL_TOL[dtype]
        else:
            assert tensor.grad is None
    if bias is not None:
        if bias_mode == "train":
            assert relative_error(bias.grad, ref.dbias) < REL_TOL[dtype]
        else:
            assert bias.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_the_triton_backend(dtype, device):
    p = random_lora_problem(17, 40, 128, 16, dtype=dtype, bias=True, device=device, seed=3)
    x, a, b, bias = _leaves(p, True, True, True, "train")
    y = lora_nf4_linear(x, p["weight"], a, b, p["scale"], bias, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, ref = _expected(p, dy, 0, 0.0, "triton")
    assert y.dtype == dtype and relative_error(y, y_ref) < REL_TOL[dtype]
    for got, expected in [(x.grad, ref.dx), (a.grad, ref.dA), (b.grad, ref.dB), (bias.grad, ref.dbias)]:
        assert got.dtype == dtype and relative_error(got, expected) < REL_TOL[dtype]


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck_float64(dropout_p):
    p = random_lora_problem(4, 6, 64, 3, dtype=torch.float64, bias=True, seed=2)
    torch.manual_seed(0)

    def fn(x, a, b, bias):
        torch.manual_seed(0)  # the same dropout seed on every evaluation
        return lora_nf4_linear(x, p["weight"], a, b, p["scale"], bias, dropout_p, training=True, backend="torch")

    inputs = tuple(t.clone().requires_grad_() for t in (p["x"], p["lora_a"], p["lora_b"], p["bias"]))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)


def test_opcheck_forward_and_backward_ops():
    from lora_triton.ops.lora_nf4 import _backward_op, _forward_op, _weight_tensors

    p = random_lora_problem(5, 24, 64, 4, bias=True, seed=4)
    w = p["weight"]
    seed = torch.tensor(3)
    fwd_args = (p["x"].requires_grad_(), *_weight_tensors(w), w.offset_value, 24, 64, 64,
                p["lora_a"].requires_grad_(), p["lora_b"].requires_grad_(), p["scale"], p["bias"], 0.1, seed,
                "torch")
    torch.library.opcheck(_forward_op, fwd_args)
    _, s = lora_forward(p["x"].detach(), w, p["lora_a"].detach(), p["lora_b"].detach(), p["scale"])
    bwd_args = (torch.randn(5, 24), p["x"].detach(), s, *_weight_tensors(w), w.offset_value, 24, 64, 64,
                p["lora_a"].detach(), p["lora_b"].detach(), p["scale"], 0.1, seed, "torch", [True, False, True, True])
    torch.library.opcheck(_backward_op, bwd_args)


class _TinyModel(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        from lora_triton.modules import LoRALinear4bit

        self.up = LoRALinear4bit.from_linear(torch.nn.Linear(64, 128), r=8, init_lora_weights=False, backend=backend)
        self.down = LoRALinear4bit.from_linear(torch.nn.Linear(128, 64), r=4, init_lora_weights=False, backend=backend)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_matches_eager(backend, device):
    torch._dynamo.reset()
    model = _TinyModel(backend).to(device)
    x = torch.randn(3, 5, 64, device=device)
    eager = model(x)
    eager.square().mean().backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().mean().backward()
    assert relative_error(out, eager) < 1e-6
    for p, g in zip([p for p in model.parameters() if p.requires_grad], eager_grads):
        assert relative_error(p.grad, g) < 1e-5


def test_torch_compile_inductor_on_cpu():
    torch._dynamo.reset()
    model = _TinyModel("torch")
    x = torch.randn(4, 64)
    compiled = torch.compile(model, fullgraph=True)
    assert relative_error(compiled(x), model(x)) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_runs_in_the_autocast_dtype(backend, device):
    p = random_lora_problem(9, 32, 64, 4, bias=True, seed=5, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = lora_nf4_linear(p["x"], p["weight"], p["lora_a"], p["lora_b"], p["scale"], p["bias"], backend=backend)
    assert y.dtype == torch.bfloat16
    y_ref, _ = _expected(p, torch.zeros(9, 32, device=device), 0, 0.0, backend)
    assert relative_error(y, y_ref) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("state_dtype, act_dtype", [(torch.bfloat16, torch.float16), (torch.float32, torch.float16),
                                                    (torch.float16, torch.float32)])
def test_activation_dtype_differs_from_quant_state_dtype(backend, state_dtype, act_dtype, device):
    w = torch.randn(40, 128, dtype=state_dtype) / 11
    weight = NF4Weight.quantize(w, 64).to(device)
    x = torch.randn(6, 128, dtype=act_dtype, device=device)
    a = torch.randn(4, 128, device=device) / 11  # fp32 adapter, as PEFT keeps it
    b = torch.randn(40, 4, device=device) / 2
    y = lora_nf4_linear(x, weight, a, b, 0.5, backend=backend)
    y_ref, _ = lora_forward(x.double(), weight, a.double(), b.double(), 0.5)
    assert y.dtype == act_dtype and relative_error(y, y_ref) < REL_TOL[act_dtype]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stride_zero_and_non_contiguous_gradients(backend, device):
    p = random_lora_problem(8, 24, 64, 4, seed=6, device=device)
    x = p["x"].t().contiguous().t().requires_grad_()  # non-contiguous input
    a = p["lora_a"].clone().requires_grad_()
    y = lora_nf4_linear(x, p["weight"], a, p["lora_b"], p["scale"], backend=backend)
    y.sum().backward()  # the gradient of .sum() is an expanded, stride-0 tensor
    _, ref = _expected(p, torch.ones(8, 24, device=device), 0, 0.0, backend)
    assert relative_error(x.grad, ref.dx) < REL_TOL[torch.float32]
    assert relative_error(a.grad, ref.dA) < REL_TOL[torch.float32]


def test_backend_selection_and_errors(device, monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend(cpu, "torch") == "torch"
    assert resolve_backend(cpu, "reference") == "torch"  # the backend's old name stays an alias
    assert resolve_backend(cpu, "auto") == "torch"  # CPU users get plain torch
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(cpu, "cuda-graphs")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        resolve_backend(cpu, "triton")


def test_wrong_in_features_is_a_clear_error():
    p = random_lora_problem(4, 8, 64, 2, seed=1)
    with pytest.raises(ValueError, match="in_features=64"):
        lora_nf4_linear(torch.randn(4, 65), p["weight"], p["lora_a"], p["lora_b"], 1.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_is_refused_not_wrong(backend, device):
    """S is saved without a graph, so a second derivative through the layer would silently miss
    every path through S: the op refuses instead (gradgradcheck would fail on a wrong number)."""
    p = random_lora_problem(3, 8, 64, 2, dtype=torch.float64 if backend == "torch" else torch.float32, seed=8,
                            device=device)
    x, a, b = (p[k].clone().requires_grad_() for k in ("x", "lora_a", "lora_b"))
    y = lora_nf4_linear(x, p["weight"], a, b, p["scale"], backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    y.square().sum().backward()  # first derivatives still work after the refusal
    assert x.grad is not None and a.grad is not None
    if backend == "torch":
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.gradgradcheck(lambda x, a, b: lora_nf4_linear(x, p["weight"], a, b, p["scale"],
                                                                         backend=backend), (x, a, b))


def test_reference_function_refuses_double_backward():
    from lora_triton.reference import lora_linear_reference

    p = random_lora_problem(3, 8, 64, 2, dtype=torch.float64, seed=8)
    x = p["x"].clone().requires_grad_()
    y = lora_linear_reference(x, p["weight"], p["lora_a"], p["lora_b"], 1.0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


@pytest.mark.parametrize("backend, dx_method", [("torch", None), ("triton", "dequant"), ("triton", "fused"),
                                                ("triton", "merged")])
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_empty_batch_forward_and_backward(backend, dx_method, lead, device, monkeypatch):
    """M = 0 on every backend and dx path: the gradient of .sum() of an empty output is an
    expanded tensor with all-zero strides, which holds no element to read."""
    if dx_method is not None:
        from lora_triton.ops import lora_nf4

        monkeypatch.setattr(lora_nf4, "choose_dx", lambda *args: dx_method)
    p = random_lora_problem(1, 24, 64, 4, bias=True, seed=9, device=device)
    x = torch.randn(*lead, 64, device=device, requires_grad=True)
    a, b, bias = (p[k].clone().requires_grad_() for k in ("lora_a", "lora_b", "bias"))
    y = lora_nf4_linear(x, p["weight"], a, b, p["scale"], bias, 0.1, training=True, backend=backend)
    assert y.shape == (*lead, 24)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for t in (a, b, bias):
        assert torch.equal(t.grad, torch.zeros_like(t))  # nothing to learn from no tokens


def test_kernel_launchers_take_empty_expanded_operands(device):
    from lora_triton.kernels.lora_dx import lora_dx_triton
    from lora_triton.kernels.lora_forward import lora_forward_triton

    p = random_lora_problem(1, 24, 64, 4, seed=9, device=device)
    empty_x = torch.ones((), device=device).expand(0, 64)
    y, s = lora_forward_triton(empty_x, p["weight"], p["lora_a"], p["lora_b"], p["scale"], method="fused")
    assert y.shape == (0, 24) and s.shape == (0, 4)
    dy = torch.ones((), device=device).expand(0, 24)
    dx = lora_dx_triton(dy, p["weight"], p["lora_a"], torch.empty(0, 4, device=device), p["scale"])
    assert dx.shape == (0, 64)


def _bad_inputs(p):
    x, w, a, b = p["x"], p["weight"], p["lora_a"], p["lora_b"]
    return {
        "0-d x": ((torch.tensor(1.0), w, a, b, 1.0), ValueError,
                  r"x must be \[\.\.\., in_features=64\], got shape \[\]"),
        "int x": ((x.long(), w, a, b, 1.0), TypeError, "x must be a float tensor.*got torch.int64"),
        "bool x": ((x > 0, w, a, b, 1.0), TypeError, "x must be a float tensor.*got torch.bool"),
        "complex x": ((x.to(torch.complex64), w, a, b, 1.0), TypeError, "x must be a float tensor.*complex64"),
        "list x": ((x.tolist(), w, a, b, 1.0), TypeError, "x must be a torch.Tensor, got list"),
        "dense weight": ((x, w.dequantize(), a, b, 1.0), TypeError, "weight must be an NF4Weight"),
        "nan scale": ((x, w, a, b, float("nan")), ValueError, "scale must be a finite number, got nan"),
        "tensor scale": ((x, w, a, b, torch.tensor(1.0)), ValueError, "scale must be a finite number"),
        "rank mismatch": ((x, w, a, b[:, :1], 1.0), ValueError, r"lora_b \[out_features=8, r\]"),
        "A on wrong K": ((x, w, a[:, :32], b, 1.0), ValueError, "lora_a must be"),
        "int A": ((x, w, a.long(), b, 1.0), TypeError, "lora_a must be a float torch.Tensor, got torch.int64"),
        "bias shape": ((x, w, a, b, 1.0, torch.zeros(9)), ValueError, r"bias must have shape \[8\], got \[9\]"),
        "dropout 1": ((x, w, a, b, 1.0, None, 1.0), ValueError, r"dropout_p must be a number in \[0, 1\)"),
    }


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(_bad_inputs(random_lora_problem(4, 8, 64, 2, seed=1))))
def test_bad_input_is_named_clearly(case, backend):
    args, error, message = _bad_inputs(random_lora_problem(4, 8, 64, 2, seed=1))[case]
    with pytest.raises(error, match=message):
        lora_nf4_linear(*args, backend=backend)
