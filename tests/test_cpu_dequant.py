"""The plain-torch backend's dense dequantization equals NF4Weight.dequantize bit for bit,
whether it goes through bitsandbytes' native CPU kernel or falls back to ours."""

from __future__ import annotations

import pytest
import torch

from lora_triton.format import NF4Weight
from lora_triton.ops.dense import _native_path_applies, dequantize_dense


@pytest.mark.parametrize("shape, blocksize", [((96, 320), 64), ((40, 256), 128), ((7, 100), 32), ((8, 4096), 4096),
                                              ((33, 77), 64)])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dense_dequantization_is_bit_identical(shape, blocksize, double_quant, dtype):
    weight = NF4Weight.quantize(torch.randn(*shape), blocksize, double_quant)
    dense = dequantize_dense(weight, dtype)
    assert dense.dtype == dtype and torch.equal(dense, weight.dequantize(dtype))


def test_native_path_only_where_bitsandbytes_is_exact():
    assert _native_path_applies(NF4Weight.quantize(torch.randn(8, 128), 64))
    assert not _native_path_applies(NF4Weight.quantize(torch.randn(8, 100), 64))  # blocks straddle rows
    assert not _native_path_applies(NF4Weight.quantize(torch.randn(8, 4096), 4096))  # compiled fallback in bnb
