"""No host reads, no synchronization: our layers' forward and backward never bring a device value back
to the host (what CUDA graphs and ``torch.compile(mode="reduce-overhead")`` need,
and what keeps the host from waiting on the GPU).

``HostReads`` watches a block of code two ways and keeps what code of the ``lora_triton`` package
(``lora_triton/bench`` excepted) caused:

* a ``TorchDispatchMode`` records every op that hands a tensor's value to Python
  (``aten::_local_scalar_dense`` - what ``.item()``, ``int()``, ``float()``, ``bool()`` of a tensor
  dispatch to - ``aten::item``, ``aten::equal``, ``aten::is_nonzero``) and, on a GPU, every copy from
  the device to the host. It descends into custom ops (``lora_triton::``, ``bitsandbytes::``): a
  mode is switched off while it handles an op, so it re-enters itself and calls the op's kernel for
  the device directly, and sees the ops the custom op's body runs;
* ``torch.Tensor``'s ``item``, ``tolist``, ``cpu``, ``numpy``, ``__bool__``, ``__int__``,
  ``__float__``, ``__index__`` and ``torch.cuda``'s ``synchronize`` (module, stream, event) are
  wrapped to record their caller (``.tolist()`` and ``.cpu()`` of a CPU tensor dispatch no op).

A record belongs to us when the innermost frame of its Python stack outside torch, bitsandbytes, the
standard library and this file lies in ``lora_triton/`` (not ``lora_triton/bench``): a read made by
``transformers`` or Triton's interpreter while our layer is further up the stack is theirs. Each
path runs twice and only the second call is watched: a first call may check its inputs once per
module state. Under pytest's default ``--device cpu`` the layers run the plain-torch backend (and
dropout masks come from Triton's interpreter, whose own reads are Triton's); ``--device cuda`` runs
the same cases on the Triton backend.

Dropout draws its seed on the layer's device and the kernels load it from memory (``ops.dropout``), and
adapter ids given as a tensor are checked on the device (``validate.check_on_device``), so nothing is
marked as reading today: a new read fails the run.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_triton
from lora_triton import LoRALinear4bit

IN, OUT, R, BATCH, SEQ = 64, 48, 8, 4, 3
MIXED = ("default", "task1", "task2", "task3")

_PACKAGE = os.path.dirname(os.path.abspath(lora_triton.__file__)) + os.sep
_BENCH = os.path.join(_PACKAGE, "bench") + os.sep


def _library_roots() -> tuple[str, ...]:
    """Libraries a read passes through on its way from its cause: torch, bitsandbytes (our CPU ops call
    its kernels)."""
    roots = [os.path.dirname(os.path.abspath(torch.__file__)) + os.sep]
    try:
        import bitsandbytes

        roots.append(os.path.dirname(os.path.abspath(bitsandbytes.__file__)) + os.sep)
    except Exception:
        pass
    return tuple(roots)


_LIBRARIES = _library_roots()
_STDLIB = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
_THIS_FILE = os.path.abspath(__file__)


def _transparent(path: str) -> bool:
    """torch, bitsandbytes, the standard library (not the packages a system Python installs under it:
    transformers, PEFT, Triton cause reads of their own) and this file."""
    if path == _THIS_FILE or path.startswith(_LIBRARIES):
        return True
    return path.startswith(_STDLIB) and f"-packages{os.sep}" not in path


_ABSPATH: dict[str, str] = {}


def _cause() -> str | None:
    """``file:line (function)`` of the innermost frame that is neither torch, bitsandbytes, the standard
    library nor this file, when it lies in our package (not ``bench``); None otherwise."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        path = _ABSPATH.get(name)
        if path is None:
            path = _ABSPATH[name] = name if name.startswith("<") else os.path.abspath(name)
        if not path.startswith("<") and not _transparent(path):
            if path.startswith(_PACKAGE) and not path.startswith(_BENCH):
                return f"lora_triton/{path[len(_PACKAGE):]}:{frame.f_lineno} ({frame.f_code.co_name})"
            return None
        frame = frame.f_back
    return None


_READ_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
             torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default}
_COPY_OPS = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten.to.dtype_layout,
             torch.ops.aten.to.device}
_OWN_NAMESPACES = ("aten", "prim", "prims")


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


