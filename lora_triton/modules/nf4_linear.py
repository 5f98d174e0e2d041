"""``NF4Linear``: a frozen linear layer whose weight is an ``NF4Weight``.

Its state dict is exactly a ``bitsandbytes.nn.Linear4bit``'s: ``weight`` (packed uint8
``[(N*K+1)//2, 1]``), ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4`` and ``bias``.

How the NF4 tensors are held (so that DDP and FSDP2 can handle them)
------------------------------------------------------------------
The per-weight tensors that grow with the weight are frozen ``nn.Parameter`` s
(``requires_grad=False``), so ``torch.distributed.fsdp.fully_shard`` shards them like any
other parameter and all-gathers them per FSDP unit for compute:

* ``weight``               uint8 ``[(N*K+1)//2, 1]``, the packed codes (bitsandbytes' own shape);
* ``weight_absmax``        the block scales: uint8 ``[n_blocks]`` with double quantization, else
                           the float32 scales held as **int32** bit patterns;
* ``weight_nested_absmax`` float32 ``[ceil(n_blocks / 256)]`` held as int32 bit patterns
                           (double quantization only, else ``None``).

Every one of them has an integer dtype. FSDP2 applies ``MixedPrecisionPolicy.param_dtype`` only
to floating-point parameters, and ``Module.half()`` / ``.to(dtype)`` convert only floating-point
tensors, so no precision policy or dtype conversion can touch a single bit of the NF4 state
(bitsandbytes instead stores the packed bytes in a float ``quant_storage`` dtype, which must then
equal FSDP's ``param_dtype``). The int32 storage keeps 4-byte element boundaries, so shards
never split a float and the state dict can show the same storage as float32
(``Tensor.view(torch.float32)``, which DTensor supports too): the state dict keys, dtypes and
bytes stay bitsandbytes' own, sharded or not. The three constants of a weight - the NF4 code book
(16 floats), the nested code book (256 floats) and the double-quant offset (one float) - stay
plain tensors on the module (they are equal on every rank and not worth a collective).

``layer.nf4`` is the ``NF4Weight`` view of those tensors (no copy): the op reads it at every
forward. Under FSDP2 the parameters are whole only inside the module's forward and backward (or
after ``unshard()``); between them each rank holds 1/world_size of them and ``layer.nf4``
raises.
"""

from __future__ import annotations

import contextlib
import json

import torch
from torch import nn

from ..format import NESTED_BLOCKSIZE, NF4Weight, dynamic_map_signed, nf4_code
from ..format.weight import _parse_quant_state_blob

_WEIGHT_PREFIX = "weight"
#: The NF4 parameters of an ``NF4Linear`` (attribute names), in registration order.
NF4_PARAMETERS = ("weight", "weight_absmax", "weight_nested_absmax")
_BLOB_KEY = "weight.quant_state.bitsandbytes__nf4"


def check_standard_bnb_layout(layer: nn.Module, name: str = "layer") -> None:
    """Raise ``ValueError`` if a bitsandbytes ``Linear4bit`` holds its CPU-only repacked bytes
    (bitsandbytes 0.50 repacks them at the first eval-mode CPU forward on AVX512-BF16 CPUs),
    which are no longer the NF4 format."""
    if getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False):
        raise ValueError(f"{name!r}: bitsandbytes has repacked this Linear4bit for its CPU bf16 kernel, so its "
                         "bytes are no longer the NF4 format; convert it before running it in eval mode on CPU "
                         "(or set layer.support_avx512bf16_for_cpu = False before the first forward)")


_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def _is_dtensor(t) -> bool:
    if t is None or type(t) in _PLAIN_TENSORS or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _storage_of(p) -> tuple | None:
    """What a cached view over ``p`` depends on: the object, its device, address and shape (checked on every
    access of ``NF4Linear.nf4``, so written for speed)."""
    if p is None:
        return None
    return id(p), p.device, 0 if p.is_meta or _is_dtensor(p) else p.data_ptr(), p.shape


