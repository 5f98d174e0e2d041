"""Safe on every GPU the package names: launches under the device of their tensors, split-K counters
that belong to one launch, configs chosen per GPU, and the dequant path when a launch does not fit.

On CPU the kernels run through Triton's interpreter: every launch is checked to happen inside the
device guard (``runtime.on_device``) of its tensors' device, ``torch.cuda.device`` and the native
library are replaced by recorders, and the GPUs' limits come from ``ops.configs.named_archs``. The
tests marked ``cuda`` run on a GPU (``pytest --device cuda``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import warnings

import pytest
import torch

from lora_triton.kernels import runtime
from lora_triton.ops import configs
from lora_triton.testing import random_lora_problem


def _launch_class():
    """The class whose ``run`` every ``kernel[grid](...)`` goes through (interpreter or GPU)."""
    if runtime.interpreting():
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction
    from triton.runtime.jit import JITFunction

    return JITFunction


@pytest.fixture
def launches(monkeypatch):
    """Every Triton launch, as ``(kernel name, guarded device, first tensor's device)``."""
    record = []
    cls = _launch_class()
    original = cls.run

    def run(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            tensor = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor))
            record.append((getattr(self, "__name__", repr(self)), runtime.launch_device(), tensor.device))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", run)
    return record


def _every_launcher(device: torch.device, dtype=torch.float32):
    """Run each candidate of ``ops.candidates`` that supports the problem once (the forward ones with and
    without dropout, each dx one), the experimental fused forward, the dropout uniforms and a mixed batch."""
    from lora_triton.ops import candidates, multi_lora_add
    from lora_triton.ops.dropout import uniforms

    m, n, k, r = 5, 72, 128, 8
    p = random_lora_problem(m, n, k, r, dtype, 64, True, True, device, seed=3)
    x, weight, a, b = p["x"], p["weight"], p["lora_a"], p["lora_b"]
    dy = torch.randn(m, n, dtype=dtype, device=device)
    for dropout_p in (0.0, 0.25):
        problem = candidates.Problem(device, m, n, k, r, dtype, dropout_p > 0, weight.blocksize)
        for name, candidate in candidates.FORWARD.items():
            if candidate.supports(problem):
                candidates.run_forward(name, x, weight, a, b, p["scale"], p["bias"], dropout_p, 5)
        for name, candidate in candidates.DX.items():
            if candidate.supports(problem):
                candidates.run_dx(name, dy, x, weight, a, b, p["scale"], dropout_p, 5)
    candidates.run_experimental_fused(x, weight, a, b, p["scale"], p["bias"])
    uniforms(3, 4, 64, device)
    bank_a, bank_b = a[None].repeat(2, 1, 1), b[None].repeat(2, 1, 1)
    multi_lora_add(dy.clone(), x, bank_a, bank_b, torch.ones(2, device=device),
                   torch.tensor([0, 1, -1, 0, 1], device=device), backend="triton")


def test_every_triton_launch_runs_under_the_guard_of_its_tensors_device(launches, device):
    _every_launcher(device)
    names = {name for name, _, _ in launches}
    # the S kernel, the dequant and merged kernels, skinny, the fused forward, dx, the uniforms, the mixed batch
    assert {"_lora_s_kernel", "_dequant_kernel", "_dequant_merged_kernel", "_skinny_kernel", "_fused_forward_kernel",
            "_lora_dx_kernel", "_uniform_kernel", "_shrink_kernel", "_expand_kernel"} <= names
    unguarded = [(name, guard, dev) for name, guard, dev in launches if guard != dev]
    assert not unguarded, f"launched outside the guard of their tensors' device: {unguarded}"
    assert runtime.launch_device() is None  # every guard was left


class _RecordingCudaDevice:
    """Stands in for ``torch.cuda.device``: a stack of current devices, as the CUDA runtime keeps one."""

    current = [0]
    entered: list[int] = []

    def __init__(self, device):
        self.index = torch.device(device).index

    def __enter__(self):
        self.previous = self.current[-1]
        self.entered.append(self.index)
        self.current.append(self.index)

    def __exit__(self, *exc):
        self.current.pop()
        assert self.current[-1] == self.previous


