"""Mixed batches: which adapter each row uses, and a layer's adapters stacked into one bank.

PEFT's interface (``peft.tuners.lora``): ``adapter_names`` is a list with one adapter name per
row of the batch (the first dim of the layer's input), ``"__base__"`` for a row that runs the
base model only. Here it becomes a ``MixedBatch``: ``slots`` (the adapter names the ids index)
and ``ids`` int64 ``[B]`` (``-1``: base). Ids are tensor data, so a new mix of adapters is no
new compile under ``torch.compile``.

``stack_adapters`` builds the operands of ``ops.multi_lora_add`` from a layer's per-adapter
``lora_A`` / ``lora_B`` (PEFT's layout stays the storage): ``a [n, R, K]``, ``b [n, N, R]``
(ranks zero-padded to the largest, cast to the activation dtype), ``scales`` float32 ``[n]``,
per-adapter dropout, and the rows' ids remapped onto the bank (``-1`` for rows whose adapter this
layer lacks: PEFT's rule, they get the base output). It stacks afresh at every call, and only the
adapters the batch uses: a kept copy could not see an adapter edited in place (``weight.data``
moves neither its address nor its version counter), and checking every weight would read as much
as stacking the used ones. With gradients the stack is differentiable, so an adapter absent from
the batch gets no gradient (``None``) and its optimizer leaves it alone: training several adapters
in one pass equals training each on its own rows. Under ``torch.compile``, or when the rows are
given as a tensor of ids, the bank holds every adapter of the layer (choosing the used ones would
read the ids on the host, a device sync): an absent adapter then gets a zero gradient, which
optimizers with momentum or weight decay still step; pass names to train several adapters at once.
The small per-call tensors (scales, the slot table, dropout probabilities) are built once per value
and device (``constant``), so a steady-state call copies nothing from the host.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from ..ops.validate import check_on_device

#: The adapter name PEFT uses for "no adapter" in ``adapter_names``.
BASE_ADAPTER = "__base__"


@dataclass(frozen=True)
class MixedBatch:
    """``ids [B]`` int64 indices into ``slots`` (-1: base); ``expandable``: the batch a layer sees
    may be ``B * k`` rows, each row repeated ``k`` times in a row (``generate`` with beams or
    several return sequences repeats the batch so); ``uniform``: the one name of every row when
    the names say so (known without reading ``ids``: such a batch takes the single-adapter path)."""

    slots: tuple[str, ...]
    ids: Tensor
    expandable: bool = False
    uniform: str | None = None
    used: tuple[int, ...] | None = None  # the slots some row uses, when the names say so

    @classmethod
    def from_names(cls, adapter_names, slots: tuple[str, ...], device: torch.device, where: str,
                   expandable: bool = False) -> "MixedBatch":
        """From a list of names (``"__base__"`` allowed) or an int tensor of slot indices.

        Raises ``TypeError`` for another type, ``ValueError`` naming the adapters ``where`` (a
        layer or a model) lacks, or ids outside ``[-1, len(slots))``."""
        if isinstance(adapter_names, Tensor):
            if adapter_names.dim() != 1 or adapter_names.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"adapter_names as a tensor must be 1-D int32/int64 adapter indices (-1: base), got "
                                f"{adapter_names.dtype} of shape {list(adapter_names.shape)}")
            ids = adapter_names.to(device=device, dtype=torch.int64)
            if ids.numel() and not torch.compiler.is_compiling():  # checked on the device: no host read
                check_on_device(((ids >= -1) & (ids < len(slots))).all(), f"adapter indices must be in "
                                f"[-1, {len(slots)}) for the adapters {list(slots)} of {where}")
            return cls(slots, ids, expandable)
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"adapter_names must be a list of adapter names (one per row, {BASE_ADAPTER!r} for none), "
                            f"got {type(adapter_names).__name__}")
        bad = [name for name in adapter_names if not isinstance(name, str)]
        if bad:
            raise TypeError(f"adapter_names must hold str names, got {bad[:3]!r}")
        return _from_name_tuple(cls, tuple(adapter_names), slots, device, where, expandable)

    @classmethod
    def _from_str_names(cls, adapter_names: tuple[str, ...], slots: tuple[str, ...], device: torch.device, where: str,
                        expandable: bool) -> "MixedBatch":
        unknown = sorted({name for name in adapter_names if name != BASE_ADAPTER} - set(slots))
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)} ({where} has "
                             f"{list(slots)}; {BASE_ADAPTER!r} means no adapter)")
        index = {name: i for i, name in enumerate(slots)}
        ids = [index.get(name, -1) for name in adapter_names]
        uniform = adapter_names[0] if adapter_names and all(n == adapter_names[0] for n in adapter_names) else None
        used = tuple(sorted({i for i in ids if i >= 0}))
        return cls(slots, constant(tuple(ids), torch.int64, device), expandable, uniform, used)

    def for_batch(self, batch: int) -> "MixedBatch":
        """This batch for an input of ``batch`` rows; ``ValueError`` (PEFT's message) if the
        lengths do not match (and the batch is not a repeat of it, when ``expandable``)."""
        n = self.ids.shape[0]
        if n == batch:
            return self
        if self.expandable and n and batch % n == 0:
            return MixedBatch(self.slots, self.ids.repeat_interleave(batch // n), self.expandable, self.uniform,
                              self.used)
        raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got {n} and "
                         f"{batch} respectively.")


@functools.lru_cache(maxsize=1024)
def _from_name_tuple(cls, names: tuple[str, ...], slots: tuple[str, ...], device: torch.device, where: str,
                     expandable: bool) -> MixedBatch:
    """``MixedBatch.from_names`` of a tuple of names, made once per (names, slots, device): a model serving
    the same mix step after step pays for the lookup once (a refused batch raises and is not kept)."""
    return cls._from_str_names(names, slots, device, where, expandable)


def per_token_ids(ids: Tensor, rows: int) -> Tensor:
    """``[B]`` row ids -> ``[rows]`` ids of the flattened ``[B * T, ...]`` input (``rows = B * T``)."""
    batch = ids.shape[0]
    return ids if rows == batch else ids[:, None].expand(batch, rows // batch).reshape(rows)


@dataclass(frozen=True)
class StackedBank:
    """Operands of ``multi_lora_add`` (module docstring); ``ids`` int64 ``[M]`` onto the bank."""

    a: Tensor
    b: Tensor
    scales: Tensor
    ids: Tensor
    dropout: tuple[float, ...]


@functools.lru_cache(maxsize=4096)
def constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A read-only tensor of ``values`` on ``device``, made once per (values, dtype, device): no
    host-to-device copy per call (and none during CUDA-graph capture after the first call). Made
    outside inference mode, so a first call under ``torch.inference_mode`` leaves a tensor that later
    training calls can save for backward."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device)


def stack_adapters(layer, slots: tuple[str, ...], ids: Tensor, dtype: torch.dtype,
                   used: tuple[int, ...] | None = None) -> StackedBank | None:
    """The bank of ``layer``'s adapters among ``slots`` for the rows ``ids`` (int64 indices into ``slots``,
    ``-1``: base) in ``dtype``; None when no row uses an adapter this layer has. ``used``: the slots the
    rows use, when known without reading ``ids`` (a batch routed by names)."""
    modules_a = layer.lora_A._modules  # a plain dict: cheap per call
    compiling = torch.compiler.is_compiling()
    if used is not None and not compiling:
        names = [slots[i] for i in used if slots[i] in modules_a]
    else:
        names = [name for name in slots if name in modules_a]
    if not names:
        return None
    weights = [(modules_a[name].weight, layer.lora_B._modules[name].weight) for name in names]
    rank = max(a.shape[0] for a, _ in weights)
    if all(a.shape[0] == rank for a, _ in weights):  # one rank (the common case): nothing to pad
        a = torch.stack([a for a, _ in weights]).to(dtype)
        b = torch.stack([b for _, b in weights]).to(dtype)
    else:
        a = torch.stack([F.pad(a.to(dtype), (0, 0, 0, rank - a.shape[0])) for a, _ in weights])
        b = torch.stack([F.pad(b.to(dtype), (0, rank - b.shape[1])) for _, b in weights])
    scales = constant(tuple(float(layer.scaling[name]) for name in names), torch.float32, ids.device)
    if tuple(names) != tuple(slots):  # slot i -> bank index (-1 where the layer lacks it); -1 (base) stays -1
        position = {name: j for j, name in enumerate(names)}
        table = constant((-1, *(position.get(name, -1) for name in slots)), torch.int64, ids.device)
        ids = table[ids + 1]
    return StackedBank(a, b, scales, ids, tuple(layer.lora_dropout[name] for name in names))
