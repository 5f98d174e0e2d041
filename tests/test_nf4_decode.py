"""The NF4 decode primitive (lora_triton/kernels/nf4_decode.py): exact for every byte value.

The ``gather`` table runs through the interpreter here; the GPU-only ``shfl`` table's bit
logic (lane = shifted word's low 5 bits, lanes 16..31 repeating the table) is checked against
the packing rule by its numpy emulator, exhaustively.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from lora_triton.format import NF4Weight
from lora_triton.format.codebooks import nf4_code
from lora_triton.kernels import nf4_decode
from lora_triton.kernels.nf4_decode import word_args
from lora_triton.ops import lora_nf4_linear
from lora_triton.ops.candidates import dequantize_kernel


@triton.jit
def _decode_kernel(words_ptr, code_ptr, out_ptr, ROWS: tl.constexpr, WORDS: tl.constexpr, TABLE: tl.constexpr):
    rows = tl.arange(0, ROWS)
    words = tl.load(words_ptr + rows[:, None] * WORDS + tl.arange(0, WORDS)[None, :])
    table = nf4_decode.code_table(code_ptr, TABLE)
    values = nf4_decode.decode_words(words, table, TABLE)
    tl.store(out_ptr + rows[:, None] * WORDS * 8 + tl.arange(0, WORDS * 8)[None, :], values)


def _all_byte_values() -> np.ndarray:
    """Every byte value at every byte position of a word: 4 x 256 bytes, shuffled."""
    rng = np.random.default_rng(0)
    return np.concatenate([rng.permutation(256) for _ in range(4)]).astype(np.uint8)


def test_word_shifts_follow_the_packing_rule():
    packed = _all_byte_values()
    words = nf4_decode.words_of_packed(packed)
    by_shift = ((words[:, None] >> np.array(nf4_decode.WORD_SHIFT)) & 0xF).reshape(-1)
    assert np.array_equal(by_shift, nf4_decode.codes_of_packed(packed))


def test_decode_words_gather_is_exact_for_every_byte(device):
    packed = torch.from_numpy(_all_byte_values())
    words = packed.view(torch.int32).reshape(32, 8).to(device)  # 32 rows of 8 words
    code = nf4_code().to(dtype=torch.float32, device=device)
    out = torch.full((32, 64), float("nan"), device=device)
    _decode_kernel[(1,)](words, code, out, ROWS=32, WORDS=8, TABLE="gather")
    expected = code.cpu()[torch.from_numpy(nf4_decode.codes_of_packed(packed.numpy()).astype(np.int64))]
    assert torch.equal(out.cpu().reshape(-1), expected)


def test_shfl_emulator_is_exact_for_every_nibble_at_every_position():
    """All 2**32 words are too many; every nibble value at every one of the 8 positions, with
    every value in the neighbouring nibbles (which leak into the lane index's bit 4), is not."""
    code = np.asarray(nf4_code(), dtype=np.float32)
    values = np.arange(256, dtype=np.int64)  # this byte's two nibbles, all combinations
    words = []
    for byte in range(4):
        for rest in range(0, 256, 17):  # the other bytes: a spread of patterns incl. sign bits
            w = np.full(256, rest * 0x01010101, dtype=np.int64)
            w &= ~(0xFF << (8 * byte))
            w |= values << (8 * byte)
            words.append(w)
    words = np.concatenate(words).astype(np.uint32).view(np.int32)
    got = nf4_decode.emulate_shfl_lookup(code, words)
    expected_codes = (words.view(np.uint32)[:, None] >> np.array(nf4_decode.WORD_SHIFT, dtype=np.uint32)) & 0xF
    assert got.dtype == np.float32 and got.shape == (len(words), 8)
    assert np.array_equal(got, code[expected_codes])


def test_shfl_bytes_emulator_is_exact_for_every_byte():
    code = np.asarray(nf4_code(), dtype=np.float32)
    packed = np.arange(256, dtype=np.uint8)
    got = nf4_decode.emulate_shfl_bytes(code, packed).reshape(-1)
    assert np.array_equal(got, code[nf4_decode.codes_of_packed(packed)])


@triton.jit
def _tile_kernel(packed_ptr, code_ptr, absmax_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCKSIZE: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    table = nf4_decode.code_table(code_ptr, "gather")
    for k0 in range(0, K, BLOCK_K):
        w = nf4_decode.load_nf4_tile(packed_ptr, table, absmax_ptr, absmax_ptr, code_ptr, 0.0, offs_n, k0, N, K,
                                     BLOCK_N, BLOCK_K, BLOCKSIZE, False, "gather")
        offs_k = k0 + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w, mask=offs_n[:, None] < N)


@pytest.mark.parametrize("block_k,blocksize", [(32, 64), (64, 64), (128, 32)], ids=["part-block", "block", "blocks"])
def test_tile_loader_equals_nf4weight_for_every_byte_value(block_k, blocksize, device):
    n, k = 12, 256  # 12 rows: a partial row tile of 16
    weight = NF4Weight.quantize(torch.randn(n, k), blocksize, False)
    packed = torch.from_numpy(np.resize(_all_byte_values(), weight.packed.numel())).reshape(weight.packed.shape)
    weight = dataclasses.replace(weight, packed=packed).to(device)
    out = torch.full((n, k), float("nan"), device=device)
    _tile_kernel[(1,)](weight.packed, weight.code, weight.absmax, out, n, k, BLOCK_N=16, BLOCK_K=block_k,
                       BLOCKSIZE=blocksize)
    assert torch.equal(out.cpu(), weight.dequantize(torch.float32).cpu())


def test_misaligned_packed_bytes_dequantize_exactly(device):
    """Packed bytes that are a slice of a larger buffer (not on a 4-byte boundary) cannot be read as
    words in place: the kernels get an aligned copy, the layer's numbers do not change."""
    weight = NF4Weight.quantize(torch.randn(8, 64), 64, False).to(device)
    shifted = torch.empty(weight.packed.numel() + 1, dtype=torch.uint8, device=device)[1:]
    shifted.copy_(weight.packed.reshape(-1))
    misaligned = dataclasses.replace(weight, packed=shifted.reshape(weight.packed.shape))
    assert misaligned.packed.data_ptr() % 4
    assert torch.equal(dequantize_kernel(misaligned, torch.float32), weight.dequantize(torch.float32))
    x, a, b = torch.randn(3, 64, device=device), torch.randn(4, 64, device=device), torch.randn(8, 4, device=device)
    want = lora_nf4_linear(x, weight, a, b, 0.5, backend="torch")
    got = lora_nf4_linear(x, misaligned, a, b, 0.5, backend="triton")
    torch.testing.assert_close(got, want)


def test_shfl_emulator_on_real_packed_bytes():
    weight = NF4Weight.quantize(torch.randn(64, 256), 64, True)
    packed = weight.packed.numpy().reshape(-1)
    got = nf4_decode.emulate_shfl_lookup(weight.code.numpy(), nf4_decode.words_of_packed(packed)).reshape(-1)
    codes = nf4_decode.codes_of_packed(packed)
    assert np.array_equal(got, weight.code.numpy()[codes])


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_dequant_kernel_equals_nf4weight_for_every_byte_value(double_quant, blocksize, device):
    """A weight whose packed bytes run through all 256 values, with absmax of every kind
    (tiny, huge, equal to the offset, the nested map's extremes)."""
    n, k = 16, 256
    weight = NF4Weight.quantize(torch.randn(n, k) * torch.logspace(-3, 3, n)[:, None], blocksize, double_quant)
    packed = torch.from_numpy(np.resize(_all_byte_values(), weight.packed.numel())).reshape(weight.packed.shape)
    weight = dataclasses.replace(weight, packed=packed).to(device)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(dequantize_kernel(weight, dtype), weight.dequantize(dtype)), dtype


def test_packed_words_view_the_bytes_without_a_copy():
    weight = NF4Weight.quantize(torch.randn(8, 64), 64, True)
    words = word_args(weight)[0]
    assert words.dtype == torch.int32 and words.data_ptr() == weight.packed.data_ptr()
    assert words.numel() * 4 == weight.packed.numel()


@triton.jit
def _codes_kernel(packed_ptr, code_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    table = nf4_decode.code_table(code_ptr, "gather")
    for k0 in range(0, K, BLOCK_K):
        codes = nf4_decode.load_nf4_codes(packed_ptr, table, offs_n, k0, N, K, BLOCK_N, BLOCK_K, "gather")
        offs_k = k0 + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], codes, mask=offs_n[:, None] < N)


