"""README's "A tour of the Python API" training snippet runs as written in any folder, taking its data from
``FASTROBUST_DATA`` as a user's copied snippet would (no ``data_root`` in it: an explicit root would beat the
user's FASTROBUST_DATA), and a second run into the same ``out`` is refused without touching the first."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fastrobust.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def training_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    found = [code for code in blocks if "train(TrainConfig(" in code]
    assert len(found) == 1, "README has one Python training snippet"
    return found[0]


def test_readme_training_snippet_runs_as_written(tmp_path, monkeypatch, shared_data, one_thread, capsys):
    assert (shared_data / "cifar10-jpeg").is_dir()
    repo = tmp_path / "somewhere"
    repo.mkdir()
    monkeypatch.chdir(repo)
    monkeypatch.setenv("FASTROBUST_DATA", str(shared_data))  # the user's own offline copy
    code = training_snippet()
    assert "data_root" not in code
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    assert "clean_acc" in printed and "pgd20_acc" in printed, printed
    run = repo / "runs" / "api-demo"
    config = json.loads((run / "config.json").read_text())
    assert Path(config["data_root"]).is_absolute()  # a resume from another folder finds the data
    assert (run / "best.safetensors").is_file()
    before = (run / "result.json").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    assert (run / "result.json").read_bytes() == before
