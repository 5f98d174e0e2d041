"""The custom op: gradients for every requires_grad combination on both backends, gradcheck,
opcheck, torch.compile without graph breaks, autocast and mixed quant-state dtypes."""

from __future__ import annotations

import itertools

import pytest
import torch

from lora_triton.format import NF4Weight
from lora_triton.ops import candidates, lora_nf4_linear, resolve_backend
from lora_triton.ops.dropout import dropout_mask
from lora_triton.reference import lora_backward, lora_forward
from lora_triton.testing import REL_TOL, assert_like_torch, random_lora_problem, relative_error

COMBOS = [c for c in itertools.product([True, False], [True, False], [True, False], ["none", "frozen", "train"])
          if any(c[:3]) or c[3] == "train"]


def _leaves(p, need_x, need_a, need_b, bias_mode):
    x = p["x"].clone().requires_grad_(need_x)
    a = p["lora_a"].clone().requires_grad_(need_a)
    b = p["lora_b"].clone().requires_grad_(need_b)
    bias = None if bias_mode == "none" else p["bias"].clone().requires_grad_(bias_mode == "train")
    return x, a, b, bias


def _expected(p, dy, seed, dropout_p, backend=None, with_bias=True, plain=False):
    """float64 reference output and gradients, with the mask every backend regenerates from ``seed``
    (``plain``: the same in plain torch at the problem's dtype)."""
    dtype = p["x"].dtype if plain else torch.float64
    as_dtype = {key: v.to(dtype) if isinstance(v, torch.Tensor) else v for key, v in p.items()}
    if not with_bias:
        as_dtype["bias"] = None
    m, k = p["x"].shape
    mask = dropout_mask(seed, dropout_p, m, k, p["x"].device, dtype) if dropout_p > 0 else None
    y, s = lora_forward(as_dtype["x"], p["weight"], as_dtype["lora_a"], as_dtype["lora_b"], p["scale"],
                        as_dtype["bias"], mask)
    grads = lora_backward(dy.to(dtype), as_dtype["x"], p["weight"], as_dtype["lora_a"], as_dtype["lora_b"],
                          p["scale"], s, mask)
    return y, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "triton", "triton-skinny", "triton-merged", "triton-fused"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("need_x, need_a, need_b, bias_mode", COMBOS)
