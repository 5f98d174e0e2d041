"""The mixed-batch candidates (``ops.candidates.MIXED``: the gathered Triton kernels of
lora_triton/kernels/lora_multi.py and plain torch) against a float64 loop over adapters.

Banks hold adapters of different ranks (zero-padded to the largest), rows pick an adapter each or
none (-1); outputs are poisoned where the kernel must write, each output is within a small multiple of
plain torch's error (the same loop at the dtype), and the base output must survive untouched on rows
without an adapter. Bad operands: tests/test_mixed_batch.py (the op validates, the kernels assert).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_triton.ops import candidates
from lora_triton.testing import assert_like_torch

pytestmark = pytest.mark.usefixtures("poisoned_kernel_outputs")  # outputs start as NaN (conftest)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_bank(n: int, k: int, ranks: list[int], dtype: torch.dtype, device, seed: int = 0):
    """``(A_bank, B_bank, scales, adapters)``: ranks zero-padded to the largest; ``adapters`` the
    unpadded ``(A_i, B_i, scale_i)`` the float64 reference uses."""
    gen = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    bank_a = torch.zeros(len(ranks), r_max, k, dtype=dtype)
    bank_b = torch.zeros(len(ranks), n, r_max, dtype=dtype)
    adapters = []
    for i, r in enumerate(ranks):
        a = (torch.randn(r, k, generator=gen) * k ** -0.5).to(dtype)
        b = (torch.randn(n, r, generator=gen) * r ** -0.5).to(dtype)
        bank_a[i, :r], bank_b[i, :, :r] = a, b
        adapters.append((a, b, 0.5 + i))
    scales = torch.tensor([sc for _, _, sc in adapters], dtype=torch.float32)
    return bank_a.to(device), bank_b.to(device), scales.to(device), adapters


def reference(x, y0, adapters, ids, dtype=torch.float64):
    """Row by row in ``dtype`` (float64: the reference; x's dtype: plain torch): ``y0[m] + scale_i *
    round(x[m] @ A_i^T) @ B_i^T`` and ``S``, S rounded to x's dtype as every path rounds it."""
    r_max = max(a.shape[0] for a, _, _ in adapters)
    y = y0.to(dtype).clone()
    s = torch.zeros(x.shape[0], r_max, dtype=dtype)
    for m, i in enumerate(ids.tolist()):
        if i < 0:
            continue
        a, b, scale = adapters[i]
        s_row = (x[m].to(dtype) @ a.to(dtype).t()).to(x.dtype).to(dtype)
        s[m, : a.shape[0]] = s_row
        y[m] += scale * (s_row @ b.to(dtype).t())
    return y, s


def _check(m, n, k, ranks, dtype, device, method, seed=0, none_rows=True):
    bank_a, bank_b, scales, adapters = make_bank(n, k, ranks, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    y0 = torch.randn(m, n, generator=gen).to(dtype).to(device)
    low = -1 if none_rows else 0
    ids = torch.randint(low, len(ranks), (m,), generator=gen).to(device)
    y, s = candidates.MIXED[method].launch(y0, x, bank_a, bank_b, scales, ids)
    y_ref, s_ref = reference(x.cpu(), y0.cpu(), adapters, ids.cpu())
    y_plain, s_plain = reference(x.cpu(), y0.cpu(), adapters, ids.cpu(), dtype)
    assert y.dtype == s.dtype == dtype and s.shape == (m, max(ranks))
    assert_like_torch(s.cpu(), s_ref, s_plain, what=f"S ({method})")
    assert_like_torch(y.cpu(), y_ref, y_plain, what=f"y ({method})")
    untouched = ids == -1
    assert torch.equal(y[untouched], y0[untouched])  # rows without an adapter keep the base output exactly
    assert not s[untouched].any()


METHODS = list(candidates.MIXED)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_batch_matches_the_per_adapter_loop(m, dtype, method, device):
    _check(m, 200, 192, [4, 16, 1, 9], dtype, device, method)


@pytest.mark.parametrize("method", METHODS)
def test_empty_batch_and_every_row_on_one_adapter(method, device):
    _check(0, 40, 64, [8], torch.float32, device, method)
    _check(5, 40, 64, [8, 3], torch.float32, device, method, none_rows=False)


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 150), k=st.integers(1, 300),
       ranks=st.lists(st.integers(1, 64), min_size=1, max_size=6), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16), method=st.sampled_from(METHODS))
def test_random_banks(m, n, k, ranks, dtype, seed, method, device):
    _check(m, n, k, ranks, dtype, device, method, seed)
