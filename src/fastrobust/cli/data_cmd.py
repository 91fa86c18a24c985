"""``fastrobust data NAME``: load (decoding once into the cache) and describe a dataset."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="find, decode (once, cached) and describe a dataset",
        description="Load a dataset the way training does and print its splits, source and channel statistics.",
    )
    parser.add_argument("name", help="dataset name: cifar10, cifar100, svhn, mnist, tiny-imagenet, imagefolder")
    parser.add_argument("--root", "--data-root", dest="root", default=None, metavar="DIR",
                        help="data root (default: $FASTROBUST_DATA, else ~/.cache/fastrobust/data); "
                             "for imagefolder the folder or .tar(.gz) itself")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="decoded-array cache (default: $FASTROBUST_CACHE, else ~/.cache/fastrobust/decoded)")
    parser.add_argument("--val-size", type=int, default=1000, help="validation images carved from train (default 1000)")
    parser.add_argument("--download", action="store_true",
                        help="download the official files into --root if they are missing (without --root and "
                             "FASTROBUST_DATA they are downloaded into ~/.cache/fastrobust/data anyway)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="imagefolder: 1 (greyscale) or 3 (RGB); default RGB if any training image is in colour")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastrobust.data import load_dataset  # startup

    dataset = load_dataset(args.name, args.root, val_size=args.val_size, download=args.download or None,
                           cache_dir=args.cache_dir, channels=args.channels)
    summary = dataset.summary()
    if args.json:
        print(json.dumps(summary))
        return 0
    width = 14
    rows = [
        ("name", summary["name"]),
        ("classes", summary["num_classes"]),
        ("image shape", "x".join(str(s) for s in summary["image_shape"])),
        ("train", summary["counts"]["train"]),
        ("val", summary["counts"]["val"]),
        ("test", summary["counts"]["test"]),
        ("mean", ", ".join(f"{m:.4f}" for m in summary["mean"])),
        ("std", ", ".join(f"{s:.4f}" for s in summary["std"])),
        ("augmentation", f"crop padding {summary['crop_padding']}, flip {'yes' if summary['flip'] else 'no'}"),
        ("source", summary["source"]),
    ]
    for key, value in rows:
        print(f"{key:<{width}}{value}")
    return 0
