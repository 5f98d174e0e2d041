"""The native CUDA kernels (top-level kernels/).

Any machine with nvcc (skipped, with the reason, without it): one nvcc call per session builds
the library for sm_90 with ``-Xptxas -v`` and its resource report is checked (no spills, no
local memory, registers within the launch bounds); the kernels' NF4 decode, compiled for the host
from the same header, must reproduce ``NF4Weight.dequantize`` bit for bit on all 256 byte values
with both absmax kinds; the C interface's own argument checks are called through ctypes (they
run before any CUDA call, so no GPU is needed).

Any machine: the Python side's input validation and its behaviour without the library.

``--device cuda`` only: the op against the float64 reference, the weight it decodes bit for bit,
determinism, CUDA graphs and torch.compile. bench/gpu_check.sh runs this file on the GPU.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lora_triton.format import NF4Weight
from lora_triton.format.codebooks import dynamic_map_signed, nf4_code
from lora_triton.kernels import native
from lora_triton.ops import candidates, configs, dispatch, native_op
from lora_triton.reference import lora_forward
from lora_triton.testing import random_lora_problem

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA sources cannot be compiled here")
THREADS, MIN_BLOCKS_PER_SM = 128, 4  # kThreads and kMinBlocksPerSM of nf4_lora_gemv.cu
MAIN_VARIANTS = 2 * 2 * 2 * 2 * 2  # dtype x double quant x table x row tiles (2, 4) x token tiles (8, 16)
SHRINK_VARIANTS = 2 * 2  # dtype x token tiles


# ============================================================================ built once per session
@dataclass(frozen=True)
class KernelUsage:
    """One kernel's line of the ptxas report."""

    name: str  # demangled
    arch: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    smem_bytes: int


def parse_ptxas(text: str) -> list[KernelUsage]:
    """Every kernel of an ``-Xptxas -v`` report (``Compiling entry function`` ... ``Used N registers``)."""
    usages, entry, frame = [], None, None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'", line):
            entry, frame = (m.group(1), m.group(2)), None
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            frame = tuple(int(v) for v in m.groups())
        elif (m := re.search(r"Used (\d+) registers.*?(\d+) bytes smem", line)) and entry:
            stack, stores, loads = frame or (0, 0, 0)
            usages.append(KernelUsage(entry[0], entry[1], int(m.group(1)), stack, stores, loads, int(m.group(2))))
            entry = None
    return [_renamed(u, name) for u, name in zip(usages, _demangle([u.name for u in usages]))]


def _renamed(usage: KernelUsage, name: str) -> KernelUsage:
    return KernelUsage(name, usage.arch, usage.registers, usage.stack_bytes, usage.spill_store_bytes,
                       usage.spill_load_bytes, usage.smem_bytes)


def _demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt")
    if filt is None or not names:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done


#: What CMake builds by default: every arch the package names (ops.configs.named_archs()).
ARCHS = sorted(configs.named_archs())


@pytest.fixture(scope="session")
def native_build(tmp_path_factory) -> tuple[Path, list[KernelUsage]]:
    """The library built for sm_80, sm_86, sm_89 and sm_90 by one nvcc call (as CMake builds it) and its
    ptxas report."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources cannot be compiled here")
    out = tmp_path_factory.mktemp("native") / native.LIBRARY_FILE
    targets = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    done = _run([NVCC, "-std=c++17", "-O3", *targets, "--threads=0", "-shared", "-Xcompiler",
                 "-fPIC,-fvisibility=hidden", "-cudart", "static", "-Xptxas", "-v", "-o", str(out),
                 *map(str, sorted(KERNELS.glob("*.cu")))])
    return out, parse_ptxas(done.stderr + done.stdout)


@pytest.fixture(scope="session")
def decode_check(tmp_path_factory) -> Path:
    """kernels/host/decode_check.cpp: the kernels' decode header compiled for the host."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH: the CUDA headers the decode uses are not here")
    exe = tmp_path_factory.mktemp("host") / "decode_check"
    _run([NVCC, "-std=c++17", "-O2", "-cudart", "none", "-Xcompiler", "-ffp-contract=off", "-o", str(exe),
          str(KERNELS / "host" / "decode_check.cpp")])
    return exe


