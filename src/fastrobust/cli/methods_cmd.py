"""``fastrobust methods``: every training method with its parameters, defaults and declared cost."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("methods", help="list training methods, parameters and cost")
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastrobust.methods import available_methods, describe  # startup

    records = [describe(name) for name in available_methods()]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    width = max(len(record["name"]) for record in records)
    print(f"{'method':<{width}}  passes  parameters")
    for record in records:
        params = ", ".join(f"{k}={_short(k, v['default'])}" for k, v in record["parameters"].items())
        print(f"{record['name']:<{width}}  {record['cost_passes']:6.2f}  {params}")
    return 0


def _short(name: str, value: object) -> str:
    """Perturbation sizes read best as n/255; every other number as itself."""
    if isinstance(value, float) and ("eps" in name or "step_size" in name):
        scaled = value * 255
        if value < 1 and abs(scaled - round(scaled)) < 1e-9 and round(scaled) > 0:
            return f"{round(scaled)}/255"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