def test_code_loader_returns_the_table_value_of_every_byte(device):
    n, k = 12, 256  # 12 rows: a partial row tile of 16
    packed = torch.from_numpy(np.resize(_all_byte_values(), n * k // 2)).to(device)
    code = nf4_code().to(dtype=torch.float32, device=device)
    out = torch.full((n, k), float("nan"), device=device)
    _codes_kernel[(1,)](packed, code, out, n, k, BLOCK_N=16, BLOCK_K=64)
    expected = code.cpu()[torch.from_numpy(nf4_decode.codes_of_packed(packed.cpu().numpy()).astype(np.int64))]
    assert torch.equal(out.cpu().reshape(-1), expected)


@triton.jit
def _tile_absmax_kernel(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, out_ptr, N, K,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                        DOUBLE_QUANT: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    """Row tile 0, every K step; column c of step k0 lands at out[row, k0 // BLOCKSIZE + c] of an
    ``[N, K // BLOCKSIZE + 4]`` buffer (the 4 extra columns catch blocks past K: finite stand-ins)."""
    NB: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K > BLOCKSIZE else 1
    offs_n = tl.arange(0, BLOCK_N)
    width = K // BLOCKSIZE + 4
    for k0 in range(0, K, BLOCK_K):
        absmax = nf4_decode.load_tile_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, offs_n, k0,
                                             N, K, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, EVEN_N, EVEN_K)
        col = k0 // BLOCKSIZE + tl.arange(0, NB)
        tl.store(out_ptr + offs_n[:, None] * width + col[None, :], absmax, mask=offs_n[:, None] < N)


# (N, K, BLOCK_K, blocksize): tiles inside one block, 2 and 4 blocks per tile, K past the last tile,
# rows past N; K * N / blocksize > 256 blocks so the nested index (block >> 8) takes several values.
TILE_ABSMAX_CASES = [(16, 2048, 32, 64), (12, 2048, 128, 64), (16, 1056, 128, 32), (16, 4096, 64, 64)]


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("case", TILE_ABSMAX_CASES, ids=lambda c: "N{}-K{}-BK{}-bs{}".format(*c))
def test_tile_absmax_equals_nf4weight(case, double_quant, device):
    n, k, block_k, blocksize = case
    weight = NF4Weight.quantize(torch.randn(n, k) * torch.logspace(-3, 3, n)[:, None], blocksize, double_quant)
    assert weight.absmax.numel() > 256
    weight = weight.to(device)
    width = k // blocksize + 4
    out = torch.full((n, width), float("nan"), device=device)
    nested = (weight.nested_absmax, weight.nested_code, float(weight.offset)) if double_quant else (
        weight.absmax, weight.absmax, 0.0)
    even_n, even_k = n % 16 == 0, k % block_k == 0
    _tile_absmax_kernel[(1,)](weight.absmax, *nested, out, n, k, BLOCK_N=16, BLOCK_K=block_k, BLOCKSIZE=blocksize,
                              DOUBLE_QUANT=double_quant, EVEN_N=even_n, EVEN_K=even_k)
    expected = weight.absmax_float32().reshape(n, k // blocksize).cpu()
    got = out.cpu()
    assert torch.equal(got[:, : k // blocksize], expected)
    written_past_k = got[:, k // blocksize:]
    assert torch.all(torch.isnan(written_past_k) | torch.isfinite(written_past_k))
