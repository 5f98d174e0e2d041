"""NF4 format: bit-exact agreement with bitsandbytes itself (its CPU backend is the oracle)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lora_triton.format import SUPPORTED_BLOCKSIZES, NF4Weight, dynamic_map_signed, nf4_code

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional


def bnb_quantize(w: torch.Tensor, blocksize: int, double_quant: bool):
    return F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantized weight.

    Its native CPU kernel assumes blocks never straddle two rows; when ``K % blocksize != 0``
    it returns values that do not match its own quantization (seen with 0.50.2: error up to
    2.6x the quantization error). There we compare with bitsandbytes' pure-PyTorch backend
    instead, which follows the format's definition.
    """
    n, k = state.shape
    if k % state.blocksize == 0:
        return F.dequantize_4bit(packed, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    plain = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return plain(packed.view(-1), absmax.float(), F.get_4bit_type("nf4", device="cpu"), state.blocksize,
                 state.shape, state.dtype)


def assert_same_as_bnb(w: torch.Tensor, blocksize: int, double_quant: bool) -> NF4Weight:
    packed, state = bnb_quantize(w, blocksize, double_quant)
    ours = NF4Weight.quantize(w, blocksize, double_quant)
    assert torch.equal(ours.packed, packed.view(-1)), "packed bytes differ"
    assert torch.equal(ours.absmax, state.absmax), "absmax differs"
    assert ours.double_quant == state.nested
    if double_quant:
        assert torch.equal(ours.nested_absmax, state.state2.absmax), "nested absmax differs"
        assert torch.equal(ours.nested_code, state.state2.code), "nested quant map differs"
        assert torch.equal(ours.offset, state.offset), "offset differs"
    assert torch.equal(ours.dequantize(), bnb_dequantize(packed, state)), "dequantized values differ"
    return ours


def test_code_books_match_bitsandbytes():
    assert torch.equal(nf4_code(), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map_signed(), F.create_dynamic_map(signed=True))


@pytest.mark.parametrize("blocksize", SUPPORTED_BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_blocksize_and_dtype(blocksize, double_quant, dtype):
    w = torch.randn(96, 320, dtype=dtype)  # 30720 elements: partial blocks for most sizes
    assert_same_as_bnb(w, blocksize, double_quant)


@given(n=st.integers(1, 300), k=st.integers(1, 300), blocksize=st.sampled_from(SUPPORTED_BLOCKSIZES),
       double_quant=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       scale=st.sampled_from([1e-4, 1.0, 50.0]), seed=st.integers(0, 2**31 - 1))
def test_random_shapes(n, k, blocksize, double_quant, dtype, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * scale).to(dtype)
    assert_same_as_bnb(w, blocksize, double_quant)


def test_many_blocks_not_a_multiple_of_256():
    # 513 * 257 elements -> 2061 blocks of 64: the last nested block holds 13 absmax values.
    assert_same_as_bnb(torch.randn(513, 257), 64, True)
    assert_same_as_bnb(torch.randn(1000, 4096) * 0.02, 64, True)


def test_exact_midpoints_between_codes():
    code = nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2
    # Every block has absmax exactly 1 so each value is scaled by exactly 1.
    row = torch.cat([torch.tensor([1.0]), midpoints, -midpoints.flip(0), code, torch.zeros(64 - 47)])
    w = row[:64].repeat(8, 1)
    ours = assert_same_as_bnb(w, 64, True)
    assert_same_as_bnb(w, 64, False)
    codes = torch.stack([ours.packed >> 4, ours.packed & 0xF], 1).reshape(-1)[:64]
    # A value exactly on a midpoint goes to the lower code (bitsandbytes' strict '>').
    assert codes[1:16].tolist() == list(range(15))


def test_zero_blocks_and_tails():
    w = torch.randn(10, 100)
    w[2:5] = 0.0  # whole zero blocks inside the weight
    assert_same_as_bnb(w, 64, True)
    tail_zero = torch.randn(1, 70)
    tail_zero[0, 64:] = 0.0  # a tail block that is all zero
    assert_same_as_bnb(tail_zero, 64, False)
    assert_same_as_bnb(torch.zeros(4, 64), 64, True)
    assert_same_as_bnb(torch.zeros(4, 64), 64, False)


def test_single_block_and_constant_absmax():
    assert_same_as_bnb(torch.randn(1, 64), 64, True)  # one block: absmax - mean = 0
    assert_same_as_bnb(torch.ones(16, 64), 64, True)  # every block has the same absmax


def test_odd_element_count_packs_a_padding_nibble():
    ours = assert_same_as_bnb(torch.randn(3, 5), 32, False)
    assert ours.packed.numel() == 8
    assert int(ours.packed[-1]) & 0xF == 7  # padded with the code of 0.0


def test_packing_high_nibble_first():
    w = torch.tensor([[1.0, -1.0, 0.5, 0.0] + [0.0] * 60])
    ours = NF4Weight.quantize(w, 64, False)
    assert ours.packed[:2].tolist() == [0xF0, 0xC7]


def test_quant_state_blob_is_bitsandbytes_json():
    w = torch.randn(128, 256, dtype=torch.bfloat16)
    _, state = bnb_quantize(w, 64, True)
    ours = NF4Weight.quantize(w, 64, True)
    theirs = state.as_dict(packed=True)["quant_state.bitsandbytes__nf4"]
    assert torch.equal(ours.to_bnb_state_dict()["weight.quant_state.bitsandbytes__nf4"], theirs)
    assert json.loads(bytes(theirs.tolist()))["shape"] == [128, 256]


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bitsandbytes_linear4bit_state_dict_round_trip(double_quant, dtype):
    dense = torch.nn.Linear(192, 80, bias=False, dtype=dtype)
    layer = bnb.nn.Linear4bit(192, 80, bias=False, compute_dtype=dtype, compress_statistics=double_quant,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant)
    layer = layer.to("cpu")  # quantizes, keeping the weight's dtype in the quant state
    theirs = layer.state_dict()

    ours = NF4Weight.from_bnb_state_dict(theirs)
    expected = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(ours.dequantize(), expected)
    assert ours.dtype == dtype

    written = ours.to_bnb_state_dict()
    assert list(written) == list(theirs)  # the same keys, in the same order
    for key in theirs:
        assert written[key].dtype == theirs[key].dtype and torch.equal(written[key], theirs[key]), key

    # Into bitsandbytes the way transformers loads a 4-bit checkpoint: Params4bit.from_prequantized.
    ours_sd = NF4Weight.quantize(dense.weight.data, 64, double_quant).to_bnb_state_dict()
    fresh = bnb.nn.Linear4bit(192, 80, bias=False, compute_dtype=dtype, quant_type="nf4")
    stats = {k.removeprefix("weight."): v for k, v in ours_sd.items() if k != "weight"}
    fresh.weight = bnb.nn.Params4bit.from_prequantized(ours_sd["weight"], stats, device="cpu", module=fresh)
    assert torch.equal(F.dequantize_4bit(fresh.weight.data, fresh.weight.quant_state), expected)
    x = torch.randn(3, 192, dtype=dtype)
    assert torch.equal(fresh(x), layer(x))


def test_bitsandbytes_forward_matches_our_dequantized_weight():
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    ours = NF4Weight.from_bnb_state_dict(layer.state_dict())
    x = torch.randn(5, 128)
    torch.testing.assert_close(layer(x), x @ ours.dequantize(torch.float32).t())


def test_quant_storage_views_are_accepted():
    w = torch.randn(64, 128)
    sd = NF4Weight.quantize(w).to_bnb_state_dict()
    sd["weight"] = sd["weight"].view(-1).view(torch.bfloat16).unsqueeze(1)  # quant_storage=bfloat16
    assert torch.equal(NF4Weight.from_bnb_state_dict(sd).dequantize(), NF4Weight.quantize(w).dequantize())
