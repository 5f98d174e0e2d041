"""Memory promises: per layer, backward keeps only x and S (plus references to the packed
weight and the adapter); the in-register kernels never create an [N, K] float tensor, and the
dequantize + cuBLAS path (the default where it measured faster) creates one only transiently."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lora_triton.modules import LoRALinear4bit

M, K, N, R = 24, 256, 192, 8


class _RecordAllocations(TorchDispatchMode):
    """Records (shape, dtype) of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.created = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.created.append((tuple(t.shape), t.dtype))
        return out


def _layer(backend, device):
    torch.manual_seed(0)
    layer = LoRALinear4bit.from_linear(torch.nn.Linear(K, N), r=R, init_lora_weights=False, backend=backend)
    return layer.to(device)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_saved_activations_are_x_and_s_only(backend, device):
    layer = _layer(backend, device)
    x = torch.randn(M, K, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    own = {id(t) for t in [*layer.parameters(), *vars(layer.base_layer.nf4).values()] if isinstance(t, torch.Tensor)}
    activations = [t for t in saved if t.numel() > 1]
    # x, S and the adapter (cast copies of A and B are views of the parameters in fp32) are saved;
    # the packed weight by reference. Nothing of size [N, K] in a float dtype.
    shapes = sorted(tuple(t.shape) for t in activations if id(t) not in own and t.data_ptr() not in
                    {p.data_ptr() for p in layer.parameters()} | {layer.base_layer.nf4.packed.data_ptr()})
    assert shapes == sorted([(M, K), (M, R)]), shapes
    assert not any(t.is_floating_point() and t.numel() >= N * K for t in saved)
    activation_bytes = sum(t.numel() * t.element_size() for t in activations if tuple(t.shape) in [(M, K), (M, R)])
    assert activation_bytes == (M * K + M * R) * 4
    print(f"\n[{backend}] saved per layer: x {M * K * 4} B + S {M * R * 4} B = {activation_bytes} B "
          f"(packed weight {layer.base_layer.nf4.nbytes} B referenced, not copied)")
    y.sum().backward()


@pytest.fixture
def in_register_kernels(monkeypatch):
    """Dispatch every forward to the skinny kernel and every dx to the fused dx kernel (both decode NF4
    in registers)."""
    from lora_triton.ops import candidates

    monkeypatch.setitem(candidates.RULE, "forward", ("skinny",))
    monkeypatch.setitem(candidates.RULE, "dx", ("fused",))


def test_in_register_kernels_never_create_a_dense_weight(device, in_register_kernels):
    layer = _layer("triton", device)
    x = torch.randn(M, K, device=device, requires_grad=True)
    with _RecordAllocations() as rec:
        layer(x).square().sum().backward()
    dense = [(s, d) for s, d in rec.created if d.is_floating_point and len(s) == 2 and set(s) == {N, K}]
    assert dense == [], dense
    largest = max((torch.Size(s).numel() * d.itemsize, s, d) for s, d in rec.created)
    print(f"\nlargest tensor created in forward+backward: {largest[1]} {largest[2]} ({largest[0]} B); "
          f"a dense fp32 weight would be {N * K * 4} B")


def test_triton_backend_keeps_no_dense_weight_for_backward(device):
    """With the default dispatch (dequantize + cuBLAS) the dense weight exists during the matmuls
    but autograd never saves it: between forward and backward only x and S are held."""
    layer = _layer("triton", device)
    x = torch.randn(M, K, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert saved, "the hook saw no saved tensor: the check below would pass vacuously"
    assert not any(t.is_floating_point() and t.numel() >= N * K for t in saved)


def test_reference_backend_dequantizes_only_transiently():
    """The CPU reference path builds dequant(W) inside the op, but never keeps it."""
    layer = _layer("torch", "cpu")
    x = torch.randn(M, K, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert not any(t.is_floating_point() and t.numel() >= N * K for t in saved)
