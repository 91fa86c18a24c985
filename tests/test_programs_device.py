"""Programs moved across devices (review A4): a device baked into a program's graph moves with it (torch.export),
or its failure says what happened (TorchScript). ``meta`` stands in for cuda: a program saved on the CPU and
run on meta meets the same baked ``cpu`` that it would meet on a GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastrobust.errors import FastRobustError
from fastrobust.models.programs import load_export
from fastrobust.models.thirdparty import load_model

SHAPE = (3, 4, 4)


class PositionNet(nn.Module):
    """Creates a tensor in forward (on the input's device): tracing bakes that device into the program."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        position = torch.arange(x.shape[-1], device=x.device, dtype=x.dtype)
        return self.fc((x + position).flatten(1)[:, :12])


def exported(tmp_path) -> str:
    path = tmp_path / "net.pt2"
    net = PositionNet().eval()
    program = torch.export.export(net, (torch.rand(2, *SHAPE),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    return path


def test_an_exported_program_is_moved_with_its_baked_devices(tmp_path):
    path = exported(tmp_path)
    with pytest.raises(RuntimeError, match="device"):  # what .to() alone gives: the baked cpu stays
        load_export(path).to("meta")(torch.rand(2, *SHAPE, device="meta"))
    module = load_export(path, "meta")
    assert module(torch.rand(5, *SHAPE, device="meta")).shape == (5, 3)
    model, info = load_model(path, num_classes=3, image_shape=SHAPE, device="meta", note=lambda _: None)
    assert info["format"] == "export" and model(torch.rand(2, *SHAPE, device="meta")).device.type == "meta"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace is deprecated: the test needs a trace
def test_a_torchscript_program_with_a_baked_device_fails_in_one_line_that_says_why(tmp_path):
    """Traced on one device (here meta, as if on a GPU) and run on another (the CPU): TorchScript cannot move
    the device inside its code."""
    path = tmp_path / "net.ts"
    traced = torch.jit.trace(PositionlessHead(), torch.rand(2, *SHAPE, device="meta"))
    torch.jit.save(traced, str(path))
    with pytest.raises(FastRobustError) as caught:
        load_model(path, num_classes=3, image_shape=SHAPE, device="cpu", note=lambda _: None)
    message = str(caught.value)
    assert "\n" not in message and "cannot run on cpu" in message and "traced on" in message
    assert "torch.export" in message and "meta" in message  # torch's own words name the baked device


class PositionlessHead(nn.Module):
    """No parameters (a traced program on meta saves none) and a tensor created in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :3] + torch.arange(3, device=x.device, dtype=x.dtype)
