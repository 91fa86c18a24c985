"""Exactness settings (review B2, B3): ``deterministic`` sets what torch requires for deterministic kernels, and
every record says which float32 precision (TF32 on CUDA) and determinism were in force. The models call no kernel
that torch refuses in deterministic mode (checked on meta, which stands in for a GPU)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastrobust.cli.train_cmd import collect_settings
from fastrobust.core import precision
from fastrobust.core.records import environment
from fastrobust.errors import ConfigError
from fastrobust.models import create
from fastrobust.train import Trainer, TrainConfig, train
from fastrobust.train.presets import make_config

from helpers import synthetic_dataset

QUIET = dict(progress=False, log=lambda _: None)


def config(tmp_path, name: str, **overrides) -> TrainConfig:
    settings = dict(method="natural", model="tinycnn", model_params={"width": 4}, dataset="synthetic", epochs=1,
                    batch_size=64, lr=0.05, val_pgd_steps=1, test_pgd_steps=1, device="cpu", out=str(tmp_path / name))
    settings.update(overrides)
    return TrainConfig(**settings)


def settings_now() -> tuple:
    return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark)


def test_deterministic_run_sets_torchs_switches_while_it_trains_and_records_them(tmp_path, monkeypatch, one_thread):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # a user's setting, given back after the run
    before = settings_now()
    seen = []
    original = Trainer._step

    def step(self, x, y):
        seen.append(settings_now() + (os.environ.get("CUBLAS_WORKSPACE_CONFIG"),))
        return original(self, x, y)

    monkeypatch.setattr(Trainer, "_step", step)
    result = train(config(tmp_path, "det", deterministic=True), dataset=synthetic_dataset(train=128), **QUIET)
    assert seen and all(s == (True, True, False, ":4096:8") for s in seen)
    assert settings_now() == before  # given back
    recorded = json.loads((tmp_path / "det" / "result.json").read_text())["environment"]
    assert recorded["determinism"] == {"deterministic_algorithms": True, "cudnn_deterministic": True,
                                       "cudnn_benchmark": False, "cublas_workspace_config": ":4096:8"}
    assert result["config"]["deterministic"] is True


def test_every_training_record_carries_the_float32_precision_and_determinism(tmp_path, one_thread):
    matmul_tf32, precision_before = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    try:
        result = train(config(tmp_path, "plain"), dataset=synthetic_dataset(train=64), **QUIET)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.set_float32_matmul_precision(precision_before)
    assert result["environment"]["float32_precision"] == {
        "cuda_matmul_allow_tf32": True, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": "high"}
    assert result["environment"]["determinism"]["deterministic_algorithms"] is False
    assert environment("cpu")["float32_precision"]["float32_matmul_precision"] == "highest"


def test_deterministic_is_a_boolean_setting_and_a_cli_flag():
    with pytest.raises(ConfigError, match="deterministic='yes please' must be true or false"):
        TrainConfig(deterministic="yes please").validate()
    args = SimpleNamespace(preset=None, set=[], compile=None, deterministic=True)  # flags not given: absent
    assert make_config(collect_settings(args)).deterministic is True
    assert make_config({"deterministic": "false"}).deterministic is False


def test_deterministic_algorithms_block_gives_back_the_previous_settings():
    before = settings_now()
    with precision.deterministic_algorithms():
        assert settings_now() == (True, True, False)
        with precision.deterministic_algorithms(False):  # False changes nothing
            assert settings_now() == (True, True, False)
    assert settings_now() == before


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


# the kernels torch.use_deterministic_algorithms(True) refuses (its documentation's list), by ATen name
REFUSED = ("avg_pool3d_backward", "adaptive_avg_pool2d_backward", "adaptive_avg_pool3d_backward",
           "adaptive_max_pool2d_backward", "fractional_max_pool", "max_unpool", "upsample_linear1d_backward",
           "upsample_bilinear2d_backward", "upsample_bicubic2d_backward", "upsample_trilinear3d_backward",
           "reflection_pad", "nll_loss2d", "ctc_loss", "embedding_bag", "put_", "histc", "bincount", "median",
           "grid_sampler", "cumsum", "scatter_reduce")


@pytest.mark.parametrize("name", ["tinycnn", "preactresnet18", "resnet18", "wideresnet", "smallcnn"])
def test_models_call_no_kernel_that_deterministic_mode_refuses(name):
    """A forward and backward (parameters and input) of each zoo model on meta, as a GPU would run them: the
    global average pooling is ATen's mean for a 1x1 output (no adaptive_avg_pool2d kernel)."""
    kwargs = {"image_size": 28, "in_channels": 1} if name == "smallcnn" else {"image_size": 16}
    model = create(name, **kwargs).to("meta")
    x = torch.rand(2, kwargs.get("in_channels", 3), kwargs["image_size"], kwargs["image_size"], device="meta",
                   requires_grad=True)
    with precision.deterministic_algorithms(), Ops() as ops:
        loss = nn.functional.cross_entropy(model(x), torch.zeros(2, dtype=torch.long, device="meta"))
        loss.backward()
    assert any("convolution_backward" in op for op in ops.names)
    assert not [op for op in ops.names if any(refused in op for refused in REFUSED)]