@pytest.fixture
def built_library(native_build, monkeypatch) -> ctypes.CDLL:
    """The session's library, found through LORA_TRITON_NATIVE_LIB (read at call time)."""
    monkeypatch.setenv(native.ENV_VAR, str(native_build[0]))
    return native.require_library()


# ============================================================================ ptxas resource usage
@needs_nvcc
def test_every_kernel_variant_is_compiled(native_build):
    usages = native_build[1]
    assert {u.arch for u in usages} == {f"sm_{a}" for a in ARCHS}
    for arch in ARCHS:
        names = [u.name for u in usages if u.arch == f"sm_{arch}"]
        assert len(names) == MAIN_VARIANTS + SHRINK_VARIANTS, (arch, names)
        assert sum("Nf4Rows" in n for n in names) == MAIN_VARIANTS
        assert sum("DenseRows" in n for n in names) == SHRINK_VARIANTS


@needs_nvcc
def test_no_kernel_spills_or_uses_local_memory(native_build):
    for u in native_build[1]:
        assert u.spill_store_bytes == u.spill_load_bytes == 0, f"{u.name}: spills {u}"
        assert u.stack_bytes == 0, f"{u.name}: {u.stack_bytes} bytes of stack frame (local memory)"


#: Shared memory per SM (the limits in ops/kernel_configs.json): 4 CTAs of the largest variant fit sm_80 and sm_90, 3 fit sm_86 / sm_89.
SMEM_PER_SM = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}