def test_the_guard_makes_the_tensors_device_current_and_restores_the_callers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device", _RecordingCudaDevice)
    _RecordingCudaDevice.current[:] = [0]
    _RecordingCudaDevice.entered.clear()
    with runtime.on_device(torch.device("cuda", 1)):
        assert _RecordingCudaDevice.current[-1] == 1
        assert runtime.launch_device() == torch.device("cuda", 1)
        with runtime.on_device(torch.device("cuda", 0)):
            assert _RecordingCudaDevice.current[-1] == 0
        assert _RecordingCudaDevice.current[-1] == 1
    assert _RecordingCudaDevice.current == [0] and _RecordingCudaDevice.entered == [1, 0]
    with pytest.raises(KeyError), runtime.on_device(torch.device("cuda", 1)):
        raise KeyError("a failed launch")
    assert _RecordingCudaDevice.current == [0] and runtime.launch_device() is None


class _FakeNativeLibrary:
    """The native library's C interface, recorded: which device is current when it is called, and
    whether the tile counters it is given are zero (the contract); it leaves them non-zero, as a
    call stopped half-way or running on another stream would."""

    def __init__(self):
        self.calls = []

    def lt_nf4_lora_plan(self, m, n, k, r, config, num_sms, plan):
        plan._obj.split_k, plan._obj.row_tiles, plan._obj.shrink_split_k = 4, 2, 1
        plan._obj.workspace_bytes, plan._obj.counters = 64, 3
        return 0

    def lt_nf4_lora_forward(self, dtype, x, m, weight, a, b, r, scale, bias, y, s, config, sms, workspace,
                            workspace_bytes, counters, counters_len, device, stream):
        values = (ctypes.c_int32 * counters_len).from_address(counters)
        self.calls.append((runtime.launch_device(), list(values)))
        for i in range(counters_len):
            values[i] = 5
        return 0


def test_native_calls_run_under_the_guard_with_zeroed_counters_of_their_own(monkeypatch):
    from lora_triton.kernels import native

    class _Stream:
        cuda_stream = 0

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    p = random_lora_problem(2, 64, 128, 4, torch.float16, 64, True, False, "cpu", seed=1)
    w = p["weight"]
    lib = _FakeNativeLibrary()
    y, s = p["x"].new_empty(2, 64), p["x"].new_empty(2, 4)
    for _ in range(2):
        native.launch_native(lib, p["x"], w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code, w.offset_value,
                             64, 128, 64, p["lora_a"], p["lora_b"], 0.5, None, y, s, native.Config(0, 0, 0))
    assert [device for device, _ in lib.calls] == [torch.device("cpu")] * 2
    assert all(counters == [0, 0, 0] for _, counters in lib.calls), lib.calls


