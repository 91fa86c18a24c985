"""``fastrobust analyze hessian``: top Hessian eigenvalue of the inner-max loss w.r.t. the input (paper Fig. 3)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fastrobust.cli.run_info import dataset_or_run_dataset, run_eps, trained_on
from fastrobust.errors import ConfigError, FastRobustError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("analyze", help="analyses of trained models (hessian: loss smoothness)")
    sub = parser.add_subparsers(dest="analysis", metavar="ANALYSIS")
    hessian = sub.add_parser(
        "hessian", help="largest Hessian eigenvalue of the inner-maximisation loss w.r.t. the input",
        description="Power iteration on Hessian-vector products (double backward) of the attack's loss w.r.t. "
        "the input, at the attack's starting point (random or backward-smoothing init), averaged over N test "
        "images. With --all-epochs, every per-epoch model RUN/epochs/epoch-NNN.safetensors (train with --set "
        "save_epoch_models=1), else every checkpoint kept in RUN/checkpoints/step-* (training keeps only the last "
        "2). --dataset and --eps default to the run's.",
    )
    hessian.add_argument("--checkpoint", required=True, help="a run folder or a .safetensors model file")
    hessian.add_argument("--dataset", default=None,
                         help="dataset to draw the test images from, e.g. cifar10 (default for a fastrobust run: the "
                              "dataset it was trained on)")
    hessian.add_argument("--data-root", default=None, help="where the dataset lies (default: $FASTROBUST_DATA)")
    hessian.add_argument("--n", default="256", help="test images to average over (default 256)")
    hessian.add_argument("--eps", default=None,
                         help="l_inf ball radius of the random init / backward step in [0,1] pixel units, 8/255 "
                              "accepted (default: the eps a fastrobust run was trained and tested at, else 8/255)")
    hessian.add_argument("--init", action="append", choices=("random", "backward_smoothing", "clean"),
                         help="starting point(s), repeatable (default: random and backward_smoothing)")
    hessian.add_argument("--loss", choices=("kl", "ce"), default="kl",
                         help="inner-max loss: kl (TRADES-style, default) or ce (AT-style)")
    hessian.add_argument("--gamma", default="1.0", help="backward smoothing's output noise scale (default 1)")
    hessian.add_argument("--iterations", default="20", help="power iterations (default 20)")
    hessian.add_argument("--batch-size", default="128", help="images per Hessian batch (default 128)")
    hessian.add_argument("--all-epochs", action="store_true",
                         help="analyse every per-epoch model of the run: RUN/epochs/epoch-NNN.safetensors (train with "
                              "--set save_epoch_models=1), else the checkpoints kept in RUN/checkpoints/step-*")
    hessian.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    hessian.add_argument("--seed", default="0", help="seed of the random init and the power-iteration start")
    hessian.add_argument("--json", action="store_true", help="print the records as JSON")
    hessian.set_defaults(func=run_hessian)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _model_files(checkpoint: str, all_epochs: bool) -> list[tuple[str, Path]]:
    from fastrobust.analysis.hessian import epoch_model_files  # startup
    from fastrobust.models.checkpoint import resolve_model_file  # startup

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


def _check_fits(model, dataset, file: Path, run_dataset: str | None) -> None:
    """One line when the model was built for other images or classes than the dataset has."""
    from fastrobust.core.contract import fastrobust_config  # startup
    from fastrobust.models.checkpoint import data_mismatch  # startup

    found = data_mismatch(fastrobust_config(model), dataset.image_shape, dataset.num_classes, dataset.name)
    if found is None:
        return
    fix = f"--dataset {run_dataset}" if run_dataset else "--dataset"
    raise FastRobustError(f"model {file} takes {found}: analyse it on the dataset it was trained on ({fix})")


def run_hessian(args: argparse.Namespace) -> int:
    import torch  # startup

    from fastrobust.analysis.hessian import model_eigenvalues  # startup
    from fastrobust.core.values import (  # startup
        check_eps,
        check_nonnegative_int,
        check_positive_int,
        parse_number,
        pixel_text,
    )
    from fastrobust.data import balanced_head, load_dataset  # startup
    from fastrobust.models.checkpoint import check_model_path, load_model  # startup

    n = check_positive_int(args.n, name="--n")
    iterations = check_positive_int(args.iterations, name="--iterations")
    batch_size = check_positive_int(args.batch_size, name="--batch-size")
    seed = check_nonnegative_int(args.seed, name="--seed")
    gamma = parse_number(args.gamma, name="--gamma")
    inits = args.init or ["random", "backward_smoothing"]
    check_model_path(args.checkpoint)
    run_dataset, run = trained_on(Path(args.checkpoint))
    args.dataset = dataset_or_run_dataset(args.dataset, run_dataset, run, command="analyze")
    default_eps = run_eps(run) if args.eps is None else None
    eps = check_eps(args.eps if args.eps is not None else default_eps if default_eps is not None else "8/255",
                    name="--eps")
    if default_eps is not None:
        print(f"fastrobust analyze: --eps {pixel_text(eps)} (the eps run {run} was trained and tested at; give "
              "--eps for another)", file=sys.stderr)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    files = _model_files(args.checkpoint, args.all_epochs)
    dataset = load_dataset(args.dataset, args.data_root, val_size=0, test_subset=n)
    if run_dataset is not None and dataset.name != run_dataset:
        print(f"fastrobust analyze: warning: run {run} was trained on {run_dataset}, analysed here on "
              f"{dataset.name}", file=sys.stderr)
    images, labels = balanced_head(dataset.test.images, dataset.test.labels, n)  # n points over the classes
    records = []
    for label, file in files:
        model = load_model(file, device=device)[0]
        _check_fits(model, dataset, file, run_dataset)
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