def _to_storage(t: torch.Tensor) -> torch.Tensor:
    """float32 statistics as int32 bit patterns (a view, no copy); uint8 ones as they are."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _from_storage(t: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_to_storage`` (a view; works on DTensors too)."""
    return t.view(torch.float32) if t.dtype == torch.int32 else t


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a DTensor gathered (a collective: every rank must call it)."""
    return t.full_tensor() if _is_dtensor(t) else t


def _local_chunk(whole: torch.Tensor, like) -> torch.Tensor:
    """This rank's chunk of ``whole`` as the DTensor ``like`` is placed (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    try:
        return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()
    except TypeError:  # torch < 2.7: no src_data_rank; every rank holds ``whole``, so a scatter is as good
        return distribute_tensor(whole, like.device_mesh, like.placements).to_local()


class NF4Linear(nn.Module):
    """Frozen ``y = x @ dequant(W)^T + b`` over a packed NF4 weight ``[out_features, in_features]``.

    The packed weight and its block scales are frozen integer parameters (see the module
    docstring: FSDP2 shards them, no dtype conversion changes them); ``self.nf4`` is the
    ``NF4Weight`` view of them that the op reads. ``.to(device)`` moves the bytes.
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape [{self.out_features}], got {list(bias.shape)}")
        self._assign(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        """Quantize an ``nn.Linear`` (its weight's dtype becomes the quant state's dtype)."""
        weight = NF4Weight.quantize(linear.weight.detach(), blocksize, double_quant)
        return cls(weight, linear.bias)

    @classmethod
    def from_bnb(cls, layer: nn.Module) -> "NF4Linear":
        """Share the bytes of a quantized ``bitsandbytes.nn.Linear4bit`` (no re-quantization)."""
        state = getattr(layer.weight, "quant_state", None)
        if state is None:
            raise ValueError("the bitsandbytes layer is not quantized yet (move it to a device first)")
        check_standard_bnb_layout(layer)
        tensors = {k: v for k, v in layer.state_dict().items() if k.startswith(_WEIGHT_PREFIX)}
        return cls(NF4Weight.from_bnb_state_dict(tensors, _WEIGHT_PREFIX), layer.bias)

    # ---------------------------------------------------------------- the NF4 weight
    def _assign(self, weight: NF4Weight) -> None:
        """Hold ``weight``'s tensors (shared, not copied) as this layer's NF4 state."""
        self.blocksize, self.double_quant, self.quant_dtype = weight.blocksize, weight.double_quant, weight.dtype
        self.offset_value = weight.offset_value
        self.weight = nn.Parameter(weight.packed.view(-1, 1), requires_grad=False)
        self.weight_absmax = nn.Parameter(_to_storage(weight.absmax), requires_grad=False)
        nested = None if weight.nested_absmax is None else nn.Parameter(_to_storage(weight.nested_absmax),
                                                                        requires_grad=False)
        self.register_parameter("weight_nested_absmax", nested)
        self._code, self._nested_code, self._offset = weight.code, weight.nested_code, weight.offset
        self._nf4_cache = (self._storage_state(), weight)

    def _nf4_key(self) -> tuple:
        return tuple(self._parameters.get(name) for name in NF4_PARAMETERS)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if not self.is_sharded and self.weight.device.type != "meta":
            self._rebuild_nf4()  # a copy is ready for torch.compile, which cannot build the view itself

    def __getstate__(self) -> dict:
        # The cached NF4Weight views the int32 storage of the statistics as float32: torch.save refuses
        # two views of one storage with different dtypes, so copies, pickles and saves leave it out
        # (it is rebuilt at the next access).
        state = self.__dict__.copy()
        state["_nf4_cache"] = (None, None)
        return state

    @property
    def is_sharded(self) -> bool:
        """True while FSDP2 holds this layer's NF4 parameters as shards (DTensors)."""
        return _is_dtensor(self._parameters["weight"])

    @property
    def nf4(self) -> NF4Weight:
        """The ``NF4Weight`` over this layer's tensors (views, no copy), rebuilt whenever a parameter's
        storage changed (a new tensor, ``.data =``, a device move)."""
        key, weight = self._nf4_cache
        if torch.compiler.is_compiling() and weight is not None:  # addresses are not traceable: the eager view
            return weight
        if key is not None and key == self._storage_state():
            return weight
        return self._rebuild_nf4()

    @nf4.setter
    def nf4(self, weight: NF4Weight) -> None:
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"NF4 weight shape {list(weight.shape)} does not fit the layer "
                             f"[{self.out_features}, {self.in_features}]")
        self._assign(weight)

    def _rebuild_nf4(self) -> NF4Weight:
        packed, absmax, nested = self._nf4_key()
        if any(_is_dtensor(t) for t in (packed, absmax, nested)):
            raise RuntimeError("this NF4Linear's weight is sharded by FSDP2 (each rank holds 1/world_size of its "
                               "bytes); it is whole only inside the module's forward/backward. Call unshard() on "
                               "the FSDP module first, or use lora_triton.integration.distributed for checkpoints")
        self._move_constants(packed.device)
        weight = self._make_nf4()
        self._nf4_cache = (self._storage_state(), weight)
        return weight

    def _make_nf4(self) -> NF4Weight:
        """The ``NF4Weight`` of the current parameters (views), the constants where they are."""
        packed, absmax, nested = self._nf4_key()
        return NF4Weight.from_validated_fields(
            packed=packed.view(-1), absmax=_from_storage(absmax), code=self._code,
            nested_absmax=None if nested is None else _from_storage(nested), nested_code=self._nested_code,
            offset=self._offset, shape=(self.out_features, self.in_features), blocksize=self.blocksize,
            dtype=self.quant_dtype, offset_value=self.offset_value)

    def _move_constants(self, device: torch.device) -> None:
        """Put the code books and the offset on ``device`` (from meta: rebuilt, they are constants)."""
        if self._code.device == device:
            return
        rebuild = self._code.device.type == "meta"
        self._code = nf4_code(device) if rebuild else self._code.to(device)
        if self.double_quant:
            self._nested_code = dynamic_map_signed(device) if rebuild else self._nested_code.to(device)
            self._offset = (torch.tensor(self.offset_value, dtype=torch.float32, device=device) if rebuild
                            else self._offset.to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]`` through the same op as the LoRA layer (``ops.nf4_linear``): the
        weight is decoded inside the kernel or transiently, never saved for backward."""
        from ..ops import nf4_linear

        return nf4_linear(x, self.nf4, self.bias)

    # ---------------------------------------------------------------- device moves
    def _storage_state(self) -> tuple:
        """What the cached NF4Weight views: each NF4 parameter's object, device, address and shape."""
        params = self._parameters
        return tuple(_storage_of(params.get(name)) for name in NF4_PARAMETERS)

    def _apply(self, fn, recurse=True):
        # The NF4 parameters are integer tensors: .half()/.to(dtype) leave them alone and only
        # device moves reach them. The cached NF4Weight is rebuilt only if their storage moved.
        before = self._storage_state()
        super()._apply(fn, recurse)
        if self._storage_state() != before:
            if self.is_sharded:
                self._nf4_cache = (None, None)  # rebuilt at the next access, once the layer is whole
            else:
                self._rebuild_nf4()
        return self

    # ---------------------------------------------------------------- bitsandbytes keys
    @contextlib.contextmanager
    def _nf4_parameters_hidden(self):
        """Within the block the NF4 parameters are not in ``_parameters`` (nn.Module's own
        state-dict code then handles the bias only); their order is restored afterwards."""
        saved = dict(self._parameters)
        for name in NF4_PARAMETERS:
            self._parameters.pop(name, None)
        try:
            yield
        finally:
            rest = dict(self._parameters)
            self._parameters.clear()
            for name in saved:  # the original order
                self._parameters[name] = saved[name] if name in NF4_PARAMETERS else rest.pop(name, saved[name])
            self._parameters.update(rest)

    def quant_state_json(self) -> dict:
        """The non-tensor part of the quant state (as ``NF4Weight.quant_state_json``)."""
        dtype = str(self.quant_dtype).removeprefix("torch.")
        state = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": dtype,
                 "shape": [self.out_features, self.in_features]}
        if self.double_quant:
            state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                         nested_offset=float(self.offset_value))
        return state

    def bnb_state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """bitsandbytes' weight keys (without prefix) over this layer's own tensors: DTensors
        (shards) while FSDP2 shards the layer, plain tensors otherwise; float32 statistics
        shown as float32 views of their int32 storage."""
        def own(p):
            return p if keep_vars else p.detach()

        out = {"weight": own(self.weight), "weight.absmax": _from_storage(own(self.weight_absmax)),
               "weight.quant_map": self._code}
        if self.double_quant:
            out["weight.nested_absmax"] = _from_storage(own(self.weight_nested_absmax))
            out["weight.nested_quant_map"] = self._nested_code
        blob = json.dumps(self.quant_state_json()).encode("utf-8")
        out[_BLOB_KEY] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        with self._nf4_parameters_hidden():
            super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, tensor in self.bnb_state_dict(keep_vars).items():
            destination[prefix + key] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = {key[len(prefix):]: value for key, value in state_dict.items()
               if key.startswith(prefix + _WEIGHT_PREFIX)}
        if not own:
            missing_keys.append(prefix + _WEIGHT_PREFIX)
        elif self.is_sharded:
            self._load_into_shards(own, prefix, error_msgs)
        else:
            own = {k: _full(v) for k, v in own.items()}  # a sharded checkpoint into a whole layer
            weight = NF4Weight.from_bnb_state_dict(own, _WEIGHT_PREFIX).to(self.weight.device)
            if weight.shape != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {prefix}weight: NF4 shape {list(weight.shape)} in the "
                                  f"checkpoint, {[self.out_features, self.in_features]} in the model")
            else:
                self._assign(weight)
        rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix + _WEIGHT_PREFIX)}
        with self._nf4_parameters_hidden():
            super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)

    @torch.no_grad()
    def _load_into_shards(self, own: dict, prefix: str, error_msgs: list) -> None:
        """Copy a bitsandbytes state dict into the FSDP2 shards in place: from DTensors (a
        ``torch.distributed.checkpoint`` load) or from whole tensors (each rank keeps its chunk)."""
        if _BLOB_KEY not in own:
            raise ValueError(f"no bitsandbytes quant state under {prefix + _BLOB_KEY!r}: not a 4-bit NF4 state dict")
        state = _parse_quant_state_blob(_full(own[_BLOB_KEY]))
        have = (self.out_features, self.in_features, self.blocksize, self.double_quant)
        got = (*state["shape"], state["blocksize"], "nested_offset" in state)
        if have != got:
            error_msgs.append(f"size mismatch for {prefix}weight: NF4 (out, in, blocksize, double_quant) {list(got)} "
                              f"in the checkpoint, {list(have)} in the model")
            return
        for name, key in zip(NF4_PARAMETERS, ("weight", "weight.absmax", "weight.nested_absmax")):
            param = self._parameters[name]
            if param is None:
                continue
            if key not in own:
                raise ValueError(f"NF4 state dict is missing {prefix + key!r}")
            source = _to_storage(own[key])
            if source.dtype != param.dtype or tuple(source.shape) != tuple(param.shape):
                error_msgs.append(f"size mismatch for {prefix}{key}: {source.dtype} {list(source.shape)} in the "
                                  f"checkpoint, {param.dtype} {list(param.shape)} in the model")
                continue
            if _is_dtensor(source):
                param.copy_(source)  # a no-op when the checkpoint was loaded into these very shards
            else:
                param.to_local().copy_(_local_chunk(source.to(param.device), param))
        device = self.weight.device
        self._code = _full(own["weight.quant_map"]).to(device, torch.float32, copy=True)
        if self.double_quant:
            self._nested_code = _full(own["weight.nested_quant_map"]).to(device, torch.float32, copy=True)
            self.offset_value = float(state["nested_offset"])
            self._offset = torch.tensor(self.offset_value, dtype=torch.float32, device=device)
        self.quant_dtype = state["dtype"]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}")
