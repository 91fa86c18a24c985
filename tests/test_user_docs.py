"""The user docs (README.md, docs/**/*.md, benchmarks/README.md) speak to a user on their own machine: no
development paths or absolute paths of the machines the library was built on, no TODO, every relative link
resolves inside the repository, the README's Python example takes its data from FASTROBUST_DATA or the default
cache, and a References section cites every method and attack with its arXiv id."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastrobust.train.presets import preset_descriptions, preset_expected

ROOT = Path(__file__).resolve().parents[1]
USER_DOCS = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").rglob("*.md")])

# paths of the development machines: the shared folder beside the checkout, and absolute home/work folders
DEV_PATH = re.compile(r"\.\./shared\b|(?<![\w.~])/(?:work|home|root|mnt|scratch)/|/Users/\w")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")

CITED = {  # name in the References section -> its arXiv id
    "Backward Smoothing": "2010.01278", "TRADES": "1901.08573", "PGD-AT": "1706.06083", "Fast AT": "2001.03994",
    "Fast AT+": "2006.03089", "SPROUT": "2012.11769", "SLAT": "2104.01575", "SAT": "2006.14536",
    "AutoAttack": "2003.01690", "APGD": "2003.01690", "FAB": "1907.02044", "Square": "1912.00049",
    "RayS": "2006.12792", "RobustBench": "2010.09670",
}


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_user_docs_are_found():
    names = {_name(p) for p in USER_DOCS}
    assert {"README.md", "benchmarks/README.md", "docs/data.md", "docs/results.md", "docs/methods.md"} <= names


@pytest.mark.parametrize("path", USER_DOCS, ids=_name)
def test_no_development_path_or_todo(path):
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        found = DEV_PATH.search(line)
        assert found is None, f"{_name(path)}:{number}: development path {found.group(0)!r}: {line.strip()}"
        assert "TODO" not in line, f"{_name(path)}:{number}: TODO left in a user doc: {line.strip()}"


@pytest.mark.parametrize("path", USER_DOCS, ids=_name)
def test_relative_links_resolve_inside_the_repository(path):
    text = path.read_text(encoding="utf-8")
    for match in LINK.finditer(text):
        target = (match.group(1) or match.group(2)).split("#", 1)[0]
        if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):  # an anchor alone, http(s), mailto
            continue
        resolved = (path.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{_name(path)}: link {target!r} leaves the repository"
        assert resolved.exists(), f"{_name(path)}: link {target!r} does not resolve ({resolved} is missing)"


def test_the_scan_catches_what_it_must():
    assert DEV_PATH.search("export FASTROBUST_DATA=../shared/data")
    assert DEV_PATH.search("export FASTROBUST_DATA=/work/shared/data")
    assert DEV_PATH.search("see /home/alice/data")
    assert not DEV_PATH.search("export FASTROBUST_DATA=/path/to/data; ~/.cache/fastrobust/data; docs/work/x")
    links = [m.group(1) or m.group(2) for m in LINK.finditer("[a](docs/x.md#s) ![f](img.png) [b](https://e.org)")]
    assert links == ["docs/x.md#s", "img.png", "https://e.org"]


def test_the_readme_python_example_uses_the_default_data_root():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert any("TrainConfig(" in block for block in blocks)
    for block in blocks:  # an explicit root beats FASTROBUST_DATA: a copied example would miss the user's data
        assert "data_root=" not in block, block


def test_the_readme_says_what_the_main_command_gives():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    main = readme[: readme.index("## A tour of the Python API")]
    expected = preset_expected("quickstart")  # what the training's last line compares a run with
    clean, pgd = expected.metrics["clean_acc"], expected.metrics["pgd20_acc"]
    assert f"{clean[0]:.1f} +- {clean[1]:.1f} clean" in main and f"{pgd[0]:.1f} +- {pgd[1]:.1f} PGD-20" in main
    for figure in ("33.5 % clean", "24.0 % PGD-20", "21.0 % AutoAttack-fast"):  # the evaluation's table
        assert figure in main, figure
    assert "[docs/results.md](docs/results.md)" in main


def _references() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("\n## References\n")
    end = readme.find("\n## ", start + 1)
    return readme[start: end if end != -1 else len(readme)]


@pytest.mark.parametrize("name", sorted(CITED))
def test_references_cite_every_method_and_attack(name):
    entries = [entry for entry in _references().split("\n- ") if f"**{name}**" in entry]
    assert entries, f"References do not name **{name}**"
    entry = entries[0]
    assert f"arXiv:{CITED[name]}" in entry and f"https://arxiv.org/abs/{CITED[name]}" in entry, entry
    assert re.search(r"\b(19|20)\d\d\b", entry), f"{name}: no year in {entry!r}"


def test_the_docs_link_the_references_and_results():
    for doc in ("docs/methods.md", "docs/results.md"):
        assert "../README.md#references" in (ROOT / doc).read_text(encoding="utf-8"), doc
    assert "docs/results.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_results_page_covers_every_preset():
    text = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    patterns = re.findall(r"`([a-z0-9_{},.\-]+(?:METHOD)?)`", text)
    covered = set()
    for pattern in patterns:  # `cifar10-resnet18-{a,b}-eps16`, `cifar100-resnet18-METHOD`, `-fast_at` shorthands
        alternatives = re.sub(r"\{([^}]*)\}", lambda m: "(" + "|".join(map(re.escape, m.group(1).split(","))) + ")",
                              re.escape(pattern).replace(r"\{", "{").replace(r"\}", "}").replace(r"\,", ","))
        covered.add(re.compile("^" + alternatives.replace("METHOD", "[a-z_]+") + "$"))
    shorthand = set(re.findall(r"`-([a-z_0-9]+)`", text))
    for preset in preset_descriptions():
        named = any(p.match(preset) for p in covered) or preset.rsplit("resnet18-", 1)[-1] in shorthand
        assert named, f"docs/results.md does not mention preset {preset}"
