"""The attacks' precision inside a training step (fastrobust.core.precision), apart from the training autocast."""

from __future__ import annotations

import pytest
import torch

from fastrobust import methods
from fastrobust.attacks import pgd
from fastrobust.attacks.toolkit import input_gradient, per_example_loss
from fastrobust.errors import ConfigError
from fastrobust.methods.backward_smoothing import backward_smoothing_points
from fastrobust.models import create as create_model
from fastrobust.core.precision import AttackPrecision, attack_precision, loss_scale, resolve
from fastrobust.train import TrainConfig, Trainer

from helpers import synthetic_dataset

FP32, BF16, FP16 = AttackPrecision("cpu", None), AttackPrecision("cpu", torch.bfloat16), AttackPrecision("cpu", torch.float16)


@pytest.fixture(scope="module")
def warmed():
    """tinycnn with BatchNorm statistics of a few batches, in eval mode, and a batch of images."""
    torch.manual_seed(0)
    model = create_model("tinycnn", num_classes=10)
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(32, 3, 32, 32))
    model.eval()
    x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))
    return model, x, y


def _trades_first_gradient(model, x, y, autocast_dtype, policy):
    """The input gradient of TRADES' first KL step (start x + 0.001*N(0,1)), under an autocast of the training."""
    with torch.no_grad():
        reference = model(x)
    start = x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None), attack_precision(policy):
        grad, _, _ = input_gradient(model, start, y, per_example_loss("kl", reference))
    return grad


def test_fp16_attack_gradients_are_loss_scaled_instead_of_underflowing(warmed):
    model, x, y = warmed
    exact = _trades_first_gradient(model, x, y, None, FP32)
    plain = _trades_first_gradient(model, x, y, torch.float16, None)     # fp16 autocast, no policy: as before
    scaled = _trades_first_gradient(model, x, y, torch.float16, FP16)
    assert (exact == 0).float().mean() == 0
    assert (plain == 0).float().mean() > 0.3, "control: unscaled fp16 TRADES gradients underflow"
    assert (scaled == 0).float().mean() < 0.01
    assert (scaled.sign() == exact.sign()).float().mean() > (plain.sign() == exact.sign()).float().mean() + 0.3
    assert scaled.dtype == torch.float32 and torch.isfinite(scaled).all()


def test_fp32_attack_precision_is_exact_under_a_bf16_training_autocast(warmed):
    model, x, y = warmed
    exact = _trades_first_gradient(model, x, y, None, None)
    assert torch.equal(_trades_first_gradient(model, x, y, torch.bfloat16, FP32), exact)
    bf16 = _trades_first_gradient(model, x, y, torch.bfloat16, BF16)
    assert torch.equal(_trades_first_gradient(model, x, y, torch.bfloat16, None), bf16)  # auto under bf16 = bf16
    assert (bf16.sign() == exact.sign()).float().mean() < 0.9  # the review's coin flip, on this toy model

    # Backward Smoothing (its fused backward step and attack step) with a fixed psi
    psi = torch.rand(32, 10, generator=torch.Generator().manual_seed(2)) * 2 - 1
    plain = backward_smoothing_points(model, x, eps=8 / 255, step_size=8 / 255, psi=psi)
    with torch.autocast("cpu", dtype=torch.bfloat16), attack_precision(FP32):
        guarded = backward_smoothing_points(model, x, eps=8 / 255, step_size=8 / 255, psi=psi)
    for a, b in zip(plain, guarded):
        assert torch.equal(a, b)


def test_trades_method_attacks_in_fp32_while_its_loss_runs_in_bf16(warmed, monkeypatch):
    model, x, y = warmed
    seen = {}
    original = methods.standard.trades_objective

    def spy(model_, x_, x_adv, y_, beta):
        seen["x_adv"] = x_adv
        return original(model_, x_, x_adv, y_, beta)

    monkeypatch.setattr(methods.standard, "trades_objective", spy)
    trades = methods.create("trades", steps=3)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16), attack_precision(FP32):
        loss, _ = trades(model, x, y)
    torch.manual_seed(5)
    start = trades.start(x)
    with torch.no_grad():
        reference = model(x)
    expected = pgd(model, x, y, eps=8 / 255, steps=3, step_size=2 / 255, loss="kl", reference_logits=reference,
                   start=start)
    assert torch.equal(seen["x_adv"], expected)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_loss_scale_is_a_power_of_two_that_never_shrinks():
    for largest, expected in [(1e-6, 2.0**19), (0.3, 2.0), (1.0, 1.0), (7.0, 1.0), (0.0, 2.0**64)]:
        scale = loss_scale(torch.tensor([largest, -largest / 3]))
        assert float(scale) == expected, (largest, float(scale))
        if 0 < largest <= 1:
            assert 0.5 < largest * float(scale) <= 1


def test_resolve_and_config_validation():
    assert resolve("auto", "cuda", torch.bfloat16).dtype == torch.bfloat16
    assert resolve("auto", "cpu", None).dtype is None
    assert resolve("fp32", "cuda", torch.bfloat16).dtype is None
    assert resolve("fp16", "cuda", None).loss_scaling
    with pytest.raises(ConfigError, match="attack_precision='fp8' is not one of auto, fp32, bf16, fp16"):
        TrainConfig(attack_precision="fp8").validate()


def test_trainer_runs_the_attack_at_its_own_precision(tmp_path):
    """amp=bf16 training with attack_precision=fp32: eval-mode (attack) forwards run in float32, train-mode
    (loss) forwards in bf16; with attack_precision=auto both run in bf16."""
    data = synthetic_dataset(train=64, val=16, test=16)
    for attack, expected_attack_dtype in (("fp32", torch.float32), ("auto", torch.bfloat16)):
        config = TrainConfig(method="fast_trades", model="tinycnn", dataset="synthetic", epochs=1, batch_size=32,
                             lr=0.05, schedule="constant", device="cpu", amp="bf16", attack_precision=attack,
                             val_pgd_steps=1, test_pgd_steps=1, out=str(tmp_path / attack))
        trainer = Trainer(config, dataset=data, progress=False, log=lambda _: None)
        dtypes: dict[bool, set] = {True: set(), False: set()}
        handle = trainer.model.register_forward_hook(lambda m, _i, out: dtypes[m.training].add(out.dtype))
        trainer._train_epoch(stop=type("Stop", (), {"signal": None})())
        handle.remove()
        assert dtypes[False] == {expected_attack_dtype}, (attack, dtypes)
        assert dtypes[True] == {torch.bfloat16}, (attack, dtypes)


def test_precision_study_script_runs_and_tabulates(shared_data, tmp_path):
    """benchmarks/precision_study.py end to end at toy size (the GPU suite runs its PreActResNet-18 version)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "precision_study.py"
    spec = importlib.util.spec_from_file_location("precision_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    out = tmp_path / "study.jsonl"
    summary = study.main(["--methods", "fast_trades", "--seeds", "0", "--train-subset", "60", "--val-size", "20",
                          "--test-subset", "20", "--epochs", "1", "--batch-size", "30", "--aa-n", "10", "--aa-iters", "2",
                          "--timing-rounds", "1", "--timing-block", "1", "--data-root", str(shared_data),
                          "--json-out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["run", "run", "timing", "summary"]
    assert {r["attack_precision"] for r in records[:2]} == {"fp32", "bf16"} and "aa_acc" in records[0]
    assert len(summary["table"]) == 4 and summary["table"][2].startswith("| fast_trades | fp32 | 1 |")
    assert study.main(["--table-from", str(out)])["table"] == summary["table"]
