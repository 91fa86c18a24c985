"""The invariance table: clean, PGD-20, Gaussian-noise and spatial accuracy of every run under a sweep folder.

Reads each ``RUN/eval.json`` (written by ``fastrobust sweep`` with ``evaluate: [pgd20, gaussian-noise, spatial]``)
and ``RUN/result.json``, and prints one markdown row per run (method, and activation when it is not ReLU).

    python benchmarks/invariance_table.py runs/cpu-invariance > docs/results/invariance/table.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(root: Path) -> tuple[list[str], list[list[str]]]:
    stds: list[str] = []
    found = []
    for eval_file in sorted(root.rglob("eval.json")):
        result = json.loads((eval_file.parent / "result.json").read_text())
        record = json.loads(eval_file.read_text())["evaluations"][0]
        noise = record["attacks"].get("gaussian-noise", {}).get("by_std", {})
        stds = stds or list(noise)
        found.append((result["config"], record, noise))
    header = ["method", "n", "clean", "PGD-20"] + [f"noise σ={s}" for s in stds] + ["spatial (worst of grid)"]
    table = []
    for config, record, noise in found:
        name = config["method"] + ("" if config.get("activation", "relu") == "relu" else f" + {config['activation']} (SAT)")
        attacks = record["attacks"]
        cells = [name, str(record["n"]), f"{record['clean_acc']:.3f}",
                 f"{attacks['pgd20']['robust_acc']:.3f}" if "pgd20" in attacks else "-"]
        cells += [f"{noise[s]:.3f}" if s in noise else "-" for s in stds]
        cells.append(f"{attacks['spatial']['robust_acc']:.3f}" if "spatial" in attacks else "-")
        table.append(cells)
    return header, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", help="a sweep folder (searched recursively for eval.json)")
    args = parser.parse_args(argv)
    header, table = rows(Path(args.runs))
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for cells in table:
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