def test_each_skinny_launch_counts_in_zeroed_counters_of_its_own(monkeypatch, device):
    """A counter left non-zero (by a launch stopped half-way, or one on another stream) is never read
    by a later launch: each starts from counters of its own, zeroed on its stream."""
    from lora_triton.kernels import nf4_skinny
    from lora_triton.ops import candidates

    kernel = nf4_skinny._skinny_kernel
    names = list(getattr(kernel, "arg_names", None) or [p.name for p in kernel.params])
    original, seen = kernel.run, []

    def run(*args, **kwargs):
        counters = args[names.index("counter_ptr")]
        seen.append(int(counters.abs().sum()))
        out = original(*args, **kwargs)
        counters.fill_(5)  # what an interrupted or concurrent launch would leave behind
        return out

    monkeypatch.setattr(kernel, "run", run)
    p = random_lora_problem(17, 130, 256, 4, torch.float32, 64, True, False, device, seed=2)
    config = dict(split_k=4, block_k=32, block_m=16, block_n=64, num_warps=4, num_stages=1)
    first = candidates.run_forward("skinny", p["x"], p["weight"], p["lora_a"], p["lora_b"], p["scale"], config=config)
    again = candidates.run_forward("skinny", p["x"], p["weight"], p["lora_a"], p["lora_b"], p["scale"], config=config)
    assert seen == [0, 0]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_inputs_on_different_devices_get_a_clear_error():
    from lora_triton.ops import lora_nf4_linear

    p = random_lora_problem(3, 32, 64, 4, torch.float32, 64, True, False, "cpu", seed=4)
    with pytest.raises(ValueError, match="lora_a is on meta but x is on cpu"):
        lora_nf4_linear(p["x"], p["weight"], p["lora_a"].to("meta"), p["lora_b"], 0.5)
    with pytest.raises(ValueError, match="weight is on meta"):
        lora_nf4_linear(p["x"], p["weight"].to("meta"), p["lora_a"], p["lora_b"], 0.5)


# ----------------------------------------------------------------------------- configs per GPU
@pytest.mark.parametrize("arch", sorted(configs.named_archs()))
@pytest.mark.parametrize("elem_bytes, r", [(2, 16), (2, 128), (4, 16), (4, 128)])
def test_every_config_the_package_offers_fits_the_gpu_by_its_estimate(arch, elem_bytes, r):
    """The configs chosen for each named GPU fit it by the kernels' own shared-memory bounds (the static
    report checks those bounds against the compiled kernels), and every autotuned kernel keeps tiles."""
    from lora_triton.kernels import lora_dx, lora_s, nf4_dequant
    from lora_triton.kernels.experimental import fused

    limits, r_pad = configs.named_archs()[arch], runtime.padded_rank(r)
    assert limits.fits(lora_s.s_kernel_smem(*configs.s_kernel_tile(elem_bytes, r_pad, limits), elem_bytes, r_pad))
    for m in (1, 64):
        assert configs.skinny_fits(configs.skinny_default(r_pad, m, elem_bytes, limits), elem_bytes, r_pad, limits)
    for kernel, smem in (("fused", fused.fused_smem), ("dx", lora_dx.dx_smem)):
        fixed = configs.fixed_tiles(kernel, elem_bytes, r_pad, limits)[0]
        assert limits.fits(smem(fixed.blocks, fixed.num_stages, elem_bytes, r_pad), None, fixed.num_warps)
        if elem_bytes == 2:  # the autotuners keep tiles to time (fp32 at rank 128 may keep none: dequant runs)
            assert configs.offered_tiles(kernel, elem_bytes, r_pad, limits)
    block_k = configs.merged_block_ks(64, elem_bytes, r_pad, limits)[0]
    assert limits.fits(nf4_dequant.merged_smem(block_k, elem_bytes, r_pad))


def test_the_s_kernel_tile_of_ordinary_qlora_training_fits_an_rtx_4090():
    """With dropout the default forward runs the S kernel. Its 64x128, 3-stage tile needs 114,688 B at rank
    128 in bf16 on sm_80/sm_89 (more than an RTX 4090's 101,376 B, and it spills on an A100): rank 128 takes
    a 32x64 tile everywhere, rank 64 the large tile only where it fits (an H100, not an RTX 4090)."""
    from lora_triton.kernels.lora_s import s_kernel_smem

    sm89, sm90 = configs.named_archs()[89], configs.named_archs()[90]
    for limits in (sm89, sm90, None):
        assert configs.s_kernel_tile(2, 128, limits) == (32, 64, 3)
        assert sm89.fits(s_kernel_smem(32, 64, 3, 2, 128))
    assert configs.s_kernel_tile(2, 64, sm90) == (64, 128, 3)
    assert configs.s_kernel_tile(2, 64, sm89) == (32, 64, 3)
    assert configs.s_kernel_tiles(4, 128, sm89) == ((16, 32, 1),)


