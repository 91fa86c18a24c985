"""What "fp32" and "repeatable" mean in an evaluation (issue: the first GPU run; review B2/B3).

On CUDA torch lets float32 convolutions run in TF32 by default, so the clean pass and the final flags of every
attack run with TF32 off (``core.precision.no_tf32``), the record states the float32 precision and determinism in
force, and ``evaluate(deterministic=True)`` holds torch to deterministic kernels for the evaluation only. The CPU
shows all three: the flags exist there and the model can read them while it runs.
"""

from __future__ import annotations

import torch
from torch import nn

from fastrobust.evaluate import evaluate


class FlagReader(nn.Module):
    """A linear classifier that records, at every forward, whether TF32 and deterministic kernels were allowed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.seen.append((torch.backends.cudnn.allow_tf32, torch.are_deterministic_algorithms_enabled()))
        return self.net(x)


def data():
    x = torch.rand(8, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    return x, torch.arange(8) % 3


def test_clean_pass_and_final_flags_run_without_tf32_and_the_record_says_what_was_in_force():
    model = FlagReader()
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True  # torch's default for convolutions
    try:
        record = evaluate(model, data(), ["fgsm"], eps=0.1, progress=False)
    finally:
        after = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = before
    assert after is True  # given back as found
    # the pre-checks and the attack's own gradient passes may run as the caller set them; the flag passes may not
    no_grad_passes = [tf32 for tf32, _ in model.seen]
    assert False in no_grad_passes and record["float32_precision"]["cudnn_allow_tf32"] is True
    assert set(record["determinism"]) >= {"deterministic_algorithms", "cudnn_deterministic", "cudnn_benchmark"}
    assert record["determinism"]["deterministic_algorithms"] is False


def test_the_flag_passes_are_exactly_those_without_tf32(monkeypatch):
    """The clean pass (one forward per batch) and the final check (one per attacked batch) see TF32 off."""
    import fastrobust.evaluate.evaluation as evaluation

    flags: list[bool] = []
    real_clean = evaluation._clean_batch

    def clean_batch(model, b, x, y):
        model_seen = len(model_module.seen)
        out = real_clean(model, b, x, y)
        flags.extend(tf32 for tf32, _ in model_module.seen[model_seen:])
        return out

    model_module = FlagReader()
    monkeypatch.setattr(evaluation, "_clean_batch", clean_batch)
    torch.backends.cudnn.allow_tf32, before = True, torch.backends.cudnn.allow_tf32
    try:
        evaluate(model_module, data(), ["clean"], eps=0.1, progress=False, batch_size=4)
    finally:
        torch.backends.cudnn.allow_tf32 = before
    assert flags == [False, False]  # two batches, each its clean pass with TF32 off


def test_deterministic_holds_torch_to_deterministic_kernels_during_the_evaluation_only():
    model = FlagReader()
    assert not torch.are_deterministic_algorithms_enabled()
    record = evaluate(model, data(), ["pgd20"], eps=0.1, progress=False, deterministic=True)
    assert not torch.are_deterministic_algorithms_enabled()  # given back
    assert any(det for _, det in model.seen)
    assert record["determinism"]["deterministic_algorithms"] is True
    again = evaluate(FlagReader(), data(), ["pgd20"], eps=0.1, progress=False, deterministic=True)
    assert again["attacks"]["pgd20"]["robust"] == record["attacks"]["pgd20"]["robust"]
