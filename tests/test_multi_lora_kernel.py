"""The mixed-batch LoRA kernels (lora_triton/kernels/lora_multi.py) against a float64 loop over adapters.

Banks hold adapters of different ranks (zero-padded to the largest), rows pick an adapter each or
none (-1); outputs are poisoned where the kernel must write, and the base output must survive
untouched on rows without an adapter.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_triton.kernels.lora_multi import multi_lora_add_
from lora_triton.testing import assert_rel_close

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


def reference(x, y0, adapters, ids):
    """Row by row in float64: ``y0[m] + scale_i * round(x[m] @ A_i^T) @ B_i^T`` and ``S``."""
    r_max = max(a.shape[0] for a, _, _ in adapters)
    y = y0.double().clone()
    s = torch.zeros(x.shape[0], r_max, dtype=torch.float64)
    for m, i in enumerate(ids.tolist()):
        if i < 0:
            continue
        a, b, scale = adapters[i]
        s_row = (x[m].double() @ a.double().t()).to(x.dtype).double()  # S rounded to x's dtype
        s[m, : a.shape[0]] = s_row
        y[m] += scale * (s_row @ b.double().t())
    return y, s


def _check(m, n, k, ranks, dtype, device, seed=0, none_rows=True):
    bank_a, bank_b, scales, adapters = make_bank(n, k, ranks, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    y0 = torch.randn(m, n, generator=gen).to(dtype).to(device)
    low = -1 if none_rows else 0
    ids = torch.randint(low, len(ranks), (m,), generator=gen, dtype=torch.int32).to(device)
    y = y0.clone()
    s = multi_lora_add_(x, y, bank_a, bank_b, scales, ids)
    y_ref, s_ref = reference(x.cpu(), y0.cpu(), adapters, ids.cpu())
    assert y.dtype == s.dtype == dtype and s.shape == (m, max(ranks))
    assert_rel_close(s, s_ref, dtype, what="S (multi)")
    assert_rel_close(y, y_ref, dtype, what="y (multi)")
    untouched = ids == -1
    assert torch.equal(y[untouched], y0[untouched])  # rows without an adapter keep the base output exactly
    assert not s[untouched].any()


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_batch_matches_the_per_adapter_loop(m, dtype, device):
    _check(m, 200, 192, [4, 16, 1, 9], dtype, device)


def test_empty_batch_and_every_row_on_one_adapter(device):
    _check(0, 40, 64, [8], torch.float32, device)
    _check(5, 40, 64, [8, 3], torch.float32, device, none_rows=False)


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 150), k=st.integers(1, 300),
       ranks=st.lists(st.integers(1, 64), min_size=1, max_size=6), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_random_banks(m, n, k, ranks, dtype, seed, device):
    _check(m, n, k, ranks, dtype, device, seed)


def _operands(device, m=3, n=20, k=32, adapters=2, r=4, dtype=torch.float32):
    return dict(x=torch.randn(m, k, dtype=dtype, device=device), y=torch.randn(m, n, dtype=dtype, device=device),
                bank_a=torch.randn(adapters, r, k, dtype=dtype, device=device),
                bank_b=torch.randn(adapters, n, r, dtype=dtype, device=device),
                scales=torch.ones(adapters, device=device), adapter_ids=torch.tensor([0, 1, -1], device=device))


@pytest.mark.parametrize("label, change, error, pattern", [
    ("id too large", dict(adapter_ids=[0, 2, -1]), ValueError, r"adapter_ids must be in \[-1, 2\)"),
    ("id below -1", dict(adapter_ids=[0, -2, 1]), ValueError, r"got values in \[-2, 1\]"),
    ("float ids", dict(adapter_ids=torch.tensor([0.0, 1.0, 0.0])), TypeError, "adapter_ids must have dtype"),
    ("wrong id count", dict(adapter_ids=[0, 1]), ValueError, "adapter_ids must have shape"),
    ("bank dtype", dict(bank_b=torch.randn(2, 20, 4, dtype=torch.float16)), TypeError, "B_bank must have dtype"),
    ("bank K", dict(bank_a=torch.randn(2, 4, 31)), ValueError, "A_bank must have shape"),
    ("bank rank", dict(bank_b=torch.randn(2, 20, 5)), ValueError, "B_bank must have shape"),
    ("y rows", dict(y=torch.randn(4, 20)), ValueError, "y must have shape"),
    ("nan scale", dict(scales=torch.tensor([1.0, float("nan")])), ValueError, "scales must be finite"),
    ("fp64 scales", dict(scales=torch.ones(2, dtype=torch.float64)), TypeError, "scales must have dtype"),
    ("1-d x", dict(x=torch.randn(32)), ValueError, r"x must be a 2-D tensor"),
    ("no adapters", dict(bank_a=torch.randn(0, 4, 32)), ValueError, "at least one adapter"),
    ("non-contiguous x", dict(x=torch.randn(32, 3).t()), ValueError, "must be contiguous"),
])
def test_bad_operands_are_named(label, change, error, pattern, device):
    ops = _operands(device)
    for key, value in change.items():
        ops[key] = (torch.tensor(value, device=device) if isinstance(value, list) else value.to(device))
    with pytest.raises(error, match=pattern):
        multi_lora_add_(**ops)
