"""``fastrobust analyze hessian``: top Hessian eigenvalue of the inner-max loss w.r.t. the input (paper Fig. 3)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, FastRobustError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("analyze", help="analyses of trained models (hessian: loss smoothness)")
    sub = parser.add_subparsers(dest="analysis", metavar="ANALYSIS")
    hessian = sub.add_parser(
        "hessian", help="largest Hessian eigenvalue of the inner-maximisation loss w.r.t. the input",
        description="Power iteration on Hessian-vector products (double backward) of the attack's loss w.r.t. "
        "the input, at the attack's starting point (random or backward-smoothing init), averaged over N test "
        "images. With --all-epochs, every checkpoint kept in RUN/checkpoints/step-* (only the last 2 are kept "
        "by training; copy them aside during training for a per-epoch curve).",
    )
    hessian.add_argument("--checkpoint", required=True, help="a run folder or a .safetensors model file")
    hessian.add_argument("--dataset", required=True, help="dataset of the model, e.g. cifar10")
    hessian.add_argument("--data-root", default=None, help="where the dataset lies (default: $FASTROBUST_DATA)")
    hessian.add_argument("--n", default="256", help="test images to average over (default 256)")
    hessian.add_argument("--eps", default="8/255", help="ball radius of the random init / backward step (default 8/255)")
    hessian.add_argument("--init", action="append", choices=("random", "backward_smoothing", "clean"),
                         help="starting point(s), repeatable (default: random and backward_smoothing)")
    hessian.add_argument("--loss", choices=("kl", "ce"), default="kl",
                         help="inner-max loss: kl (TRADES-style, default) or ce (AT-style)")
    hessian.add_argument("--gamma", default="1.0", help="backward smoothing's output noise scale (default 1)")
    hessian.add_argument("--iterations", default="20", help="power iterations (default 20)")
    hessian.add_argument("--batch-size", default="128", help="images per Hessian batch (default 128)")
    hessian.add_argument("--all-epochs", action="store_true", help="analyse every saved checkpoint of the run")
    hessian.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    hessian.add_argument("--seed", default="0", help="seed of the random init and the power-iteration start")
    hessian.add_argument("--json", action="store_true", help="print the records as JSON")
    hessian.set_defaults(func=run_hessian)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _model_files(checkpoint: str, all_epochs: bool) -> list[tuple[str, Path]]:
    from ..analysis.hessian import epoch_model_files
    from ..checkpoint import resolve_model_file

    path = Path(checkpoint)
    if not all_epochs:
        return [("model", resolve_model_file(path))]
    if not path.is_dir():
        raise ConfigError(f"--all-epochs needs a run folder, got {path}")
    files = [(label, file) for label, _, file in epoch_model_files(path)]
    if not files:
        raise FastRobustError(f"{path} has no epochs/epoch-*.safetensors (train with --set save_epoch_models=1) "
                              "and no checkpoints/step-*/model.safetensors to analyse")
    return files


def run_hessian(args: argparse.Namespace) -> int:
    import torch

    from ..analysis.hessian import load_any_model, model_eigenvalues
    from ..data import load_dataset
    from ..numbers import check_eps, check_nonnegative_int, check_positive_int, parse_number

    eps = check_eps(args.eps, name="--eps")
    n = check_positive_int(args.n, name="--n")
    iterations = check_positive_int(args.iterations, name="--iterations")
    batch_size = check_positive_int(args.batch_size, name="--batch-size")
    seed = check_nonnegative_int(args.seed, name="--seed")
    gamma = parse_number(args.gamma, name="--gamma")
    inits = args.init or ["random", "backward_smoothing"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = load_dataset(args.dataset, args.data_root, val_size=0, test_subset=n)
    images, labels = dataset.test.images[:n], dataset.test.labels[:n]
    records = []
    for label, file in _model_files(args.checkpoint, args.all_epochs):
        model = load_any_model(file, device)
        entry: dict[str, Any] = {"checkpoint": str(file), "label": label, "n": len(labels), "eps": eps,
                                 "loss": args.loss, "iterations": iterations}
        entry.update(model_eigenvalues(model, images, labels, eps=eps, inits=inits, loss=args.loss,
                                       iterations=iterations, gamma=gamma, batch_size=batch_size, seed=seed,
                                       device=device))
        records.append(entry)
        if not args.json:
            parts = [f"{init} {entry[init]['mean']:.4g} (median {entry[init]['median']:.4g})" for init in inits]
            print(f"{label}: top Hessian eigenvalue of {args.loss.upper()} w.r.t. the input, mean over {len(labels)}: "
                  + "; ".join(parts), file=sys.stdout)
    if args.json:
        print(json.dumps(records if args.all_epochs else records[0], indent=2, sort_keys=True))
    return 0
