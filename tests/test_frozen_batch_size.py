"""Frozen copies and the batch size a trace saw: ``torch.jit.trace`` unrolls a Python loop over the rows
(``torch.cat([net(x[i:i + 1]) for i in range(len(x))])``) for that many rows. The check compared the copies on the
batch and on one point, which both pass (``x[i:i + 1]`` past the end is empty), so the default CPU autoattack
accepted the copies and crashed at the first call with another row count. The check now also compares a batch
of B + 1 rows, and a copy that fails during the check is refused; the model itself is then used."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastrobust.attacks import autoattack
from fastrobust.attacks._frozen import _disagreement, frozen_copies

pytestmark = pytest.mark.usefixtures("one_thread")
OPTIONS = {"apgd-ce": {"n_iter": 5}, "apgd-t": {"n_iter": 5}, "fab-t": {"n_iter": 5}, "square": {"n_queries": 50}}


class PerSample(nn.Module):
    """A valid model that handles the batch one image at a time (per-image preprocessing, TTA code)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))

    def forward(self, x):
        return torch.cat([self.net(x[i:i + 1]) for i in range(x.shape[0])])


def case():
    torch.manual_seed(0)
    model = PerSample().eval()
    x = torch.rand(16, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


@pytest.mark.parametrize("eps", [0.1 / 255, 2 / 255])  # nothing broken (the report's); broken by APGD-CE and -T
def test_a_loop_over_the_rows_refuses_the_copies_and_gives_the_flags_of_the_model(eps):
    model, x, y = case()
    runs = {freeze: autoattack(model, x, y, eps=eps, options=OPTIONS, freeze=freeze, return_details=True,
                               generator=torch.Generator().manual_seed(0)) for freeze in (False, None)}
    assert torch.equal(runs[None].robust, runs[False].robust) and runs[None].broken_by == runs[False].broken_by
    assert torch.equal(runs[None].x_adv, runs[False].x_adv)
    assert any(n.startswith("not frozen: the gradient copy returns logits of shape") and "fixed a batch size" in n
               for n in runs[None].notes), runs[None].notes
    with torch.no_grad():
        assert torch.equal(runs[None].robust, model(runs[None].x_adv).argmax(1) == y)
    assert float((runs[None].x_adv - x).abs().max()) <= eps + 1e-7


def test_the_same_network_without_the_loop_still_gets_its_copies():
    model, x, y = case()
    copies = frozen_copies(model.net, x, y)
    assert copies.grad_model is not None and copies.query_model is not None, copies.note
    assert copies.note.startswith("frozen TorchScript copies")
    assert frozen_copies(model, x, y).grad_model is None


class FailsOnUnseenRows(nn.Module):
    """Stands in for a copy (or a model) that raises on a batch size it was not built for."""

    def __init__(self, inner: nn.Module, rows: set[int]):
        super().__init__()
        self.inner, self.rows = inner, rows

    def forward(self, x):
        if len(x) not in self.rows:
            raise RuntimeError(f"built for {sorted(self.rows)} rows")
        return self.inner(x)


def test_a_copy_or_model_that_fails_during_the_check_refuses_the_copies():
    model, x, y = case()
    net = model.net
    assert _disagreement(net, net, net, x, y) == ""
    failing = FailsOnUnseenRows(net, {1, 16})
    assert _disagreement(net, failing, net, x, y) == (
        "the gradient copy fails on a batch of 17 rows (RuntimeError: built for [1, 16] rows)")
    assert _disagreement(net, net, failing, x, y).startswith("the query copy fails on a batch of 17 rows")
    assert _disagreement(failing, net, net, x, y).startswith("the model fails on a batch of 17 rows")


class Pairs(nn.Module):
    """Reads its rows two at a time: traces on an even batch, fails on one row."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2 * 3 * 8 * 8, 20)

    def forward(self, x):
        return self.lin(x.reshape(x.shape[0] // 2, -1)).reshape(-1, 10)


def test_a_model_that_fails_on_one_row_gets_a_note_not_an_error():
    """The gradient copy's slice size is measured on one row; a model that traces but cannot run one row is refused
    its copies with the check's note (the model is then used as it is); frozen_copies never raises."""
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
    copies = frozen_copies(Pairs().eval(), x, y)
    assert copies.grad_model is None
    assert copies.note.startswith("not frozen: the model fails on a batch of 1 rows"), copies.note
