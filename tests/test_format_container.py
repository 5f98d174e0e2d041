"""NF4Weight: memory, moving, saving, and clear errors for every bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lora_triton.format import NF4Weight


def test_bits_per_weight_is_the_packed_format():
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    dq = NF4Weight.quantize(w, 64, True)
    plain = NF4Weight.quantize(w, 64, False)
    assert dq.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)  # 4.127
    assert plain.bits_per_weight == pytest.approx(4.5, abs=1e-6)
    # Nothing but the packed data and the statistics is held: no dequantized copy.
    assert dq.nbytes < w.numel() * 2 / 3.8
    held = [v for v in vars(dq).values() if isinstance(v, torch.Tensor)]
    assert all(t.numel() <= w.numel() // 2 for t in held)
    assert all(not t.is_floating_point() or t.numel() <= 1 + w.numel() // 64 for t in held)


def test_to_moves_without_requantizing():
    w = NF4Weight.quantize(torch.randn(32, 64))
    moved = w.to("cpu")
    assert moved is not w and torch.equal(moved.dequantize(), w.dequantize())
    meta = w.to("meta")
    assert meta.device.type == "meta" and meta.shape == w.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quantize_on_cuda_decodes_like_cpu():
    w = torch.randn(256, 512)
    cuda = NF4Weight.quantize(w.cuda())
    cpu = NF4Weight.quantize(w)
    assert torch.equal(cuda.packed.cpu(), cpu.packed)
    assert torch.equal(cuda.to("cpu").dequantize(), cpu.dequantize())


@pytest.mark.parametrize("double_quant", [True, False])
def test_safetensors_round_trip(tmp_path, double_quant):
    w = NF4Weight.quantize(torch.randn(70, 128, dtype=torch.float16), 128, double_quant)
    path = tmp_path / "w.safetensors"
    w.save(str(path))
    back = NF4Weight.load(str(path))
    assert torch.equal(back.dequantize(), w.dequantize())
    assert back.blocksize == 128 and back.dtype == torch.float16 and back.double_quant == double_quant


def test_dequantize_to_other_dtypes():
    w = NF4Weight.quantize(torch.randn(16, 64, dtype=torch.bfloat16))
    as32 = w.dequantize(torch.float32)
    assert w.dequantize().dtype == torch.bfloat16
    assert torch.equal(w.dequantize(torch.float64), as32.double())
    assert torch.equal(w.dequantize(torch.float16), as32.half())


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad, error, message", [
    (torch.randint(0, 5, (8, 64)), TypeError, "float32, float16 or bfloat16"),
    (torch.randn(8, 64, dtype=torch.float64), TypeError, "float32, float16 or bfloat16"),
    (torch.randn(64), ValueError, "2-D"),
    (torch.randn(2, 8, 64), ValueError, "2-D"),
    (torch.randn(0, 64), ValueError, "non-empty"),
])
def test_quantize_rejects_bad_tensors(bad, error, message):
    with pytest.raises(error, match=message):
        NF4Weight.quantize(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_quantize_rejects_non_finite(value):
    w = torch.randn(8, 64)
    w[3, 5] = value
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        NF4Weight.quantize(w)


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192])
def test_quantize_rejects_unsupported_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        NF4Weight.quantize(torch.randn(8, 64), blocksize)


def _state(double_quant=True):
    return NF4Weight.quantize(torch.randn(40, 128), 64, double_quant).to_bnb_state_dict()


def _with_blob(sd, **changes):
    key = "weight.quant_state.bitsandbytes__nf4"
    blob = json.loads(bytes(sd[key].tolist()))
    blob.update(changes)
    sd[key] = torch.tensor(list(json.dumps(blob).encode()), dtype=torch.uint8)
    return sd


def test_fp4_state_is_rejected():
    sd = _state()
    sd["weight.quant_state.bitsandbytes__fp4"] = sd.pop("weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match="only NF4 quant states are supported"):
        NF4Weight.from_bnb_state_dict(sd)
    with pytest.raises(ValueError, match="quant_type='fp4'"):
        NF4Weight.from_bnb_state_dict(_with_blob(_state(), quant_type="fp4"))


def test_fp4_code_book_is_rejected():
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import get_4bit_type

    sd = _state()
    sd["weight.quant_map"] = get_4bit_type("fp4", device="cpu")
    with pytest.raises(ValueError, match="not the NF4 code book"):
        NF4Weight.from_bnb_state_dict(sd)


def test_missing_quant_state_is_rejected():
    sd = _state()
    del sd["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(ValueError, match="no bitsandbytes quant state"):
        NF4Weight.from_bnb_state_dict(sd)


def test_corrupt_json_is_rejected():
    sd = _state()
    sd["weight.quant_state.bitsandbytes__nf4"] = sd["weight.quant_state.bitsandbytes__nf4"][:-7]
    with pytest.raises(ValueError, match="does not parse"):
        NF4Weight.from_bnb_state_dict(sd)


@pytest.mark.parametrize("key, cut", [("weight", 10), ("weight.absmax", 1), ("weight.nested_absmax", 1)])
def test_truncated_tensors_are_rejected(key, cut):
    sd = _state()
    sd[key] = sd[key][:-cut]
    with pytest.raises(ValueError, match="truncated or mismatched"):
        NF4Weight.from_bnb_state_dict(sd)


@pytest.mark.parametrize("changes, message", [
    ({"shape": [40, 129]}, "truncated or mismatched"),
    ({"shape": [40]}, r"shape must be \[out_features, in_features\]"),
    ({"blocksize": 96}, "blocksize must be one of"),
    ({"dtype": "int8"}, "quant state dtype must be one of"),
    ({"nested_blocksize": 128}, "nested_blocksize must be 256"),
    ({"nested_blocksize": 256.0}, "nested_blocksize must be 256"),
    ({"shape": [33.7, 128]}, r"two positive ints, got \[33.7, 128\]"),
    ({"shape": [40, "128"]}, "two positive ints"),
    ({"shape": [True, 128]}, "two positive ints"),
    ({"shape": [-40, 128]}, "two positive ints"),
    ({"blocksize": 64.0}, "blocksize must be an int, got 64.0"),
    ({"nested_offset": None}, "nested_offset must be a finite number, got None"),
    ({"nested_offset": "0.1"}, "nested_offset must be a finite number"),
])
def test_inconsistent_json_is_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        NF4Weight.from_bnb_state_dict(_with_blob(_state(), **changes))


def test_missing_nested_tensor_is_rejected():
    sd = _state()
    del sd["weight.nested_absmax"]
    with pytest.raises(ValueError, match="missing 'weight.nested_absmax'"):
        NF4Weight.from_bnb_state_dict(sd)


def test_non_finite_statistics_are_rejected():
    sd = _state(double_quant=False)
    sd["weight.absmax"][3] = float("nan")
    with pytest.raises(ValueError, match="absmax contains NaN/Inf"):
        NF4Weight.from_bnb_state_dict(sd)


@pytest.mark.parametrize("key, corrupt", [
    ("weight.nested_quant_map", lambda t: t.fill_(float("nan"))),
    ("weight.nested_quant_map", lambda t: t.zero_()),
    ("weight.nested_quant_map", lambda t: t.mul_(2)),
])
def test_corrupt_nested_quant_map_is_rejected(key, corrupt):
    sd = _state()
    sd[key] = corrupt(sd[key].clone())
    with pytest.raises(ValueError, match="nested_quant_map is not bitsandbytes' signed dynamic 8-bit map"):
        NF4Weight.from_bnb_state_dict(sd)


@pytest.mark.parametrize("double_quant, key", [(False, "weight.absmax"), (True, "weight.nested_absmax")])
def test_negative_block_scales_are_rejected(double_quant, key):
    sd = _state(double_quant)
    sd[key][0] = -sd[key][0]
    with pytest.raises(ValueError, match="negative values"):
        NF4Weight.from_bnb_state_dict(sd)


@pytest.mark.parametrize("blocksize", [64.0, "64", True, None])
def test_non_int_blocksize_is_rejected(blocksize):
    with pytest.raises(TypeError, match="blocksize must be an int"):
        NF4Weight.quantize(torch.randn(8, 64), blocksize)
    w = NF4Weight.quantize(torch.randn(8, 64))
    with pytest.raises(TypeError, match="blocksize must be an int"):
        NF4Weight(w.packed, w.absmax, w.code, w.shape, blocksize, w.dtype, w.nested_absmax, w.nested_code, w.offset)


@pytest.mark.parametrize("shape", [(8.0, 64), (8, 64.5), ("8", 64)])
def test_non_int_shape_is_rejected(shape):
    w = NF4Weight.quantize(torch.randn(8, 64))
    with pytest.raises(ValueError, match="shape must hold ints"):
        NF4Weight(w.packed, w.absmax, w.code, shape, 64, w.dtype, w.nested_absmax, w.nested_code, w.offset)


@pytest.mark.parametrize("value", [1e37, 3e38])
def test_double_quant_of_huge_weights_is_refused_clearly(value):
    """Finite weights whose block scales average beyond float32 (bitsandbytes stores an inf
    offset and decodes NaN there): a clear refusal; without double quant they quantize."""
    w = torch.full((64, 256), value)
    with pytest.raises(ValueError, match="double_quant=False"):
        NF4Weight.quantize(w, 64, double_quant=True)
    plain = NF4Weight.quantize(w, 64, double_quant=False)
    assert torch.equal(plain.dequantize(torch.float32), w)


def test_every_weight_owns_its_code_tables():
    """bitsandbytes gives each weight its own tables; a table shared across weights would tie
    them together and make safetensors refuse the state dict."""
    a, b = (NF4Weight.quantize(torch.randn(8, 64)) for _ in range(2))
    for name in ("code", "nested_code"):
        assert getattr(a, name).data_ptr() != getattr(b, name).data_ptr(), name
    before = b.dequantize()
    a.nested_code.mul_(2)
    assert torch.equal(b.dequantize(), before)


def test_state_without_double_quant_loads():
    sd = _state(double_quant=False)
    assert "weight.nested_absmax" not in sd
    w = NF4Weight.from_bnb_state_dict(sd)
    assert not w.double_quant and w.absmax.dtype == torch.float32