@needs_nvcc
def test_registers_and_shared_memory_fit_every_named_gpu(native_build):
    # __launch_bounds__(128, 4): ptxas must fit 128 registers or spill; static shared memory stays under
    # the 48 KB per-CTA limit on every arch, and 4 CTAs fit an SM of an A100 or an H100 (3 on sm_86/89).
    for u in native_build[1]:
        arch = int(u.arch.removeprefix("sm_").rstrip("a"))
        assert u.registers <= 65536 // (THREADS * MIN_BLOCKS_PER_SM), f"{u.name} ({u.arch}): {u.registers} registers"
        assert u.smem_bytes <= 48 * 1024 and configs.named_archs()[arch].fits(u.smem_bytes, u.registers, THREADS // 32), u
        ctas = MIN_BLOCKS_PER_SM if arch in (80, 90) else 3
        assert ctas * (u.smem_bytes + 1024) <= SMEM_PER_SM[arch], u


@needs_nvcc
def test_the_library_exports_only_the_c_interface(native_build):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not on PATH")
    exported = _run([nm, "-D", "--defined-only", str(native_build[0])]).stdout
    symbols = {line.split()[-1] for line in exported.splitlines() if " T " in line}
    assert symbols == {"lt_abi_version", "lt_last_error", "lt_nf4_lora_plan", "lt_nf4_lora_forward"}


# ============================================================================ host-compiled decode
def _all_bytes_weight(double_quant: bool, blocksize: int, seed: int) -> NF4Weight:
    """An NF4 weight whose packed bytes run through all 256 values (every nibble pair), with block
    scales spread over 1e-7..1e3 (fp16 subnormals and overflow included) and, with double quant,
    every 8-bit absmax code."""
    gen = torch.Generator().manual_seed(seed)
    n, k = 64, 512  # 256 * 64 bytes; several nested groups of 256 blocks at blocksize 32 / 64
    packed = torch.arange(256, dtype=torch.uint8).repeat(n * k // 512)
    packed = packed[torch.randperm(packed.numel(), generator=gen)]
    n_blocks = n * k // blocksize
    fields = dict(packed=packed, code=nf4_code(), shape=(n, k), blocksize=blocksize, dtype=torch.bfloat16)
    if not double_quant:
        absmax = 10.0 ** (torch.rand(n_blocks, generator=gen) * 10 - 7)
        return NF4Weight(absmax=absmax.float(), **fields)
    q = torch.randint(0, 256, (n_blocks,), generator=gen, dtype=torch.uint8)
    every = min(256, n_blocks)
    q[:every] = torch.arange(every, dtype=torch.uint8)
    nested = 10.0 ** (torch.rand(-(-n_blocks // 256), generator=gen) * 6 - 4)
    return NF4Weight(absmax=q, nested_absmax=nested.float(), nested_code=dynamic_map_signed(),
                     offset=torch.tensor(0.37, dtype=torch.float32), **fields)


DECODE_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # float32: the product before rounding


def _decode_input(weight: NF4Weight, dtype: torch.dtype) -> bytes:
    raw = lambda t: t.contiguous().numpy().tobytes()  # noqa: E731
    head = struct.pack("<iiiqq", DECODE_DTYPES[dtype], int(weight.double_quant), weight.blocksize,
                       weight.numel, weight.n_blocks)
    parts = [head, raw(weight.packed), raw(weight.code), raw(weight.absmax)]
    if weight.double_quant:
        parts += [raw(weight.nested_absmax), raw(weight.nested_code), raw(weight.offset.reshape(1))]
    return b"".join(parts)


@needs_nvcc
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("double_quant", [False, True], ids=["fp32-absmax", "double-quant"])
@pytest.mark.parametrize("dtype", list(DECODE_DTYPES), ids=str)
def test_host_decode_is_bit_identical_to_nf4weight_dequantize(decode_check, dtype, double_quant, blocksize):
    weight = _all_bytes_weight(double_quant, blocksize, seed=blocksize + double_quant)
    done = subprocess.run([str(decode_check)], input=_decode_input(weight, dtype), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    decoded = torch.frombuffer(bytearray(done.stdout), dtype=bits)
    expected = weight.dequantize(dtype).reshape(-1).view(bits)
    assert decoded.numel() == expected.numel()
    mismatched = (decoded != expected).nonzero().reshape(-1)
    assert mismatched.numel() == 0, (f"{mismatched.numel()} weights differ, first at {int(mismatched[0])}: "
                                     f"{int(decoded[mismatched[0]]):#06x} != {int(expected[mismatched[0]]):#06x}")


# ============================================================================ the C interface's checks
def _plan(lib, m, n, k, r, config=None, sms=132):
    plan = native.Plan()
    cfg = None if config is None else ctypes.byref(native.Config(*config))
    return lib.lt_nf4_lora_plan(m, n, k, r, cfg, sms, ctypes.byref(plan)), plan


@needs_nvcc
@pytest.mark.parametrize("shape,config,message", [
    ((0, 64, 128, 4), None, "M \\(tokens\\) must be in 1..16"),
    ((17, 64, 128, 4), None, "M \\(tokens\\) must be in 1..16"),
    ((1, 64, 48, 4), None, "multiple of 32"),
    ((1, 0, 128, 4), None, "N \\(out_features\\)"),
    ((1, 64, 128, 129), None, "rank must be in 1..128"),
    ((1, 64, 128, 4), (0, 3, 0), "row_tiles"),
    ((1, 64, 128, 4), (0, 0, 2), "table"),
    ((1, 64, 128, 4), (-1, 0, 0), "split_k"),
])
def test_the_plan_refuses_bad_shapes_and_configs(built_library, shape, config, message):
    status, _ = _plan(built_library, *shape, config=config)
    assert status == native.LT_ERR_INVALID
    assert re.search(message, native.last_error(built_library))


@needs_nvcc
def test_the_plan_fills_the_gpu_and_sizes_its_scratch(built_library):
    status, plan = _plan(built_library, 1, 4096, 4096, 16)
    assert status == native.LT_OK and plan.row_tiles == 4
    tiles = 4096 // 64
    assert tiles * plan.split_k >= 132 * 2  # split-K brings 64 tiles to several CTAs per SM
    shrink_tiles, m = 1, 1  # fp32 partials [split][tile][rows of a tile][m] of both kernels
    assert plan.workspace_bytes == 4 * m * (plan.split_k * tiles * 64 + plan.shrink_split_k * shrink_tiles * 16)
    assert plan.counters == tiles + shrink_tiles
    status, plan = _plan(built_library, 16, 64, 128, 16, config=(1, 2, 1))  # one chunk of K: no split anywhere
    assert status == native.LT_OK and (plan.split_k, plan.shrink_split_k, plan.row_tiles) == (1, 1, 2)
    assert plan.workspace_bytes == 0 and plan.counters == 0
    status, plan = _plan(built_library, 2, 4096, 4096, 16, config=(3, 0, 0))  # 32 chunks in 3 splits of 11
    assert status == native.LT_OK and plan.split_k == 3


def _forward_status(lib, *, dtype=native.LT_BF16, x=4096, packed=4096, lora_a=4096, blocksize=64,
                    double_quant=0, nested=4096, workspace_bytes=1 << 20, counters=1024, m=1, n=64, k=128):
    """lt_nf4_lora_forward on fake (never dereferenced) addresses: every check below runs before
    the library touches CUDA (device -1: leave the current device alone)."""
    weight = native.Nf4Weight(packed, 4096, 4096, nested, nested, 0.0, double_quant, n, k, blocksize)
    status = lib.lt_nf4_lora_forward(dtype, x, m, ctypes.byref(weight), lora_a, 4096, 4, 1.0, None, 4096, 4096,
                                     None, 132, 4096 if workspace_bytes else None, workspace_bytes, 4096, counters,
                                     -1, None)
    return status, native.last_error(lib)


@needs_nvcc
@pytest.mark.parametrize("args,status,message", [
    (dict(dtype=7), native.LT_ERR_INVALID, "dtype"),
    (dict(x=0), native.LT_ERR_INVALID, "pointer is NULL"),
    (dict(blocksize=48), native.LT_ERR_INVALID, "power of two in 32..4096"),
    (dict(blocksize=8192), native.LT_ERR_INVALID, "power of two in 32..4096"),
    (dict(double_quant=1, nested=0), native.LT_ERR_INVALID, "nested_absmax"),
    (dict(x=4104), native.LT_ERR_INVALID, "16-byte boundaries"),
    (dict(packed=4097), native.LT_ERR_INVALID, "16-byte boundaries"),
    (dict(m=20), native.LT_ERR_INVALID, "1..16"),
    (dict(workspace_bytes=0, k=4096), native.LT_ERR_WORKSPACE, "workspace"),
    (dict(counters=0, k=4096), native.LT_ERR_WORKSPACE, "counters"),
])
def test_the_forward_entry_point_checks_its_arguments(built_library, args, status, message):
    got, text = _forward_status(built_library, **args)
    assert got == status and message in text


# ============================================================================ the Python side
@pytest.fixture
def no_library(monkeypatch, tmp_path):
    monkeypatch.setenv(native.ENV_VAR, str(tmp_path / "nothing-here.so"))


def _problem(m=2, n=72, k=128, r=8, dtype=torch.bfloat16):
    return random_lora_problem(m, n, k, r, dtype, 64, True, True, "cpu", seed=3)


def _native(p, **over):
    args = dict(x=p["x"], weight=p["weight"], lora_a=p["lora_a"], lora_b=p["lora_b"], scale=p["scale"],
                bias=p["bias"])
    args.update(over)
    return native_op.native_forward(**args)


def test_without_the_library_nothing_claims_it_and_asking_says_how_to_build(no_library):
    assert native.library() is None
    problem = candidates.Problem(torch.device("cuda"), 1, 4096, 4096, 16, torch.bfloat16)
    assert not candidates.FORWARD["native"].supports(problem)
    with pytest.raises(RuntimeError, match="cmake -S . -B build/native") as err:
        _native(_problem())
    assert native.ENV_VAR in str(err.value) and "nothing-here.so" in str(err.value)


def test_the_library_path_is_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv(native.ENV_VAR, str(tmp_path / "a.so"))
    assert native.search_paths() == [tmp_path / "a.so"]
    monkeypatch.delenv(native.ENV_VAR)
    assert native.search_paths()[0] == native.checkout_root() / "build" / "native" / native.LIBRARY_FILE


def test_a_file_that_is_not_a_library_is_reported(monkeypatch, tmp_path):
    bogus = tmp_path / "liblora_triton_native.so"
    bogus.write_text("not an ELF file")
    monkeypatch.setenv(native.ENV_VAR, str(bogus))
    assert native.library() is None
    assert "cannot be loaded" in native.missing_message()


def _sliced_weight(p):
    w = p["weight"]
    return NF4Weight.from_validated_fields(packed=w.packed, absmax=w.absmax.float(), code=w.code,
                                           nested_absmax=w.nested_absmax, nested_code=w.nested_code, offset=w.offset,
                                           shape=w.shape, blocksize=w.blocksize, dtype=w.dtype,
                                           offset_value=w.offset_value)


@pytest.mark.parametrize("make_bad,error,message", [
    (lambda p: dict(x=p["x"].float()), TypeError, "bf16 or fp16"),
    (lambda p: dict(x=p["x"][0]), ValueError, "2-D"),
    (lambda p: dict(x=p["x"].repeat(9, 1)), ValueError, "M <= 16"),
    (lambda p: dict(x=torch.empty(128, 2, dtype=torch.bfloat16).t()), ValueError, "contiguous"),
    (lambda p: dict(x=p["x"][:1].expand(2, 128)), ValueError, "zero stride"),
    (lambda p: dict(x=p["x"][:, :64]), ValueError, "shape"),
    (lambda p: dict(lora_a=p["lora_a"].half()), TypeError, "lora_a must have dtype"),
    (lambda p: dict(lora_b=p["lora_b"][:, :4]), ValueError, r"lora_b \[out_features=72, r\]"),
    (lambda p: dict(lora_a=torch.zeros(0, 128, dtype=torch.bfloat16), lora_b=torch.zeros(72, 0, dtype=torch.bfloat16)),
     ValueError, "with r >= 1"),
    (lambda p: dict(bias=p["bias"][:10]), ValueError, "bias must have shape"),
    (lambda p: dict(x=p["x"].to("meta")), ValueError, "but x is on meta"),
    (lambda p: dict(scale=torch.tensor(1.0)), TypeError, "scale must be a Python number"),
    (lambda p: dict(weight=p["weight"].dequantize()), TypeError, "must be an NF4Weight"),
    (lambda p: dict(weight=_sliced_weight(p)), TypeError, "absmax \\(double-quantized\\) must have dtype"),
])
def test_bad_inputs_get_clear_errors(make_bad, error, message):
    p = _problem()
    with pytest.raises(error, match=message):
        _native(p, **make_bad(p))


def test_k_must_hold_whole_blocks_like_the_triton_path():
    p = random_lora_problem(1, 8, 96, 4, torch.bfloat16, 64, True, False, "cpu", seed=1)
    with pytest.raises(ValueError, match="K=96 is not a multiple of the block size 64"):
        _native(p)


@pytest.mark.parametrize("config,message", [
    (dict(splits=2), "unknown keys"), (dict(split_k=-1), "split_k"), (dict(split_k=True), "split_k"),
    (dict(row_tiles=3), "row_tiles"), (dict(table="texture"), "table"),
])
def test_bad_configs_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        native_op.check_config(config)


@needs_nvcc
def test_valid_inputs_off_cuda_say_where_it_runs(built_library):
    with pytest.raises(RuntimeError, match="run on CUDA tensors"):
        _native(_problem())


def test_the_fake_kernel_gives_shapes_without_running():
    p = _problem(m=3, n=40, r=5)
    w = p["weight"].to("meta")
    y, s = native_op._native_op(p["x"].to("meta"), w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code,
                                    0.5, 40, 128, 64, p["lora_a"].to("meta"), p["lora_b"].to("meta"), 1.0, None,
                                    0, 0, 0)
    assert (y.shape, s.shape, y.device.type, y.dtype) == ((3, 40), (3, 5), "meta", torch.bfloat16)


# ============================================================================ on a GPU (--device cuda)
@pytest.fixture
def cuda_library(device):
    """The library on a GPU run; skipped (or failed, with LORA_TRITON_REQUIRE_NATIVE=1) when absent."""
    if device.type != "cuda":
        pytest.skip("runs with --device cuda")
    if native.library() is None:
        message = native.missing_message()
        if os.environ.get("LORA_TRITON_REQUIRE_NATIVE") == "1":
            pytest.fail(message)
        pytest.skip(message)


UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _check_against_float64(p, y, s):
    """Elementwise: |out - ref| <= 4u * (the same sum of absolute values), u the dtype's unit roundoff.

    The kernel's error is one rounding of the output (u |y|), the rounding of S before the B
    product (u s|S||B|), fp32 accumulation (K 2^-24 |x||W|, far below u) and the inputs are exact
    in the reference: 2u of the absolute sum bounds it, 4u leaves room. An element the kernel
    never wrote, or wrote at the wrong place, fails.
    """
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    y_ref, s_ref = lora_forward(f64(p["x"]), p["weight"], f64(p["lora_a"]), f64(p["lora_b"]), p["scale"],
                                f64(p["bias"]))
    ax, aw, aa, ab = (t.double().abs() for t in (p["x"], p["weight"].dequantize(torch.float64), p["lora_a"],
                                                   p["lora_b"]))
    u = UNIT_ROUNDOFF[p["x"].dtype]
    s_bound = 4 * u * (ax @ aa.t()) + 1e-30
    y_mass = ax @ aw.t() + p["scale"] * (s_ref.abs() @ ab.t())
    if p["bias"] is not None:
        y_mass = y_mass + p["bias"].double().abs()
    assert y.dtype == s.dtype == p["x"].dtype and y.shape == y_ref.shape and s.shape == s_ref.shape
    s_err, y_err = (s.double() - s_ref).abs(), (y.double() - y_ref).abs()
    assert bool((s_err <= s_bound).all()), f"S: worst excess {float((s_err / s_bound).max()):.2f}x the bound"
    assert bool((y_err <= 4 * u * y_mass + 1e-30).all()), \
        f"y: worst excess {float((y_err / (4 * u * y_mass + 1e-30)).max()):.2f}x the bound"


# (M, N, K, r, blocksize, double quant, bias): M 1, 2, 3, 16; odd N (never a multiple of a tile);
# K with a partial 128-wide chunk (96, 320) and long enough to split (4096); ranks 1, 16, 64, 128.
GPU_CASES = [
    (1, 4097, 4096, 16, 64, True, False),
    (2, 999, 320, 1, 32, False, True),
    (3, 255, 96, 64, 32, True, True),
    (16, 1001, 4096, 16, 64, True, True),
    (16, 33, 1024, 128, 256, False, False),
    (5, 2049, 8192, 64, 4096, True, True),  # two blocks of bitsandbytes' largest block size per row
    (9, 127, 512, 16, 128, False, True),
]
CONFIGS = [dict(), dict(split_k=1, row_tiles=2), dict(split_k=3, row_tiles=4, table="register"),
           dict(table="register")]


@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "M{}-N{}-K{}-r{}-bs{}-dq{:d}-bias{:d}".format(*c))
def test_every_gpu_case_is_a_problem_the_kernels_take(case):
    """Checked on CPU: a GPU case that the validation refuses would only fail in the rare GPU run."""
    m, n, k, r, blocksize, double_quant, bias = case
    p = random_lora_problem(m, n, k, r, torch.bfloat16, blocksize, double_quant, bias, "cpu", seed=0)
    native_op.validate(p["x"], p["weight"], p["lora_a"], p["lora_b"], p["bias"], p["scale"])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "M{}-N{}-K{}-r{}-bs{}-dq{:d}-bias{:d}".format(*c))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_the_float64_reference(cuda_library, device, dtype, case, config):
    m, n, k, r, blocksize, double_quant, bias = case
    p = random_lora_problem(m, n, k, r, dtype, blocksize, double_quant, bias, device, seed=sum(case))
    y, s = native_op.native_forward(p["x"], p["weight"], p["lora_a"], p["lora_b"], p["scale"], p["bias"],
                                             config)
    _check_against_float64(p, y, s)


@pytest.mark.parametrize("table", list(native.TABLES))
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_kernel_decodes_w_bit_identical_to_dequantize(cuda_library, device, dtype, double_quant, table):
    # one-hot tokens and A = 0: y[m, n] = W[n, k_m] * 1 exactly, so y holds columns of the W the kernel used
    n, k = 300, 512
    p = random_lora_problem(16, n, k, 4, dtype, 64, double_quant, False, device, seed=11)
    lora_a = torch.zeros_like(p["lora_a"])
    expected = p["weight"].dequantize(dtype)
    for first in range(0, k, 16):
        x = torch.zeros(16, k, dtype=dtype, device=device)
        x[torch.arange(16), first + torch.arange(16)] = 1
        y, _ = native_op.native_forward(x, p["weight"], lora_a, p["lora_b"], 1.0, None,
                                                 dict(table=table, split_k=2))
        assert torch.equal(y.t(), expected[:, first:first + 16]), f"columns {first}..{first + 15} differ"


def test_split_k_is_deterministic_and_leaves_the_current_device(cuda_library, device):
    p = random_lora_problem(4, 1000, 4096, 16, torch.bfloat16, 64, True, True, device, seed=5)
    run = lambda: native_op.native_forward(p["x"], p["weight"], p["lora_a"], p["lora_b"],  # noqa: E731
                                                    p["scale"], p["bias"], dict(split_k=7))
    before = torch.cuda.current_device()
    first, again = run(), run()
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert torch.cuda.current_device() == before


def test_runs_in_a_cuda_graph_and_under_torch_compile(cuda_library, device):
    p = random_lora_problem(2, 513, 1024, 16, torch.float16, 64, True, True, device, seed=9)
    call = lambda x: native_op.native_forward(x, p["weight"], p["lora_a"], p["lora_b"],  # noqa: E731
                                                       p["scale"], p["bias"])[0]
    eager = call(p["x"])
    graph, x_static = torch.cuda.CUDAGraph(), p["x"].clone()
    call(x_static)  # warm-up outside the capture, as torch's docs do it
    with torch.cuda.graph(graph):
        y_static = call(x_static)
    graph.replay()
    assert torch.equal(y_static, eager)
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True)  # fullgraph: a graph break would raise
    assert torch.equal(compiled(p["x"]), eager)


def test_the_dispatch_candidate_supports_decode_sizes_only(cuda_library, device):
    supports = candidates.FORWARD["native"].refuses
    assert supports(candidates.Problem(device, 1, 4096, 4096, 16, torch.bfloat16)) is None
    assert supports(candidates.Problem(device, 16, 4096, 4096, 16, torch.float16)) is None
    assert supports(candidates.Problem(device, 17, 4096, 4096, 16, torch.bfloat16)) is not None
    assert supports(candidates.Problem(device, 1, 4096, 4096, 16, torch.float32)) is not None


def test_a_table_naming_native_gives_way_where_native_refuses(monkeypatch):
    """A dispatch table naming ``native`` reaches it; with dropout or fp32 (which it does not take) the
    rule's candidate runs instead of a failure."""
    from dataclasses import replace

    monkeypatch.setattr(candidates, "can_launch", lambda device: True)
    monkeypatch.setattr(candidates, "gpu_name", lambda device: "GPU")
    monkeypatch.setattr(native, "library", lambda: object())
    point = {"m_bucket": 2, "n": 40, "k": 128, "r": 4, "candidate": "native", "config": {"table": "register"}}
    table = {"format": dispatch.TABLE_FORMAT, "gpus": {"GPU": {"forward": [point]}}}
    problem = candidates.Problem(torch.device("cuda"), 2, 40, 128, 4, torch.bfloat16)
    assert dispatch.choose("forward", problem, table) == (candidates.FORWARD["native"], {"table": "register"})
    for other in (replace(problem, dropout=True), replace(problem, dtype=torch.float32)):
        assert dispatch.choose("forward", other, table) == (candidates.FORWARD["dequant"], None)
