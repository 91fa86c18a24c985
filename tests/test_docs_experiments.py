"""docs/experiments.md's Python sweep snippet runs as written (on the offline CIFAR-10 copy)."""

from __future__ import annotations

import json
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "experiments.md"


def test_experiments_doc_run_sweep_from_python(tmp_path, monkeypatch, shared_data, one_thread, capsys):
    text = DOC.read_text()
    start = text.index("From Python, with a spec file")
    code = re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTROBUST_DATA", str(shared_data))
    exec(compile(code, str(DOC), "exec"), {"__name__": "__main__"})
    assert "[('natural', 'done'), ('fast_at', 'done')]" in capsys.readouterr().out
    for name in ("natural", "fast_at"):
        result = json.loads((tmp_path / "runs" / "api-sweep" / name / "result.json").read_text())
        assert result["dataset"]["train"] == 200 and result["test"]["n"] == 100  # the injected loader's data
        assert 0 <= result["test"]["pgd20_acc"] <= result["test"]["clean_acc"] <= 1
