"""Helpers shared by tests, benchmarks and docs: error measures, random problems, a tiny model.

The error measure is the one the project promises: ``||out - ref|| / ||ref||`` with the
reference computed in float64. A kernel is held to flash-attention's rule (``assert_like_torch``):
its error at most ``TORCH_FACTOR`` times plain torch's own error at the same dtype and shape, on the
same rounded inputs. ``REL_TOL`` (fixed bounds per dtype) is for the layers and models, where no
plain-torch twin of the same computation exists.
"""

from __future__ import annotations

import torch
from torch import nn

from .format import NF4Weight

#: The seven projections of a Llama decoder layer (``target_modules`` for all of them).
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: Relative-error bounds (||out-ref||/||ref||) per activation dtype for kernel outputs.
#: fp32 accumulates in fp32 (u = 6e-8, sums of a few thousand terms give ~1e-6);
#: fp16/bf16 outputs are rounded once to u = 4.9e-4 / 3.9e-3 and their inputs were rounded
#: too, so a few units of u bound the error of a correct kernel.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref||_F / ||ref||_F`` computed in float64 (0 when both are zero)."""
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    denom = ref64.norm()
    if denom == 0:
        return float((out64 - ref64).norm())
    return float((out64 - ref64).norm() / denom)


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, what: str = "") -> float:
    """Assert shapes match, ``out`` is finite and its relative error is within ``REL_TOL``.

    ``dtype`` picks the bound (default ``out.dtype``). Returns the error for reporting.
    """
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values in output"
    tol = REL_TOL[dtype or out.dtype]
    err = relative_error(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} exceeds {tol:.1e} for {dtype or out.dtype}"
    return err


#: A kernel's error may be this many times plain torch's own at the same dtype and shape.
TORCH_FACTOR = 2.0
#: Relative error below which two correct fp32 results of a few thousand-term sums cannot be told apart.
TORCH_SLACK = 1e-6


def torch_error_bound(plain: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(plain torch's relative error, the bound a kernel's error must keep)`` against ``ref`` (float64)."""
    torch_error = relative_error(plain, ref)
    return torch_error, TORCH_FACTOR * torch_error + TORCH_SLACK


def assert_like_torch(out: torch.Tensor, ref: torch.Tensor, plain: torch.Tensor, what: str = "") -> float:
    """Assert ``out`` has ``ref``'s shape, is finite, and its error against ``ref`` (float64) is within
    ``TORCH_FACTOR`` times that of ``plain`` (plain torch at out's dtype on the same inputs) plus
    ``TORCH_SLACK``. Returns the error."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values in output"
    err = relative_error(out, ref)
    torch_error, bound = torch_error_bound(plain, ref)
    assert err <= bound, f"{what}: relative error {err:.3e} > {TORCH_FACTOR} x plain torch's {torch_error:.3e}"
    return err


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN in place (integer tensors with their max value): a kernel that
    forgets to write an element then fails the comparison instead of passing on stale data."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)


def random_lora_problem(
    m: int,
    n: int,
    k: int,
    r: int,
    dtype: torch.dtype = torch.float32,
    blocksize: int = 64,
    double_quant: bool = True,
    bias: bool = False,
    device: torch.device | str = "cpu",
    seed: int | None = None,
) -> dict:
    """Fresh random inputs of a LoRA-on-NF4 layer, scaled like a real layer.

    Returns a dict with ``x [m, k]`` (dtype), ``weight`` (NF4Weight of a ``[n, k]`` bf16
    weight), ``lora_a [r, k]``, ``lora_b [n, r]`` (dtype, both non-zero), ``scale`` and
    ``bias [n]`` or None.
    """
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    randn = lambda *shape, std=1.0: (torch.randn(*shape, generator=gen) * std)  # noqa: E731
    w = randn(n, k, std=k**-0.5).to(torch.bfloat16)
    return {
        "x": randn(m, k).to(dtype).to(device),
        "weight": NF4Weight.quantize(w, blocksize, double_quant).to(device),
        "lora_a": randn(r, k, std=k**-0.5).to(dtype).to(device),
        "lora_b": randn(n, r, std=r**-0.5).to(dtype).to(device),
        "scale": 2.0 / r,
        "bias": randn(n).to(dtype).to(device) if bias else None,
    }


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128) -> nn.Module:
    """A tiny ``transformers`` causal LM built from a config (random init, nothing downloaded):
    a fp32 ``LlamaForCausalLM`` (hidden ``hidden``, MLP ``2*hidden``, 4 heads / 2 KV heads,
    untied head) with weights drawn from ``seed``: the same seed gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=128, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


#: The meta columns every benchmark table's rows must fill.
BENCH_META = ("device", "threads", "torch", "timestamp", "peak_copy_gbps", "peak_matmul_tflops", "peak_matmul_dtype")


def bnb_and_peft_installed() -> bool:
    """Whether the bitsandbytes + PEFT contenders can run here (both importable)."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        return False
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True