def _device_to_host(func, args, kwargs) -> bool:
    """A copy from a GPU (or any non-CPU device) to the host."""
    if func not in _COPY_OPS:
        return False
    if func is torch.ops.aten.copy_.default:
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and isinstance(src, torch.Tensor) and src.device.type != "cpu"
    src = args[0]
    target = kwargs.get("device", args[1] if len(args) > 1 and isinstance(args[1], torch.device) else None)
    return src.device.type != "cpu" and target is not None and torch.device(target).type == "cpu"


class _Dispatch(TorchDispatchMode):
    """Records host reads and device-to-host copies (module docstring) into ``sink``."""

    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READ_OPS or _device_to_host(func, args, kwargs):
            self.sink(f"aten.{func.__name__}")
        if func.namespace not in _OWN_NAMESPACES:  # a custom op: watch its body too
            devices = {t.device.type for t in _tensors((*args, *kwargs.values()))}
            key = torch._C.DispatchKey.CUDA if "cuda" in devices else torch._C.DispatchKey.CPU
            with self:
                return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        return func(*args, **kwargs)


_TENSOR_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@dataclass
class HostReads:
    """``with HostReads() as reads:`` records our host reads in the block; ``reads.sites``
    maps ``file:line (function)`` to the kinds of reads made there. ``dispatch`` / ``methods`` switch
    either way of watching off (for the self-tests)."""

    dispatch: bool = True
    methods: bool = True
    sites: dict[str, set[str]] = field(default_factory=dict)

    def record(self, kind: str) -> None:
        site = _cause()
        if site is not None:
            self.sites.setdefault(site, set()).add(kind)

    def __enter__(self) -> "HostReads":
        self._patch = pytest.MonkeyPatch()
        if self.methods:
            for name in _TENSOR_METHODS:
                self._wrap(torch.Tensor, name, f"Tensor.{name}")
            self._wrap(torch.cuda, "synchronize", "torch.cuda.synchronize")
            for cls in (getattr(torch.cuda, "Stream", None), getattr(torch.cuda, "Event", None)):
                if cls is not None and hasattr(cls, "synchronize"):
                    self._wrap(cls, "synchronize", f"torch.cuda.{cls.__name__}.synchronize")
        self._mode = _Dispatch(self.record) if self.dispatch else None
        if self._mode is not None:
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
        self._patch.undo()

    def _wrap(self, owner, name: str, kind: str) -> None:
        original = getattr(owner, name)
        record = self.record

        def wrapper(*args, **kwargs):
            record(kind)
            return original(*args, **kwargs)

        self._patch.setattr(owner, name, wrapper)

    def report(self) -> str:
        return "; ".join(f"{site}: {', '.join(sorted(kinds))}" for site, kinds in sorted(self.sites.items()))


def assert_no_host_reads(step, calls: int = 2) -> None:
    """Run ``step`` ``calls - 1`` times unwatched, then once watched: no host read of ours in it."""
    for _ in range(calls - 1):
        step()
    with HostReads() as reads:
        step()
    assert not reads.sites, f"host reads in lora_triton during the watched call: {reads.report()}"


# ---------------------------------------------------------------- the layers and their steps
def _layer(device, dropout: float = 0.0) -> LoRALinear4bit:
    torch.manual_seed(0)
    return LoRALinear4bit.from_linear(nn.Linear(IN, OUT), r=R, lora_alpha=16, lora_dropout=dropout,
                                      init_lora_weights=False).to(device)


def _mixed_layer(device) -> LoRALinear4bit:
    torch.manual_seed(0)
    layer = LoRALinear4bit.from_linear(nn.Linear(IN, OUT), r=R, lora_alpha=16, init_lora_weights=False,
                                       adapter_name=MIXED[0])
    for name in MIXED[1:]:
        layer.add_adapter(name, r=R, lora_alpha=16, lora_dropout=0.1, init_lora_weights=False)
    layer.set_adapter(MIXED[0])
    layer.set_trainable_adapters(list(MIXED))
    return layer.to(device)


def _inputs(device):
    x = torch.randn(BATCH, SEQ, IN, device=device, requires_grad=True)
    return x, torch.randn(BATCH, SEQ, OUT, device=device)


def _train_step(layer, x, dy, **kwargs):
    def step():
        layer.train()
        x.grad = None
        layer(x, **kwargs).backward(dy)
    return step


def _eval_step(layer, x, dy, **kwargs):
    def step():
        layer.eval()
        x.grad = None
        layer(x, **kwargs).backward(dy)
    return step


