"""``fastrobust analyze hessian``: top Hessian eigenvalue of the inner-max loss w.r.t. the input (paper Fig. 3)."""

from __future__ import annotations

import argparse
import json
import re
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
    from ..checkpoint import resolve_model_file

    path = Path(checkpoint)
    if not all_epochs:
        return [("model", resolve_model_file(path))]
    if not path.is_dir():
        raise ConfigError(f"--all-epochs needs a run folder, got {path}")
    files = []
    for folder in sorted((path / "checkpoints").glob("step-*")):
        state = folder / "state.json"
        model = folder / "model.safetensors"
        if not (state.is_file() and model.is_file()):
            continue
        try:
            epoch = json.loads(state.read_text()).get("epoch")
        except json.JSONDecodeError:
            continue
        step = int(re.sub(r"\D", "", folder.name) or 0)
        files.append((f"epoch {epoch} (step {step})", model))
    if not files:
        raise FastRobustError(f"{path} has no checkpoints/step-*/model.safetensors to analyse")
    return files


def _load(file: Path, device: Any):
    from ..checkpoint import load_model, read_model_file
    from ..models import create

    if file.name == "model.safetensors":  # a training checkpoint: config in its metadata, no extra metadata
        from ..models.custom import is_module_config

        state, config, _ = read_model_file(file)
        if is_module_config(config):
            raise FastRobustError(f"{file} holds a module fastrobust did not build (class {config.get('class')}): "
                                  "analyse it in Python with fastrobust.analysis on the module loaded with its weights")
        model = create(**config)
        model.load_state_dict(state)
        return model.to(device).eval()
    model, _ = load_model(file, device=device)
    return model


def run_hessian(args: argparse.Namespace) -> int:
    import torch

    from ..analysis.hessian import input_hessian_eigenvalues
    from ..data import load_dataset
    from ..evaluate import iterate_split
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
        model = _load(file, device)
        entry: dict[str, Any] = {"checkpoint": str(file), "label": label, "n": len(labels), "eps": eps,
                                 "loss": args.loss, "iterations": iterations}
        for init in inits:
            generator = torch.Generator(device=device).manual_seed(seed)
            values = []
            for x, y in iterate_split(images, labels, batch_size, device):
                values.append(input_hessian_eigenvalues(model, x, y, eps=eps, init=init, loss=args.loss,
                                                        iterations=iterations, gamma=gamma, generator=generator).cpu())
            all_values = torch.cat(values)
            entry[init] = {"mean": float(all_values.mean()), "std": float(all_values.std()) if len(all_values) > 1 else 0.0,
                           "median": float(all_values.median()), "max": float(all_values.max())}
        records.append(entry)
        if not args.json:
            parts = [f"{init} {entry[init]['mean']:.4g} (median {entry[init]['median']:.4g})" for init in inits]
            print(f"{label}: top Hessian eigenvalue of {args.loss.upper()} w.r.t. the input, mean over {len(labels)}: "
                  + "; ".join(parts), file=sys.stdout)
    if args.json:
        print(json.dumps(records if args.all_epochs else records[0], indent=2, sort_keys=True))
    return 0