def test_every_requires_grad_combination(backend, dropout_p, need_x, need_a, need_b, bias_mode, dtype, device,
                                         monkeypatch):
    """``triton-skinny``: the Triton backend with every forward dispatched to the skinny kernel;
    ``triton-merged``: forward and dx dispatched to the merged weight ``W + s * B @ A`` (plain torch where
    dropout rules it out); ``triton-fused``: the fused dx kernel (in-loop NF4 decode)."""
    if backend != "triton" and backend.startswith("triton-"):
        candidate = backend.removeprefix("triton-")
        for operation, registry in (("forward", candidates.FORWARD), ("dx", candidates.DX)):
            if candidate in registry:
                monkeypatch.setitem(candidates.RULE, operation, (candidate, "torch"))
        backend = "triton"
    p = random_lora_problem(17, 48, 64, 8, dtype=dtype, bias=True, device=device, seed=7)
    x, a, b, bias = _leaves(p, need_x, need_a, need_b, bias_mode)
    seed = 1234
    # pin the dropout seed (drawn where new_seed draws it: the kernels load it from there)
    monkeypatch.setattr(torch, "randint",
                        lambda *args, **kw: torch.tensor(seed, dtype=torch.int32, device=kw.get("device")))
    y = lora_nf4_linear(x, p["weight"], a, b, p["scale"], bias, dropout_p, training=True, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, ref = _expected(p, dy, seed, dropout_p, with_bias=bias is not None)
    y_plain, plain = _expected(p, dy, seed, dropout_p, with_bias=bias is not None, plain=True)
    assert_like_torch(y, y_ref, y_plain, what="y")
    for name, tensor, wanted in [("dx", x, need_x), ("dA", a, need_a), ("dB", b, need_b)]:
        if wanted:
            assert_like_torch(tensor.grad, getattr(ref, name), getattr(plain, name), what=name)
        else:
            assert tensor.grad is None
    if bias is not None:
        if bias_mode == "train":
            assert_like_torch(bias.grad, ref.dbias, plain.dbias, what="dbias")
        else:
            assert bias.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_the_triton_backend(dtype, device):
    p = random_lora_problem(17, 40, 128, 16, dtype=dtype, bias=True, device=device, seed=3)
    x, a, b, bias = _leaves(p, True, True, True, "train")
    y = lora_nf4_linear(x, p["weight"], a, b, p["scale"], bias, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, ref = _expected(p, dy, 0, 0.0)
    y_plain, plain = _expected(p, dy, 0, 0.0, plain=True)
    assert y.dtype == dtype
    assert_like_torch(y, y_ref, y_plain, what="y")
    for name, got in [("dx", x.grad), ("dA", a.grad), ("dB", b.grad), ("dbias", bias.grad)]:
        assert got.dtype == dtype
        assert_like_torch(got, getattr(ref, name), getattr(plain, name), what=name)


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
    seed = torch.tensor(3, dtype=torch.int32)
    nf4, meta = _weight_tensors(w), [24, 64, 64]
    fwd_args = (p["x"].requires_grad_(), p["lora_a"].requires_grad_(), p["lora_b"].requires_grad_(),
                p["bias"].requires_grad_(), nf4, meta, w.offset_value, p["scale"], 0.1, seed, "torch")
    torch.library.opcheck(_forward_op, fwd_args)
    _, s = lora_forward(p["x"].detach(), w, p["lora_a"].detach(), p["lora_b"].detach(), p["scale"])
    bwd_args = (torch.randn(5, 24), s, p["x"].detach(), p["lora_a"].detach(), p["lora_b"].detach(), nf4, meta,
                w.offset_value, p["scale"], 0.1, seed, "torch", [True, False, True, True])
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
        monkeypatch.setitem(candidates.RULE, "dx", (dx_method, "torch"))
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
    p = random_lora_problem(1, 24, 64, 4, seed=9, device=device)
    empty_x = torch.ones((), device=device).expand(0, 64)
    args = (p["weight"], p["lora_a"], p["lora_b"], p["scale"])
    for name in candidates.FORWARD:
        if name != "native":
            y, s = candidates.run_forward(name, empty_x, *args)
            assert y.shape == (0, 24) and s.shape == (0, 4), name
    dy = torch.ones((), device=device).expand(0, 24)
    for name in candidates.DX:
        assert candidates.run_dx(name, dy, empty_x, *args).shape == (0, 64), name


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
        "nan scale": ((x, w, a, b, float("nan")), ValueError, "scale must be finite, got nan"),
        "tensor scale": ((x, w, a, b, torch.tensor(1.0)), TypeError, "scale must be a Python number"),
        "rank mismatch": ((x, w, a, b[:, :1], 1.0), ValueError, r"lora_b \[out_features=8, r\]"),
        "A on wrong K": ((x, w, a[:, :32], b, 1.0), ValueError, "lora_a must be"),
        "int A": ((x, w, a.long(), b, 1.0), TypeError, "lora_a must be a float torch.Tensor, got torch.int64"),
        "bias shape": ((x, w, a, b, 1.0, torch.zeros(9)), ValueError, r"bias must have shape \[8\], got \[9\]"),
        "dropout 1": ((x, w, a, b, 1.0, None, 1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    }


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(_bad_inputs(random_lora_problem(4, 8, 64, 2, seed=1))))
def test_bad_input_is_named_clearly(case, backend):
    args, error, message = _bad_inputs(random_lora_problem(4, 8, 64, 2, seed=1))[case]
    with pytest.raises(error, match=message):
        lora_nf4_linear(*args, backend=backend)


def test_dropout_under_cuda_graph_capture_is_refused_only_without_triton(monkeypatch):
    """With Triton the kernels load the seed from the device (a replay draws a new one); without it the
    mask would come from a host-seeded generator, the same at every replay: refused with a clear error."""
    from lora_triton.ops import dropout

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(dropout, "can_launch", lambda device: False)
    with pytest.raises(RuntimeError, match="LoRA dropout under CUDA-graph capture needs Triton"):
        dropout.refuse_dropout_in_graph_capture(torch.device("cuda", 0))
    dropout.refuse_dropout_in_graph_capture(torch.device("cpu"))  # no capture on the CPU
    monkeypatch.setattr(dropout, "can_launch", lambda device: True)
    dropout.refuse_dropout_in_graph_capture(torch.device("cuda", 0))

def test_the_dropout_seed_is_drawn_where_it_is_read(monkeypatch):
    """Where Triton runs, the kernels load the seed from the layer's device; where it cannot, torch's stream
    reads it on the host, so it is drawn on the CPU (no device to wait for), even for a CUDA layer."""
    from lora_triton.ops import dropout

    monkeypatch.setattr(dropout, "can_launch", lambda device: False)
    seed = dropout.new_seed(torch.device("cuda", 0))
    assert seed.device.type == "cpu" and seed.dtype == torch.int32 and seed.dim() == 0
    monkeypatch.setattr(dropout, "can_launch", lambda device: True)
    seeds = {int(dropout.new_seed(torch.device("cpu"))) for _ in range(8)}
    assert len(seeds) > 1 and all(0 <= s < 2**31 - 1 for s in seeds)
