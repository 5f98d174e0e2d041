"""Peak memory of live tensors, measured the same way on CPU and GPU.

``PeakTensorMemory`` is a ``TorchDispatchMode`` that counts the bytes of every storage an op
creates and uncounts it when the storage is freed, so it sees what a step really holds at
its worst moment: activations, gradients, optimizer states, temporaries. Tensors that existed
before the block (the model's weights, say) are not counted; add them with ``baseline``.
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class PeakTensorMemory(TorchDispatchMode):
    """Context manager; after the block ``peak_bytes`` holds the highest number of bytes that
    tensors created inside it occupied at one time, and ``live_bytes`` what is still alive."""

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._counted: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._count(t.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self._counted:
            return
        self._counted.add(key)
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._release, key, nbytes)

    def _release(self, key: int, nbytes: int) -> None:
        if key in self._counted:
            self._counted.discard(key)
            self.live_bytes -= nbytes


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storages among ``tensors`` (shared storages counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