def test_the_next_config_runs_when_triton_finds_one_too_large(monkeypatch):
    """The estimate is a bound, not the compiler: should Triton still raise ``OutOfResources`` (before the
    kernel runs anything), the next config of the list launches, and later calls start there."""
    tried = []

    def launch(config):
        tried.append(config)
        if config == "big":
            raise runtime.out_of_resources()(120_000, 101_376, "shared memory")
        return config

    monkeypatch.setattr(configs, "_FIRST_FITTING", {})
    assert configs.first_fitting(("k", 1), ["big", "small"], launch) == "small"
    assert configs.first_fitting(("k", 1), ["big", "small"], launch) == "small"
    assert tried == ["big", "small", "small"]
    with pytest.raises(runtime.out_of_resources()):
        configs.first_fitting(("k", 2), ["big"], launch)


def test_a_table_config_that_does_not_fit_the_gpu_is_not_chosen(monkeypatch):
    from lora_triton.ops import candidates, dispatch

    big = dict(configs.skinny_bench_configs()[2], num_stages=8)  # 8 stages of a 256 x 128 tile: more than any GPU has
    table = {"format": 1, "gpus": {"G": {"forward": [
        {"m_bucket": 1, "n": 4096, "k": 4096, "r": 128, "candidate": "skinny", "config": big}]}}}
    monkeypatch.setattr(candidates, "gpu_limits", lambda device: configs.named_archs()[89])
    monkeypatch.setattr(candidates, "can_launch", lambda device: True)
    monkeypatch.setattr(candidates, "gpu_name", lambda device: "G")
    problem = candidates.Problem(torch.device("cuda", 0), 1, 4096, 4096, 128, torch.bfloat16)
    rule = candidates.FORWARD[candidates.RULE["forward"][0]]
    assert dispatch.choose("forward", problem, table=table) == (rule, None)
    small = configs.skinny_bench_configs()[0]
    table["gpus"]["G"]["forward"][0]["config"] = small
    assert dispatch.choose("forward", problem, table=table) == (candidates.FORWARD["skinny"], small)


# ----------------------------------------------------------------------------- OutOfResources
def _out_of_resources(*args, **kwargs):
    raise runtime.out_of_resources()(262144, 101376, "shared memory")


def _table_chooses(monkeypatch, operation: str, candidate, config) -> None:
    """Make the dispatcher pick ``candidate`` with ``config`` for ``operation`` as a shipped table point would
    (an explicit table, the one the fallback asks with, is answered as before)."""
    from lora_triton.ops import dispatch

    original = dispatch.choose

    def choose(op, problem, table=None):
        if op == operation and table is None:
            return candidate, config
        return original(op, problem, table)

    monkeypatch.setattr(dispatch, "choose", choose)


def test_a_launch_that_does_not_fit_falls_back_to_dequant_with_one_warning(monkeypatch, device):
    from lora_triton.ops import candidates, lora_nf4

    p = random_lora_problem(4, 64, 128, 8, torch.float32, 64, True, True, device, seed=6)
    op = candidates.Operands(p["x"], p["weight"], p["lora_a"], p["lora_b"], p["bias"], p["scale"], 0.0, None)
    expected = lora_nf4.layer_forward(op, "triton")  # the rule: dequant
    too_large = dataclasses.replace(candidates.FORWARD["skinny"], launch=_out_of_resources)
    _table_chooses(monkeypatch, "forward", too_large, {"split_k": 2})
    monkeypatch.setattr(lora_nf4, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="candidate 'skinny' .*does not fit") as caught:
        y, s = lora_nf4.layer_forward(op, "triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call warns no more
        again = lora_nf4.layer_forward(op, "triton")
    assert len([w for w in caught if "does not fit" in str(w.message)]) == 1
    assert torch.equal(y, expected[0]) and torch.equal(s, expected[1]) and torch.equal(again[0], y)


def test_a_dx_launch_that_does_not_fit_falls_back_to_dequant(monkeypatch, device):
    from lora_triton.ops import candidates, lora_nf4

    p = random_lora_problem(4, 64, 128, 8, torch.float32, 64, True, False, device, seed=7)
    op = candidates.Operands(p["x"], p["weight"], p["lora_a"], p["lora_b"], None, p["scale"], 0.0, None)
    y, s = lora_nf4.layer_forward(op, "triton")
    dy = torch.randn_like(y)
    call = lambda: lora_nf4.layer_backward(op, dy, s, "triton", (True, True, True, False))  # noqa: E731
    expected = call()
    too_large = dataclasses.replace(candidates.DX["fused"], launch=_out_of_resources)
    _table_chooses(monkeypatch, "dx", too_large, None)
    monkeypatch.setattr(lora_nf4, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="dx candidate 'fused'"):
        grads = call()
    assert torch.equal(grads.dx, expected.dx) and torch.equal(grads.dA, expected.dA)


# ----------------------------------------------------------------------------- on a GPU
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest --device cuda)")


