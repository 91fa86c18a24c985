"""TorchScript and torch.export programs saved in training mode: a scripted module is switched to eval mode (said),
a traced module or an exported program (whose mode is baked in) is refused in one line naming the fix."""

import pytest
import torch
from torch import nn

from fastrobust.errors import FastRobustError
from fastrobust.models.programs import load_export, load_torchscript

# torch's own notices about TorchScript and tracing, not ours
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")


def _bn_net(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(dropout), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():  # running statistics far from any batch's, so train and eval mode disagree
        net[1].running_mean.fill_(0.3)
        net[1].running_var.fill_(4.0)
    return net


def _images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_scripted_in_training_mode_is_switched_to_eval_and_said(tmp_path):
    net = _bn_net(dropout=0.5).train()
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    said = []
    program = load_torchscript(path, note=said.append)
    x = _images()
    expected = net.eval()(x)
    with torch.no_grad():
        # per-image logits equal eval mode's and do not depend on the batch (old code: batch statistics)
        assert torch.allclose(program(x), expected, atol=1e-5)
        assert torch.allclose(program(x[:2]), expected[:2], atol=1e-5)
        program.train()  # evaluate() restores the caller's mode: the program stays in eval mode
        assert torch.equal(program(x), program(x))
    assert len(said) == 1 and "saved in training mode: switched to eval mode" in said[0]


def test_scripted_in_eval_mode_is_loaded_without_a_note(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(_bn_net().eval()), str(path))
    said = []
    load_torchscript(path, note=said.append)
    assert said == []


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_traced_in_training_mode_is_refused_naming_the_fix(tmp_path, dropout):
    path = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(_bn_net(dropout).train(), _images(), check_trace=False), str(path))
    with pytest.raises(FastRobustError) as info:
        load_torchscript(path, note=lambda _: None)
    message = str(info.value)
    assert "\n" not in message and "traced in training mode" in message and "after model.eval()" in message
    assert ("dropout" in message) == (dropout > 0)


def test_traced_in_eval_mode_loads(tmp_path):
    net = _bn_net(0.5).eval()
    path = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(net, _images()), str(path))
    program = load_torchscript(path, note=lambda _: None)
    with torch.no_grad():
        assert torch.allclose(program(_images()), net(_images()), atol=1e-5)


def _export(net: nn.Module, path, dynamic: bool = True) -> None:
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(net, (_images(),), dynamic_shapes=shapes), str(path))


@pytest.mark.parametrize("dynamic", [True, False])
def test_exported_in_training_mode_is_refused_naming_the_fix(tmp_path, dynamic):
    path = tmp_path / "bntrain.pt2"
    _export(_bn_net().train(), path, dynamic)
    with pytest.raises(FastRobustError) as info:
        load_export(path)
    message = str(info.value)
    assert "\n" not in message and "exported in training mode" in message and "batch norm" in message
    assert "after model.eval()" in message


def test_exported_in_eval_mode_loads_and_a_zero_dropout_in_training_mode_is_no_training_op(tmp_path):
    net = _bn_net(0.5).eval()
    path = tmp_path / "eval.pt2"
    _export(net, path)
    program = load_export(path)
    with torch.no_grad():
        assert torch.allclose(program(_images()), net(_images()), atol=1e-5)
    from fastrobust.core.traced import export_training_ops

    plain = nn.Sequential(nn.Flatten(), nn.Dropout(0.0), nn.Linear(3 * 8 * 8, 3)).train()
    assert export_training_ops(torch.export.export(plain, (_images(),)).graph) == []
    plain[1].p = 0.5
    assert export_training_ops(torch.export.export(plain, (_images(),)).graph) == ["aten.dropout.default"]


# ------------------------------------------------------------------ programs handed straight to the Python API
def test_a_program_traced_in_training_mode_is_refused_at_every_entry_point_given_in_python():
    """Only loaded files were checked: evaluate(torch.jit.trace(net.train(), x), ...) ran its batch norms on batch
    statistics (results depending on the batch), and so did every attack."""
    from fastrobust.attacks import autoattack, fab_t, pgd, square
    from fastrobust.errors import ConfigError
    from fastrobust.evaluate import evaluate
    from fastrobust.evaluate.sanity import sanity_checks

    x, y = _images(), torch.tensor([0, 1, 2, 0, 1, 2])
    traced = torch.jit.trace(_bn_net().train(), x)
    exported = torch.export.export(_bn_net().train(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    wrapped = nn.Sequential(nn.Identity(), traced)  # inside a module of the user's
    calls = {"evaluate": lambda m: evaluate(m, (x, y), ["clean"], eps=8 / 255, progress=False),
             "pgd": lambda m: pgd(m, x, y, eps=8 / 255),
             "autoattack": lambda m: autoattack(m, x, y, eps=8 / 255),
             "fab_t": lambda m: fab_t(m, x, y, eps=8 / 255),
             "square": lambda m: square(m, x, y, eps=8 / 255),
             "sanity_checks": lambda m: sanity_checks(m, (x, y), eps=8 / 255)}
    for model in (traced, exported, wrapped):
        for where, call in calls.items():
            with pytest.raises(ConfigError, match=f"^{where}: the model holds a program traced in training mode "
                                                  r"\(batch norm with batch statistics.*after model.eval\(\)"):
                call(model)


def test_programs_in_eval_mode_run_through_evaluate_and_a_fixed_batch_says_how_to_run_it():
    """An exported module could not be switched to eval mode (NotImplementedError from evaluate); one exported
    for a fixed batch failed with torch's guard message alone."""
    from fastrobust.evaluate import evaluate
    from fastrobust.core.contract import ModelError

    net = _bn_net().eval()
    x, y = _images(), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        expected = (net(x).argmax(1) == y).float().mean().item()
    dynamic = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    for model in (torch.jit.trace(net, x), dynamic):
        record = evaluate(model, (x, y), ["clean", "pgd20"], eps=8 / 255, progress=False, batch_size=4)
        assert record["clean_acc"] == pytest.approx(expected)
    fixed = torch.export.export(net, (x,)).module()
    with pytest.raises(ModelError, match="fixed to batches of 6: export it with a dynamic batch dimension"):
        evaluate(fixed, (x, y), ["clean"], eps=8 / 255, progress=False, batch_size=4)


def test_a_norm_without_running_statistics_traced_in_eval_mode_is_not_a_training_trace():
    """BatchNorm(track_running_stats=False) uses batch statistics in eval mode too; its eval-mode trace was refused
    as 'traced in training mode', with advice (save after model.eval()) that could not help."""
    from fastrobust.evaluate import evaluate
    from fastrobust.core.contract import baked_training_ops

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 3)).eval()
    x, y = _images(), torch.tensor([0, 1, 2, 0, 1, 2])
    traced = torch.jit.trace(net, x)
    exported = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    assert baked_training_ops(traced) == [] and baked_training_ops(exported) == []
    expected = evaluate(net, (x, y), ["clean"], eps=8 / 255, progress=False)["clean_acc"]
    for model in (traced, exported):
        assert evaluate(model, (x, y), ["clean"], eps=8 / 255, progress=False)["clean_acc"] == expected
    assert baked_training_ops(torch.jit.trace(_bn_net().train(), x)) == ["aten::batch_norm"]  # still caught