def _inference_step(layer, x, **kwargs):
    def step():
        layer.eval()
        with torch.no_grad():
            layer(x, **kwargs)
    return step


@pytest.mark.parametrize("mode", ["train", "eval", "inference"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_single_adapter_layer(mode, dropout, device):
    layer = _layer(device, dropout)
    x, dy = _inputs(device)
    step = {"train": lambda: _train_step(layer, x, dy), "eval": lambda: _eval_step(layer, x, dy),
            "inference": lambda: _inference_step(layer, x)}[mode]()
    assert_no_host_reads(step)


def _mixed_step(mode, layer, x, dy, adapter_names):
    if mode == "train":
        return _train_step(layer, x, dy, adapter_names=adapter_names)
    return _inference_step(layer, x, adapter_names=adapter_names)


@pytest.mark.parametrize("mode", ["train", "inference"])
def test_mixed_batch_of_four_adapters_by_name(mode, device):
    layer = _mixed_layer(device)
    x, dy = _inputs(device)
    names = [MIXED[1], MIXED[3], MIXED[0], MIXED[2]]  # one adapter per row, not in slot order
    assert_no_host_reads(_mixed_step(mode, layer, x, dy, names))


@pytest.mark.parametrize("mode", ["train", "inference"])
def test_mixed_batch_of_four_adapters_by_id_tensor(mode, device):
    layer = _mixed_layer(device)
    x, dy = _inputs(device)
    ids = torch.tensor([1, 3, 0, 2], device=device)
    assert_no_host_reads(_mixed_step(mode, layer, x, dy, ids))


@pytest.mark.parametrize("how", ["disable_adapter", "enable_adapters_false"])
def test_disabled_adapter(how, device):
    layer = _layer(device, 0.1)
    x, dy = _inputs(device)

    def step():
        layer.train()
        x.grad = None
        if how == "disable_adapter":
            with layer.disable_adapter():
                layer(x).backward(dy)
        else:
            layer.enable_adapters(False)
            try:
                layer(x).backward(dy)
            finally:
                layer.enable_adapters(True)
    assert_no_host_reads(step)


def _tiny_llama(device, adapter_name, dropout: float):
    pytest.importorskip("transformers")
    from lora_triton.testing import tiny_llama

    model = tiny_llama(seed=3)
    torch.manual_seed(5)
    lora_triton.inject_lora(model, r=4, lora_dropout=dropout, init_lora_weights=False, adapter_name=adapter_name)
    return model.to(device).train()


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_tiny_llama_forward_backward(mixed, dropout, device):
    """A whole tiny Llama with our layers on every projection, one adapter or a mixed batch (one
    adapter per sequence, the base model for one): loss forward and backward."""
    model = _tiny_llama(device, ["x", "y"] if mixed else "default", dropout)
    ids = torch.randint(0, 128, (4, 8), device=device)
    extra = {"adapter_names": ["y", "__base__", "x", "y"]} if mixed else {}

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, **extra).loss.backward()
    assert_no_host_reads(step)


# ---------------------------------------------------------------- the watcher itself
def _reads_inside_package(t: torch.Tensor) -> float:
    """A host read made by code of the package: ``testing.relative_error`` calls ``float()`` and
    ``bool()`` of tensors."""
    from lora_triton.testing import relative_error

    return relative_error(t, t + 1)


@pytest.mark.parametrize("dispatch, methods", [(True, False), (False, True), (True, True)])
def test_watcher_sees_package_reads_both_ways(dispatch, methods):
    t = torch.randn(5)
    with HostReads(dispatch=dispatch, methods=methods) as reads:
        _reads_inside_package(t)
    assert any(site.startswith("lora_triton/testing.py:") for site in reads.sites), reads.sites
    kinds = set().union(*reads.sites.values())
    if dispatch:
        assert "aten._local_scalar_dense.default" in kinds, kinds
    if methods:
        assert kinds & {"Tensor.__float__", "Tensor.__bool__"}, kinds


def test_watcher_ignores_reads_outside_the_package():
    t = torch.randn(5)
    with HostReads() as reads:
        t.sum().item(), t.tolist(), bool(t[0] > 0), int(t.argmax()), float(t.max()), t.cpu()
        torch.nn.functional.cross_entropy(t[None], torch.tensor([1]))
    assert not reads.sites, reads.sites


def test_watcher_descends_into_custom_ops():
    """A read inside a custom op's body is seen by the dispatch mode alone (a mode is off while it
    handles an op, so it must re-enter itself to see the body)."""
    from lora_triton.testing import relative_error

    @torch.library.custom_op("lora_triton_host_sync_test::reads", mutates_args=())
    def reads_op(t: torch.Tensor) -> torch.Tensor:
        relative_error(t, t + 1)
        return t.clone()

    with HostReads(methods=False) as reads:
        reads_op(torch.randn(3))
    assert any(site.startswith("lora_triton/testing.py:") for site in reads.sites), reads.sites


def test_watcher_restores_tensor_methods():
    before = {name: getattr(torch.Tensor, name) for name in _TENSOR_METHODS}
    with HostReads():
        assert torch.Tensor.item is not before["item"]
    assert {name: getattr(torch.Tensor, name) for name in _TENSOR_METHODS} == before
    assert torch.ones(()).item() == 1.0


def test_a_training_step_with_dropout_captures_in_a_cuda_graph_and_draws_a_new_mask_per_replay(device):
    """The seed is drawn on the GPU inside the graph and loaded by the kernels: each replay drops other
    elements, and a replay after ``torch.cuda.manual_seed`` repeats the one after the same seed."""
    if device.type != "cuda":
        pytest.skip("GPU test: CUDA graphs")
    layer = _layer(device, dropout=0.5).train()
    x, dy = _inputs(device)
    grads = [layer.lora_A["default"].weight, layer.lora_B["default"].weight, x]

    def step():
        for t in grads:
            t.grad = None
        y = layer(x)
        y.backward(dy)
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()  # warm-up on a side stream, as torch's docs do it
    torch.cuda.current_stream().wait_stream(side)
    for t in grads:
        t.grad = torch.zeros_like(t)  # the graph accumulates into fixed buffers
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = layer(x)
        y_static.backward(dy)
    outputs = []
    for seed in (None, None, 7, 7):
        if seed is not None:
            torch.cuda.manual_seed(seed)
        graph.replay()
        outputs.append(y_static.clone())
    torch.cuda.synchronize()
    assert not torch.equal(outputs[0], outputs[1]), "two replays drew the same dropout mask"
    assert torch.equal(outputs[2], outputs[3]), "the same generator state must give the same mask"
    assert all(bool(torch.isfinite(t.grad).all()) for t in grads)


class _DecoderBlock(nn.Module):
    """A Llama decoder block in plain torch (RMSNorm, causal grouped-query attention, SwiGLU MLP): what a
    compiled, graph-captured block of a real model runs, without ``transformers`` (not on the GPU machine)."""

    def __init__(self, hidden: int = 64, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.gate_proj = nn.Linear(hidden, 2 * hidden, bias=False)
        self.up_proj = nn.Linear(hidden, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.attn_norm, self.mlp_norm = nn.RMSNorm(hidden), nn.RMSNorm(hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = h.shape
        x = self.attn_norm(h)
        q = self.q_proj(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = h + self.o_proj(att.transpose(1, 2).reshape(batch, seq, -1))
        x = self.mlp_norm(h)
        return h + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def test_a_decoder_block_compiled_with_reduce_overhead_runs_in_cuda_graphs_and_matches_eager(device):
    """``torch.compile(mode="reduce-overhead")`` of a decoder block with our layers on its seven projections:
    no CUDA-graph skip (a host sync, a CPU tensor or an unsupported op would cause one), and the training
    step's output and adapter gradients equal eager's."""
    if device.type != "cuda":
        pytest.skip("GPU test: CUDA graphs")
    from torch._dynamo.utils import counters

    from lora_triton.testing import relative_error

    torch.manual_seed(11)
    block = _DecoderBlock()
    lora_triton.inject_lora(block, r=4, init_lora_weights=False)
    block = block.to(device).train()
    h = torch.randn(2, 16, 64, device=device)
    adapters = [p for p in block.parameters() if p.requires_grad]

    def step(module):
        for p in adapters:
            p.grad = None
        out = module(h)
        out.square().mean().backward()
        return out.detach().clone(), [p.grad.clone() for p in adapters]

    want_out, want_grads = step(block)
    counters.clear()
    compiled = torch.compile(block, mode="reduce-overhead")
    for _ in range(3):  # cudagraph trees record on the second call and replay from the third
        got_out, got_grads = step(compiled)
    torch.cuda.synchronize()
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert relative_error(got_out, want_out) < 1e-4
    for got, want in zip(got_grads, want_grads):
        assert relative_error(got, want) < 1e-3
