"""Every Python snippet of docs/training.md runs as written (from a scratch folder)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(python_snippets())))
def test_training_docs_snippets_run(index, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "snippet.py").write_text(python_snippets()[index])
    runpy.run_path(str(tmp_path / "snippet.py"), run_name="__main__")
