"""Progress bars are drawn on a terminal only: logs and CI output get the results, not bar redraws."""

from __future__ import annotations

import io

import torch
from torch import nn

from fastrobust.evaluate import evaluate


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _evaluate_with_stderr(monkeypatch, stream) -> str:
    monkeypatch.setattr("sys.stderr", stream)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    images, labels = torch.rand(6, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    evaluate(model, (images, labels), ["pgd20"], eps=8 / 255, progress=True, batch_size=3)
    return stream.getvalue()


def test_evaluation_bars_only_on_a_terminal(monkeypatch, one_thread):
    assert "batch" not in _evaluate_with_stderr(monkeypatch, io.StringIO())   # a log file: no bar
    assert "pgd20" in _evaluate_with_stderr(monkeypatch, _Terminal())          # a terminal: the bar
