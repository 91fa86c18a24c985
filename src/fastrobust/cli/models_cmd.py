"""``fastrobust models``: list the model zoo with parameter counts (and the activations)."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the available models with their parameter counts",
        description="List the models `fastrobust train --model` accepts, with parameter counts "
        "for 10 classes and 32x32 RGB inputs, and the activations every model accepts.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of {name, params} objects")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastrobust.models import available_activations, model_info  # startup

    rows = model_info(num_classes=10, in_channels=3, image_size=32)
    if args.json:
        print(json.dumps([{"name": row["name"], "params": row["params"]} for row in rows], indent=2))
        return 0
    name_width = max(len("model"), *(len(row["name"]) for row in rows))
    print(f"{'model':<{name_width}}  {'params':>11}  description")
    for row in rows:
        params = "?" if row["params"] is None else f"{row['params']:,}"
        print(f"{row['name']:<{name_width}}  {params:>11}  {row['description']}")
    print()
    print("parameters counted for 10 classes, 32x32 RGB input")
    print(f"activations (--activation): {', '.join(available_activations())}")
    return 0