@cuda_only
def test_launches_on_two_streams_at_once_give_each_its_own_result(device):
    if device.type != "cuda":
        pytest.skip("GPU test")
    from lora_triton.ops import candidates

    problems = [random_lora_problem(8, 4096, 4096, 16, torch.bfloat16, 64, True, True, device, seed=s) for s in (1, 2)]
    config = dict(split_k=8)
    skinny = lambda p: candidates.run_forward("skinny", p["x"], p["weight"], p["lora_a"], p["lora_b"],  # noqa: E731
                                              p["scale"], p["bias"], config=config)
    expected = [skinny(p) for p in problems]
    streams = [torch.cuda.Stream() for _ in problems]
    torch.cuda.synchronize()
    results = [[], []]
    for _ in range(20):
        for i, (p, stream) in enumerate(zip(problems, streams)):
            with torch.cuda.stream(stream):
                results[i].append(skinny(p))
    torch.cuda.synchronize()
    for i in range(2):
        assert all(torch.equal(y, expected[i][0]) for y, _ in results[i])


@cuda_only
def test_a_captured_cuda_graph_replays_the_split_k_kernel_exactly(device):
    if device.type != "cuda":
        pytest.skip("GPU test")
    from lora_triton.ops import candidates

    p = random_lora_problem(4, 4096, 4096, 16, torch.bfloat16, 64, True, True, device, seed=3)
    call = lambda x: candidates.run_forward("skinny", x, p["weight"], p["lora_a"], p["lora_b"],  # noqa: E731
                                            p["scale"], p["bias"], config=dict(split_k=8))[0]
    x_static = p["x"].clone()
    eager = call(x_static)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(x_static)  # warm-up on a side stream, as torch's docs do it
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = call(x_static)
    for _ in range(3):
        graph.replay()
        call(x_static)  # an eager launch between replays shares nothing with the graph
    torch.cuda.synchronize()
    assert torch.equal(y_static, eager)


@cuda_only
def test_a_launch_leaves_the_callers_current_device(device):
    if device.type != "cuda":
        pytest.skip("GPU test")
    from lora_triton.ops import lora_nf4_linear

    last = torch.device("cuda", torch.cuda.device_count() - 1)
    p = random_lora_problem(4, 256, 256, 8, torch.bfloat16, 64, True, False, last, seed=8)
    before = torch.cuda.current_device()
    y = lora_nf4_linear(p["x"], p["weight"], p["lora_a"], p["lora_b"], p["scale"], backend="triton")
    assert torch.cuda.current_device() == before and y.device == last


def test_importing_the_package_imports_no_triton():
    """Triton fixes its interpreter switch when it is first imported: the package must leave that to the
    caller (the static report's compile workers, the tests' ``TRITON_INTERPRET``)."""
    import subprocess
    import sys

    code = "import sys, lora_triton, lora_triton.kernels.runtime, lora_triton.bench.static; print('triton' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
