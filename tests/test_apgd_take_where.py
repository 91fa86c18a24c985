"""APGD's per-row choice of the best point skips the rewrite when every row (or none) improved: the same tensors as
``torch.where``, with or without a host look."""

import pytest
import torch

from fastrobust.attacks.apgd import _take_where


@pytest.mark.parametrize("kind", ["all", "none", "some"])
@pytest.mark.parametrize("sync_free", [False, True])
def test_take_where_equals_torch_where(kind, sync_free):
    g = torch.Generator().manual_seed(0)
    new = (torch.rand(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g))
    old = (torch.rand(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g))
    mask = {"all": torch.ones(6, dtype=torch.bool), "none": torch.zeros(6, dtype=torch.bool),
            "some": torch.tensor([True, False, True, True, False, False])}[kind]
    got = _take_where(mask, new, old, sync_free)
    for got_one, a, b in zip(got, new, old):
        assert torch.equal(got_one, torch.where(mask.view(-1, 1, 1, 1), a, b))
    if kind == "all" and not sync_free:
        assert got[0] is new[0]  # no copy: the point of the look
