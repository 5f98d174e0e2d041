"""``NF4Weight``: a packed NF4 weight with its quant state, in bitsandbytes' own layout.

The container holds only the packed bytes and the (double-quantized) statistics: about
4.13 bits per weight with double quantization, 4.5 without. It never keeps a dequantized
copy; ``dequantize()`` builds one on demand for the reference path and for merging.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, fields, replace
from typing import Mapping

import torch

from .codebooks import NESTED_BLOCKSIZE, dynamic_map_signed, nf4_code
from .nf4 import (
    FLOAT_DTYPES,
    blockwise_absmax_nf4_codes,
    check_blocksize,
    dequantize_absmax_dynamic8,
    dequantize_codes,
    num_blocks,
    pack_nibbles,
    quantize_absmax_dynamic8,
)

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_QUANT_STATE_KEY = "quant_state.bitsandbytes__"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, eq=False)
class NF4Weight:
    """A weight ``[N, K]`` quantized to NF4, stored exactly as bitsandbytes stores it.

    Attributes:
        packed: uint8 ``[(N*K + 1) // 2]``, two codes per byte, first element high nibble.
        absmax: per-block scale, uint8 ``[n_blocks]`` (double quant) or float32 ``[n_blocks]``.
        code: float32 ``[16]``, the NF4 code book (``quant_map``).
        shape: ``(N, K)`` = (out_features, in_features).
        blocksize: elements per block of the flattened weight (32..4096).
        dtype: the float dtype the weight had (the quant state's ``dtype``).
        nested_absmax: float32 ``[ceil(n_blocks / 256)]`` (double quant only).
        nested_code: float32 ``[256]``, the signed dynamic map (double quant only).
        offset: float32 0-d, the mean absmax subtracted before double quant (double quant only).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: tuple[int, int]
    blocksize: int
    dtype: torch.dtype
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _shape_of_ints(self.shape))
        self.validate()
        # The double-quant offset as a Python float (0.0 without), read once here so kernel
        # launches never sync the device to fetch it.
        has_value = self.offset is not None and self.offset.device.type != "meta"
        object.__setattr__(self, "offset_value", float(self.offset) if has_value else 0.0)

    # ------------------------------------------------------------------ construction
    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> "NF4Weight":
        """Quantize a float weight ``[N, K]`` (fp32/fp16/bf16) to NF4 on its own device.

        Bit-exact with ``bitsandbytes.functional.quantize_4bit(weight, blocksize=blocksize,
        quant_type="nf4", compress_statistics=double_quant)`` on CPU.
        """
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
        if weight.dim() != 2 or weight.numel() == 0:
            raise ValueError(f"weight must be a non-empty 2-D [out_features, in_features] tensor, got shape {tuple(weight.shape)}")
        check_blocksize(blocksize)
        if not bool(torch.isfinite(weight).all()):
            bad = int((~torch.isfinite(weight)).sum())
            raise ValueError(f"weight contains {bad} NaN/Inf value(s); NF4 can only quantize finite weights")
        absmax, codes = blockwise_absmax_nf4_codes(weight, blocksize)
        fields = dict(packed=pack_nibbles(codes), code=nf4_code(weight.device), shape=tuple(weight.shape),
                      blocksize=blocksize, dtype=weight.dtype)
        if not double_quant:
            return cls(absmax=absmax, **fields)
        q_absmax, nested_absmax, offset = quantize_absmax_dynamic8(absmax)
        return cls(absmax=q_absmax, nested_absmax=nested_absmax, nested_code=dynamic_map_signed(weight.device),
                   offset=offset, **fields)

    @classmethod
    def from_validated_fields(cls, **values) -> "NF4Weight":
        """Rebuild a weight from the tensors of one that was already validated, skipping the
        checks (they read values, which costs a device sync per call on CUDA). For the ops
        layer, which passes an ``NF4Weight`` through ``torch.library`` as separate tensors."""
        weight = object.__new__(cls)
        for field in fields(cls):
            object.__setattr__(weight, field.name, values.get(field.name))
        object.__setattr__(weight, "offset_value", values.get("offset_value", 0.0))
        return weight

    # ------------------------------------------------------------------ properties
    @property
    def double_quant(self) -> bool:
        """True when the absmax values are themselves 8-bit quantized."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def n_blocks(self) -> int:
        return num_blocks(self.numel, self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by the packed weight and all its statistics."""
        tensors = [self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def bits_per_weight(self) -> float:
        """Storage per weight, code books excluded (they are shared constants)."""
        stats = [self.packed, self.absmax, self.nested_absmax, self.offset]
        return 8 * sum(t.numel() * t.element_size() for t in stats if t is not None) / self.numel

    # ------------------------------------------------------------------ decoding
    def absmax_float32(self) -> torch.Tensor:
        """The per-block scales as float32 ``[n_blocks]`` (decoding double quant if any)."""
        if not self.double_quant:
            return self.absmax
        return dequantize_absmax_dynamic8(self.absmax, self.nested_absmax, self.nested_code, self.offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``[N, K]`` in ``dtype`` (default: the quant state's dtype).

        Values are computed in float32 and cast once, which reproduces bitsandbytes'
        ``dequantize_4bit`` bit for bit.
        """
        dtype = dtype or self.dtype
        if dtype not in FLOAT_DTYPES + (torch.float64,):
            raise TypeError(f"can dequantize to a float dtype only, got {dtype}")
        flat = dequantize_codes(self.packed, self.absmax_float32(), self.code, self.blocksize, self.numel, dtype)
        return flat.view(self.shape)

    # ------------------------------------------------------------------ moving
    def to(self, device: torch.device | str) -> "NF4Weight":
        """A copy on ``device`` (the bytes move; nothing is re-quantized)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, packed=move(self.packed), absmax=move(self.absmax), code=move(self.code),
                       nested_absmax=move(self.nested_absmax), nested_code=move(self.nested_code),
                       offset=move(self.offset))

    # ------------------------------------------------------------------ bitsandbytes state dicts
    def quant_state_json(self) -> dict:
        """The non-tensor part of the quant state, in bitsandbytes' key order."""
        state = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                 "shape": list(self.shape)}
        if self.double_quant:
            state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                         nested_offset=float(self.offset))
        return state

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors a ``bitsandbytes.nn.Linear4bit`` writes for its weight.

        Keys: ``{prefix}``, ``{prefix}.absmax``, ``{prefix}.quant_map``, and with double
        quant ``{prefix}.nested_absmax`` and ``{prefix}.nested_quant_map``; then
        ``{prefix}.quant_state.bitsandbytes__nf4`` (uint8 bytes of the JSON blob).
        """
        blob = json.dumps(self.quant_state_json()).encode("utf-8")
        out = {prefix: self.packed.view(-1, 1), f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code}
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_code
        out[f"{prefix}.{_QUANT_STATE_KEY}nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_bnb_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "weight") -> "NF4Weight":
        """Read the weight of a ``bitsandbytes.nn.Linear4bit`` state dict (no re-quantization).

        Raises ``ValueError`` for an fp4 state, a missing or corrupt quant state, or tensors
        whose sizes do not match the state's shape and block size.
        """
        blob_key = f"{prefix}.{_QUANT_STATE_KEY}nf4"
        if blob_key not in state_dict:
            others = [k for k in state_dict if k.startswith(f"{prefix}.{_QUANT_STATE_KEY}")]
            if others:
                raise ValueError(f"only NF4 quant states are supported, found {others[0]!r} (expected {blob_key!r})")
            raise ValueError(f"no bitsandbytes quant state under {blob_key!r}: not a 4-bit NF4 state dict")
        state = _parse_quant_state_blob(state_dict[blob_key])
        for key in (prefix, f"{prefix}.absmax", f"{prefix}.quant_map"):
            if key not in state_dict:
                raise ValueError(f"NF4 state dict is missing {key!r}")
        packed = state_dict[prefix]
        if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage may view the bytes as another dtype
            packed = packed.contiguous().view(torch.uint8)
        fields = dict(packed=packed.reshape(-1), absmax=state_dict[f"{prefix}.absmax"],
                      code=state_dict[f"{prefix}.quant_map"], shape=tuple(state["shape"]),
                      blocksize=state["blocksize"], dtype=state["dtype"])
        if "nested_offset" not in state:
            return cls(**fields)
        for key in (f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map"):
            if key not in state_dict:
                raise ValueError(f"double-quantized NF4 state dict is missing {key!r}")
        offset = torch.tensor(state["nested_offset"], dtype=torch.float32, device=fields["absmax"].device)
        return cls(nested_absmax=state_dict[f"{prefix}.nested_absmax"],
                   nested_code=state_dict[f"{prefix}.nested_quant_map"], offset=offset, **fields)

    def save(self, path: str, prefix: str = "weight") -> None:
        """Write ``to_bnb_state_dict()`` to a safetensors file."""
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in self.to_bnb_state_dict(prefix).items()}, path)

    @classmethod
    def load(cls, path: str, prefix: str = "weight", device: torch.device | str = "cpu") -> "NF4Weight":
        """Read a safetensors file written by ``save`` (or any bitsandbytes NF4 checkpoint)."""
        from safetensors.torch import load_file

        return cls.from_bnb_state_dict(load_file(path, device=str(device)), prefix)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` if the fields do not form a valid NF4 state."""
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ValueError(f"NF4 weight shape must be 2-D [N, K] with positive sizes, got {list(self.shape)}")
        check_blocksize(self.blocksize)
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"quant state dtype must be float32, float16 or bfloat16, got {self.dtype}")
        _expect(self.packed, "packed weight", torch.uint8, (self.numel + 1) // 2)
        _expect(self.code, "quant_map", torch.float32, 16)
        if self.double_quant:
            _expect(self.absmax, "absmax (double-quantized)", torch.uint8, self.n_blocks)
            _expect(self.nested_absmax, "nested_absmax", torch.float32, math.ceil(self.n_blocks / NESTED_BLOCKSIZE))
            _expect(self.nested_code, "nested_quant_map", torch.float32, 256)
            if self.offset is None or self.offset.numel() != 1:
                raise ValueError("double-quantized NF4 state needs a scalar nested offset")
        else:
            if self.nested_code is not None or self.offset is not None:
                raise ValueError("nested_quant_map/offset given without nested_absmax")
            _expect(self.absmax, "absmax", torch.float32, self.n_blocks)
        devices = {t.device for t in (self.packed, self.absmax, self.nested_absmax) if t is not None}
        if len(devices) != 1:
            raise ValueError(f"NF4 state tensors are on different devices: {sorted(map(str, devices))}")
        if self.device.type != "meta":  # a meta weight has shapes but no values to check
            self._validate_values()

    def _validate_values(self) -> None:
        if not torch.equal(self.code.cpu(), nf4_code()):
            raise ValueError("quant_map is not the NF4 code book (an fp4 or corrupt quant state?)")
        if self.double_quant and not torch.equal(self.nested_code.cpu(), dynamic_map_signed()):
            raise ValueError("nested_quant_map is not bitsandbytes' signed dynamic 8-bit map: corrupt NF4 state")
        # Block scales are maxima of absolute values (the offset is their mean): never negative.
        scales = [(self.nested_absmax, "nested_absmax"), (self.offset, "nested offset")] if self.double_quant \
            else [(self.absmax, "absmax")]
        for t, name in scales:
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN/Inf: corrupt NF4 state")
            if bool((t < 0).any()):
                raise ValueError(f"{name} contains negative values ({float(t.min()):.3g}); block scales are "
                                 "absolute maxima: corrupt NF4 state")


def _shape_of_ints(shape) -> tuple[int, ...]:
    """``shape`` as a tuple of Python ints; ``ValueError`` for non-integer entries (33.7, "8", True)."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"NF4 weight shape must be a pair of ints [N, K], got {shape!r}") from None
    try:
        if any(isinstance(d, bool) for d in dims):
            raise TypeError
        return tuple(operator.index(d) for d in dims)
    except TypeError:
        raise ValueError(f"NF4 weight shape must hold ints [N, K], got {list(dims)!r}") from None


def _expect(t: torch.Tensor | None, name: str, dtype: torch.dtype, numel: int) -> None:
    if t is None:
        raise ValueError(f"NF4 state is missing {name}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements for this shape and block size, got {t.numel()} "
                         "(truncated or mismatched state?)")


def _parse_quant_state_blob(blob: torch.Tensor) -> dict:
    """Decode bitsandbytes' JSON quant-state blob and convert its fields."""
    try:
        state = json.loads(bytes(blob.cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"corrupt bitsandbytes quant state: the JSON blob does not parse ({err})") from None
    if not isinstance(state, dict):
        raise ValueError("corrupt bitsandbytes quant state: the JSON blob is not an object")
    if state.get("quant_type") != "nf4":
        raise ValueError(f"only NF4 quant states are supported, got quant_type={state.get('quant_type')!r}")
    missing = [k for k in ("blocksize", "dtype", "shape") if k not in state]
    if missing:
        raise ValueError(f"corrupt bitsandbytes quant state: missing {missing}")
    if state["dtype"] not in _DTYPE_NAMES:
        raise ValueError(f"quant state dtype must be one of {sorted(_DTYPE_NAMES)}, got {state['dtype']!r}")
    state["dtype"] = _DTYPE_NAMES[state["dtype"]]
    shape = state["shape"]
    if not isinstance(shape, list) or len(shape) != 2 or not all(_is_json_int(d) and d > 0 for d in shape):
        raise ValueError(f"quant state shape must be [out_features, in_features], two positive ints, got {shape!r}")
    if not _is_json_int(state["blocksize"]):
        raise ValueError(f"quant state blocksize must be an int, got {state['blocksize']!r}")
    if "nested_offset" in state:
        if not _is_json_int(state.get("nested_blocksize")) or state["nested_blocksize"] != NESTED_BLOCKSIZE:
            raise ValueError(f"nested_blocksize must be {NESTED_BLOCKSIZE}, got {state.get('nested_blocksize')!r}")
        offset = state["nested_offset"]
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
            raise ValueError(f"quant state nested_offset must be a finite number, got {offset!r}")
    return state


def _is_json_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
