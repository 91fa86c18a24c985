"""The "bring your own model" documentation runs as written: docs/models.md "Train your own architecture" and
docs/evaluation.md "Evaluate a model you did not train here" (its Python block and its first shell line), on the
offline CIFAR-10 copy."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from fastrobust.cli import main
from fastrobust.models import unregister

DOCS = Path(__file__).resolve().parents[1] / "docs"


def section(doc: str, heading: str) -> str:
    text = (DOCS / doc).read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end > 0 else len(text)]


def block(text: str, language: str) -> str:
    found = re.search(rf"```{language}\n(.*?)```", text, re.S)
    assert found, f"no {language} block"
    return found.group(1)


@pytest.fixture
def workdir(tmp_path, monkeypatch, shared_data, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTROBUST_DATA", str(shared_data))
    return tmp_path


def test_models_doc_train_your_own_architecture(workdir, capsys):
    code = block(section("models.md", "## Train your own architecture"), "python")
    try:
        exec(compile(code, "docs/models.md", "exec"), {"__name__": "__main__"})
    finally:
        unregister("mynet")
    out = capsys.readouterr().out
    assert "module {'source': 'module', 'class': '__main__.MyNet'" in out
    assert "{'source': 'registered', 'name': 'mynet', 'factory': '__main__:MyNet'}" in out
    epochs = [json.loads(line)["epoch"] for line in (workdir / "runs/mynet/metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_evaluation_doc_evaluate_a_model_you_did_not_train_here(workdir, capsys):
    text = section("evaluation.md", "## Evaluate a model you did not train here")
    exec(compile(block(text, "python"), "docs/evaluation.md", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert "ResNet-18 (basic blocks 2-2-2-2, head linear) | resnet | given: mean" in out
    first = block(text, "bash").splitlines()[0]
    argv = shlex.split(first.split("#")[0])
    assert argv[0] == "fastrobust"
    assert main(argv[1:] + ["--quiet", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["n"] == 20 and record["model_source"]["architecture"].startswith("ResNet-18")
    assert record["model_source"]["normalization"]["how"].startswith("given: dataset")
