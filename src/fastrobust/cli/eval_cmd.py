"""``fastrobust eval``: robust accuracy of a saved model on a dataset's test split (see docs/evaluation.md)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from fastrobust.cli.run_info import dataset_or_run_dataset
from fastrobust.cli.run_info import run_eps as _run_eps
from fastrobust.cli.run_info import trained_on as _trained_on
from fastrobust.core.values import pixel_text
from fastrobust.errors import ConfigError, FastRobustError


def register(subparsers) -> None:
    from fastrobust.evaluate import ATTACKS  # startup

    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint under adversarial attacks (PGD, AutoAttack, RayS, ...)",
        description="Robust accuracy of a saved model on the test split of a dataset. Each attack runs on "
        "every correctly classified point; the overall robust accuracy is the per-example worst case.",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder (best, else last model), one of its checkpoint folders "
                             "(RUN/checkpoints/step-N), a fastrobust .safetensors file, or a model trained elsewhere: a state dict (.pt/.pth/.safetensors, read with weights_only=True), "
                             "a TorchScript archive or a torch.export .pt2 program (see docs/evaluation.md)")
    parser.add_argument("--model", default=None,
                        help="for a state dict: the model it fits (a zoo name, or one registered by --import); "
                             "the public ResNet, PreActResNet and WideResNet layouts are recognised without it")
    parser.add_argument("--model-factory", default=None, metavar="FILE.py:FUNCTION",
                        help="RUNS FILE.py and calls FUNCTION to build the module the state dict loads into "
                             "(an architecture fastrobust does not have)")
    parser.add_argument("--normalization", default=None, metavar="none|dataset|MEAN,STD",
                        help="input normalisation of a model trained elsewhere: none (it takes [0,1] pixels), "
                             "dataset (the dataset's mean/std), or MEAN,STD numbers (one pair, or one per channel: "
                             "means first); without it, none is assumed and said")
    parser.add_argument("--dataset", default=None,
                        help="dataset name, e.g. cifar10 (see `fastrobust data`); default for a fastrobust run: the "
                             "dataset it was trained on")
    parser.add_argument("--data-root", default=None,
                        help="where the dataset lies (default: $FASTROBUST_DATA, else ~/.cache/fastrobust/data, "
                             "where a missing dataset is downloaded once)")
    parser.add_argument("--attack", action="extend", nargs="+", choices=ATTACKS, metavar="ATTACK",
                        help=f"attacks to run, e.g. --attack pgd20 autoattack (default: pgd20); any of {', '.join(ATTACKS)} "
                        "(gaussian-noise and spatial are invariance evaluations, see docs/evaluation.md)")
    parser.add_argument("--eps", default=None,
                        help="perturbation size in [0,1] pixel units: l_inf in (0, 1], 8/255 accepted; l2 a positive "
                             "radius up to sqrt(C*H*W); l1 a positive radius up to C*H*W. Default: for a fastrobust "
                             "run folder (linf) the eps it was trained and tested at, else the CIFAR-10 budgets of "
                             "AutoAttack and RobustBench, 8/255 for linf, 0.5 for l2 and 12 for l1")
    parser.add_argument("--norm", default="linf", choices=("linf", "l2", "l1"),
                        help="threat model (default linf); l1 runs with apgd-ce, apgd-t, fab-t, square, autoattack "
                             "(the official standard l1 AutoAttack), autoattack-fast (its APGD components) and "
                             "autoattack-rand")
    parser.add_argument("--test-subset", default=None,
                        help="evaluate N test points: class-balanced, or with --protocol the first N of the test "
                             "order")
    parser.add_argument("--protocol", default=None, choices=PROTOCOL_CHOICES,
                        help="a leaderboard's protocol: robustbench = standard AutoAttack at the dataset's standard "
                             "eps (CIFAR-10/100 linf 8/255, CIFAR-10 l2 0.5) on the first N points of the official "
                             "test order (all by default; --test-subset N), clean accuracy on the same points, and "
                             "the leaderboard's model_info fields (--model-info FILE)")
    parser.add_argument("--cross-check", default=None, metavar="K",
                        help="with --protocol: also run the official AutoAttack (pip install pyautoattack) on K "
                             "random points of those and report the per-point agreement")
    parser.add_argument("--allow-other-order", action="store_true",
                        help="with --protocol: proceed on data whose test order is not the official one (a "
                             "class-sorted copy); its first N points are then not the leaderboard's")
    parser.add_argument("--model-info", default=None, metavar="FILE.json",
                        help="with --protocol: write the leaderboard's model_info JSON (clean_acc, autoattack_acc, "
                             "eps, dataset, threat_model, architecture, ..., and the cost) to this file")
    parser.add_argument("--batch-size", default="256", help="batch size (default 256)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--queries", default=None,
                        help="query budget of square, rays and AutoAttack's Square (default 5000; rays 10000)")
    parser.add_argument("--sanity", action="store_true",
                        help=f"also run the gradient-masking sanity checks (exit status {SANITY_FAILED} when one fails)")
    parser.add_argument("--json", action="store_true", help="print the record as one JSON object on stdout")
    parser.add_argument("--out", default=None,
                        help="append the record as one JSON line to this file (new, or a JSON-lines file; checked "
                             "before any attack runs); a fastrobust run's record is also kept in its folder, "
                             "RUN/evaluations/, for `fastrobust report`")
    parser.add_argument("--state", default=None,
                        help="resumable state file (JSON, created when missing): rerun the same command to resume")
    parser.add_argument("--seed", default="0", help="seed of the attacks' random starts (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels only (on CUDA needed for the same flags every repeat; slower)")
    parser.add_argument("--nproc", default=None, metavar="N",
                        help="evaluate on N processes of this machine (re-runs the command under torchrun; "
                             "the record is the one-process record; see docs/distributed.md)")
    parser.set_defaults(func=run)


def _device(name: str | None):
    import torch  # startup

    from fastrobust.core.contract import check_device  # startup

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(name, where=None, fix="--device cpu")


# the usual CIFAR-10 budgets (AutoAttack, Croce & Hein 2020; RobustBench, Croce et al. 2021): l_inf 8/255, l_2 0.5
DEFAULT_EPS = {"linf": "8/255", "l2": "0.5", "l1": "12"}
PROTOCOL_CHOICES = ("robustbench",)  # fastrobust.evaluate.leaderboard.PROTOCOLS (not imported at startup)
SANITY_FAILED = 3  # exit status of `eval --sanity` when a check fails (the record is still printed and written)


def _own_checkpoint(args: argparse.Namespace) -> bool:
    """A fastrobust run folder or file evaluated as saved (no third-party loading options)."""
    from fastrobust.core.filekind import checkpoint_format  # startup
    from fastrobust.models.checkpoint import MODEL_KEY  # startup
    from fastrobust.models.thirdparty import has_fastrobust_header  # startup

    if args.model or args.model_factory or args.normalization:
        return False
    path = Path(args.checkpoint)
    if path.is_dir() or not path.exists():
        return True  # load_model names what is missing
    kind = checkpoint_format(path)
    if kind == "safetensors":
        return has_fastrobust_header(path, MODEL_KEY)
    return path.suffix == ".safetensors" and kind is None  # damaged: load_model says how


def _check_files(args: argparse.Namespace) -> None:
    """Every file argument, before any data is read or attack run: --checkpoint exists, --out is a new or
    JSON-lines file that can be written, --state is an evaluation state file or a new file."""
    from fastrobust.core.output_files import check_records_file, check_writable  # startup
    from fastrobust.evaluate import read_state_file  # startup
    from fastrobust.models.checkpoint import check_model_path  # startup

    check_model_path(args.checkpoint)
    if args.out is not None:
        check_records_file(args.out, what="--out", record_keys=("attacks", "clean_acc"))
    if args.state is not None:
        check_writable(args.state, what="--state", example="eval-state.json")
        read_state_file(args.state)
        if args.out is not None and Path(args.out).resolve() == Path(args.state).resolve():
            raise ConfigError(f"--out and --state are the same file {args.out}: give two paths")
    if args.model_info is not None:
        check_writable(args.model_info, what="--model-info", example="model_info.json")
        for flag, other in (("--out", args.out), ("--state", args.state)):
            if other is not None and Path(other).resolve() == Path(args.model_info).resolve():
                raise ConfigError(f"--model-info and {flag} are the same file {other}: give two paths")


def _check_protocol(args: argparse.Namespace) -> None:
    """The options that --protocol fixes are refused with it, and its own options without it."""
    if args.protocol is None:
        given = [flag for flag, value in (("--cross-check", args.cross_check), ("--model-info", args.model_info),
                                          ("--allow-other-order", args.allow_other_order)) if value]
        if given:
            raise ConfigError(f"{given[0]} belongs to --protocol: add --protocol robustbench, or drop {given[0]}")
        return
    if args.attack:
        raise ConfigError(f"--attack {' '.join(args.attack)} with --protocol {args.protocol}: the protocol runs "
                          "standard AutoAttack and the clean pass; drop --attack (or drop --protocol)")
    if args.queries is not None:
        raise ConfigError(f"--queries {args.queries} with --protocol {args.protocol}: the protocol runs standard "
                          "AutoAttack with its published budget; drop --queries (or drop --protocol)")


def run(args: argparse.Namespace) -> int:
    from fastrobust.core import distributed as dist_lib  # startup
    from fastrobust.core.values import check_positive_int  # startup

    if args.nproc is not None:
        from fastrobust.cli.train_cmd import command_line  # startup

        return dist_lib.relaunch(check_positive_int(args.nproc, name="--nproc"), command_line("eval"))
    try:
        return _run(args)
    except FastRobustError as error:
        if dist_lib.is_initialized() and not dist_lib.context().is_main:
            raise FastRobustError(f"rank {dist_lib.context().rank}: {error}") from None
        raise
    except Exception as error:
        if dist_lib.is_initialized() and dist_lib.is_collective_failure(error):
            raise FastRobustError(dist_lib.failure_message(error, dist_lib.context(), None)) from None
        raise
    finally:
        dist_lib.shutdown()


def _run(args: argparse.Namespace) -> int:
    from fastrobust.core import distributed as dist_lib  # startup
    from fastrobust.core.contract import ModelError, eps_size_note  # startup
    from fastrobust.core.values import (  # startup
        check_eps,
        check_eps_fits,
        check_nonnegative_int,
        check_positive_int,
    )
    from fastrobust.data import load_dataset  # startup
    from fastrobust.evaluate import evaluate, query_budget  # startup
    from fastrobust.evaluate.leaderboard import check_official_order, robustbench_evaluation, standard_eps  # startup
    from fastrobust.models.checkpoint import data_mismatch, load_model, saved_normalization  # startup

    _check_protocol(args)
    eps = check_eps(DEFAULT_EPS[args.norm] if args.eps is None else args.eps, name="--eps", norm=args.norm)
    cross_check = 0 if args.cross_check is None else check_nonnegative_int(args.cross_check, name="--cross-check")
    batch_size = check_positive_int(args.batch_size, name="--batch-size")
    seed = check_nonnegative_int(args.seed, name="--seed")
    test_subset = None if args.test_subset is None else check_positive_int(args.test_subset, name="--test-subset")
    device = _device(args.device)
    ctx = dist_lib.setup(str(device))  # several ranks under torchrun: each takes its share of the batches
    device = dist_lib.local_device(device, ctx)
    attacks = args.attack or ["pgd20"]
    _check_files(args)
    trained_on, run_folder = _trained_on(Path(args.checkpoint))
    args.dataset = dataset_or_run_dataset(args.dataset, trained_on, run_folder, command="eval", say=ctx.is_main)

    # the protocol's eps is the leaderboard's (below, once the dataset is known)
    run_eps = _run_eps(run_folder) if args.eps is None and args.norm == "linf" and not args.protocol else None
    if run_eps is not None and abs(run_eps - eps) > 1e-9:  # a run at another eps is evaluated at its own eps
        eps = check_eps(run_eps, name="--eps", norm=args.norm)
        if ctx.is_main:
            print(f"fastrobust eval: --eps {pixel_text(eps)} (the eps run {run_folder} was trained and tested at; "
                  "give --eps for another)", file=sys.stderr)

    own = _own_checkpoint(args)
    if own:  # read before the dataset: a bad checkpoint fails fast
        model, metadata = load_model(args.checkpoint, device=device)
        config = metadata.get("model") or {}
        mean, std, how = saved_normalization(config)
        source = {"format": "fastrobust", "normalization": {"mean": mean, "std": std, "how": how}}
    # only test is read; the protocol takes the first N points of the test order itself
    dataset = load_dataset(args.dataset, args.data_root, val_size=0, test_subset=None if args.protocol else test_subset)
    if args.protocol:  # refused before the model is loaded or any attack runs
        check_official_order(dataset, args.allow_other_order)
        eps = standard_eps(dataset.name, args.norm, args.eps)
    check_eps_fits(eps, args.norm, dataset.image_shape, name="--eps")
    if trained_on is not None and dataset.name != trained_on and ctx.is_main:
        print(f"fastrobust eval: warning: run {run_folder} was trained on {trained_on}, evaluated here on "
              f"{dataset.name}", file=sys.stderr)
    if not own:
        from fastrobust.models.thirdparty import load_model as load_any  # startup
        from fastrobust.models.thirdparty import parse_normalization  # startup

        normalization = parse_normalization(args.normalization, dataset.image_shape[0], dataset_name=dataset.name,
                                            dataset_stats=(dataset.mean, dataset.std))
        model, source = load_any(
            args.checkpoint, num_classes=dataset.num_classes, image_shape=dataset.image_shape, model=args.model,
            factory=args.model_factory, normalization=normalization, dataset=dataset.name, device=device,
            note=(lambda message: print(f"fastrobust eval: {message}", file=sys.stderr)) if ctx.is_main else (lambda _m: None))
        metadata = {"path": source["path"], "model": source.get("model")}
    # global pooling lets a model run on another image size; channels and classes must fit
    found = data_mismatch(getattr(model, "fastrobust_config", None), dataset.image_shape, dataset.num_classes,
                          args.dataset, image_size=False)
    if found is not None:
        raise FastRobustError(f"checkpoint {metadata.get('path', args.checkpoint)} takes {found}: evaluate it on the "
                              "dataset it was trained on")
    if len(dataset.test.labels) == 0:
        raise FastRobustError(f"dataset {args.dataset!r} has an empty test split: nothing to evaluate")

    options: dict = {}
    if args.queries is not None:
        queries = check_positive_int(args.queries, name="--queries")
        options = {name: budget for name in attacks if (budget := query_budget(name, queries)) is not None}
    model_file = metadata.get("path", str(args.checkpoint))
    if ctx.is_main and not args.quiet:
        print(f"fastrobust eval: {_model_text(model, source)}", file=sys.stderr)
    if args.eps is None and args.norm in ("l2", "l1") and ctx.is_main:  # said once every check has passed
        whose = "RobustBench's" if args.norm == "l2" else "the official AutoAttack's"
        print(f"fastrobust eval: --eps {DEFAULT_EPS[args.norm]} (the usual {args.norm} budget, {whose} for CIFAR-10; "
              "give --eps for another)", file=sys.stderr)
    eps_note = eps_size_note(eps, args.norm, tuple(dataset.image_shape), linf="--norm linf")
    if eps_note is not None and ctx.is_main:
        print(f"fastrobust eval: warning: {eps_note}", file=sys.stderr)
    try:
        with warnings.catch_warnings():  # said above in the command's words (and in the record's warnings)
            warnings.filterwarnings("ignore", message=r"l[12] radius .* is (small|large) for", category=UserWarning)
            if args.protocol:
                record = robustbench_evaluation(
                    model, dataset, n=test_subset, eps=eps, norm=args.norm, cross_check=cross_check,
                    allow_other_order=args.allow_other_order, architecture=_architecture(model, source),
                    batch_size=batch_size, device=device, state_file=args.state, progress=not args.quiet, seed=seed,
                    distributed=ctx.active)
            else:
                record = evaluate(model, dataset.test, attacks, eps=eps, norm=args.norm, batch_size=batch_size,
                                  device=device, state_file=args.state, progress=not args.quiet, seed=seed,
                                  attack_options=options, distributed=ctx.active,
                                  deterministic=args.deterministic)
            if args.sanity and ctx.is_main:  # rank 0 runs the sanity checks, prints and writes the record
                from fastrobust.evaluate.sanity import sanity_checks  # startup

                record["sanity"] = sanity_checks(model, dataset.test, eps=eps, norm=args.norm,
                                                 batch_size=batch_size, device=device, seed=seed,
                                                 progress=not args.quiet)
    except ModelError as error:
        raise FastRobustError(f"during the evaluation, the model {model_file} {error.detail}") from None
    except KeyboardInterrupt:
        if not ctx.is_main:
            raise
        raise KeyboardInterrupt(  # the CLI's one interrupt line carries what to do next
            f"the finished batches are kept in --state {args.state}: run the same command again to resume"
            if args.state else "add --state FILE to make a long evaluation resumable (each finished batch is "
            "kept, and the same command resumes)") from None
    if not ctx.is_main:
        return 0
    record = {"checkpoint": model_file, "dataset": dataset.name, "test_subset": test_subset, "model_source": source,
              **record}
    if args.json:  # printed first: a record is never lost to a failing --out
        print(json.dumps(record, sort_keys=True))
    else:
        print_summary(record, file=sys.stdout, model_line_shown=not args.quiet)
    if args.model_info:
        from fastrobust.core.files import atomic_write_json  # startup

        atomic_write_json(args.model_info, record["model_info"])
    if run_folder is not None:
        _save_in_run(run_folder, record, model_file, test_subset, args)
    if args.out:
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as error:
            raise FastRobustError(f"--out {out} cannot be written ({error.strerror or error}): the results are "
                                  "printed above" + ("" if args.json else " (--json prints the whole record)")) from None
    failed = [flag["name"] for flag in record.get("sanity", []) if not flag["passed"]]
    if failed:  # a script or CI job must not take a number the checks distrust for a pass
        print(f"fastrobust eval: sanity check(s) failed: {', '.join(failed)}; the robust accuracy above may be "
              "overestimated (gradient masking?): see docs/evaluation.md, \"Sanity checks\" (exit status "
              f"{SANITY_FAILED})", file=sys.stderr)
        return dist_lib.exit_status(SANITY_FAILED, ctx)  # under --nproc: through the launcher, not torchrun
    return 0


def _save_in_run(run_folder: Path, record: dict, model_file: str, test_subset: int | None,
                 args: argparse.Namespace) -> None:
    """Keep the record in the run folder it evaluated (``RUN/evaluations/``, a new file each time, see
    ``fastrobust.train.evaluations``), so that ``fastrobust report`` shows it; said on stderr."""
    from fastrobust.train.evaluations import evaluated_points, save_evaluation  # startup

    try:
        weights = Path(model_file).resolve().relative_to(run_folder.resolve()).as_posix()
    except ValueError:
        weights = Path(model_file).name
    try:
        path = save_evaluation(run_folder, record, weights=weights, points=evaluated_points(record, test_subset))
    except OSError as error:
        print(f"fastrobust eval: warning: the record could not be kept in run {run_folder} "
              f"({error.strerror or error}); it is printed above", file=sys.stderr)
        return
    if not args.quiet:
        print(f"fastrobust eval: record kept in {path} (fastrobust report {run_folder} shows it)", file=sys.stderr)


def _rounded(values) -> list:
    """Per-channel statistics to 4 significant digits, for a line a person reads."""
    return [float(f"{v:.4g}") for v in values] if isinstance(values, (list, tuple)) else values


def _architecture(model, source: dict) -> str:
    """The model's architecture as a person names it: the zoo name, the recognised layout, else its class."""
    config = getattr(model, "fastrobust_config", None) or {}
    return config.get("name") or source.get("architecture") or type(model).__name__


def _model_text(model, source: dict) -> str:
    """One line on the model about to be evaluated: architecture, parameter count, input normalisation."""
    architecture = _architecture(model, source)
    params = sum(p.numel() for p in model.parameters())
    normalization = source.get("normalization") or {}
    how = normalization.get("how", "none")
    said = "mean" in how  # "given: mean [...], std [...]" and the module's own buffers already name the values
    values = "" if normalization.get("mean") is None or said else \
        f" mean {_rounded(normalization['mean'])}, std {_rounded(normalization['std'])}"
    return f"model {architecture}, {params:,} parameters, input normalisation {how}{values}"


def _loaded_text(source: dict, *, normalisation: bool = True) -> str:
    """One line on what a model trained elsewhere was loaded as (empty for fastrobust's own files);
    ``normalisation``: name the input normalisation too (not when the model line has said it already)."""
    if not source or source.get("format") in (None, "fastrobust"):
        return ""
    parts = [f"format {source['format']}"]
    if source.get("architecture") and source.get("architecture") != source.get("format"):
        parts.append(f"architecture {source['architecture']}")
    if source.get("layout"):
        parts.append(f"layout {source['layout']}")
    if source.get("factory"):
        parts.append(f"built by {source['factory']}")
    normalization = (source.get("normalization") or {}) if normalisation else {}
    if normalization.get("how"):
        mean, std = normalization.get("mean"), normalization.get("std")
        values = "" if mean is None or "mean [" in normalization["how"] else \
            f" (mean {[round(v, 4) for v in mean]}, std {[round(v, 4) for v in std]})"
        parts.append(f"normalisation {normalization['how']}{values}")
    return "loaded: " + "; ".join(parts)


AUTOATTACK_FAST_NOTE = ("note: autoattack-fast runs APGD-CE and APGD-T only, a subset of the standard AutoAttack: "
                        "its accuracy is an upper bound of standard AutoAttack's (--attack autoattack gives that)")


def _per_point(record: dict, name: str, kind: str) -> str:
    """Passes of kind ``kind`` per point attacked by ``name`` (the clean pass: per point), as a short number."""
    if name == "clean":
        cost = {"forward_per_point": record["cost"]["clean"]["forward"] / max(record["n"], 1),
                "backward_per_point": 0.0} if "cost" in record else {}
    else:
        cost = record["attacks"][name].get("cost", {})
    value = cost.get(f"{kind}_per_point")
    return "" if value is None else f"{value:.4g}"


def print_summary(record: dict, file=sys.stdout, *, model_line_shown: bool = False) -> None:
    """A small table: one row per attack, then the worst case and the sanity flags.

    Args:
        record: the evaluation record.
        file: where to print (default stdout).
        model_line_shown: the model line (``_model_text``, with the input normalisation) was printed already,
            so the ``loaded:`` line leaves the normalisation out (default False: it names it).
    """
    eps = record["eps"]
    eps_text = pixel_text(eps) if record["norm"] == "linf" else f"{eps:.4g}"  # 8/255, as train prints it
    print(f"{record.get('checkpoint', record['model'])} on {record.get('dataset', '?')}: n={record['n']}, "
          f"{record['norm']} eps={eps_text}, device {record['device']}", file=file)
    loaded = _loaded_text(record.get("model_source") or {}, normalisation=not model_line_shown)
    if loaded:
        print(loaded, file=file)
    print(f"{'attack':<20} {'accuracy':>9} {'broken':>7} {'seconds':>9} {'fwd/pt':>8} {'bwd/pt':>8}  notes",
          file=file)
    print(f"{'clean':<20} {record['clean_acc']:>9.2%} {'':>7} {'':>9} {_per_point(record, 'clean', 'forward'):>8} "
          f"{_per_point(record, 'clean', 'backward'):>8}", file=file)
    for name, entry in record["attacks"].items():
        if name == "clean":
            continue
        notes = ""
        if "adbd" in entry:
            adbd, correct_only = entry["adbd"], entry.get("adbd_correct_only")
            notes = f"ADBD {adbd:.4f} (all points), " if adbd is not None else ""
            notes += f"{correct_only:.4f} (correct only), " if correct_only is not None else ""
            notes += f"queries {entry['queries_mean']:.0f} (mean)"
        elif entry.get("broken_by"):
            notes = ", ".join(f"{k} {v}" for k, v in entry["broken_by"].items())
        elif "by_std" in entry:  # invariance: not an eps-ball attack, not in the worst case
            notes = "noise std " + ", ".join(f"{std} {acc:.1%}" for std, acc in entry["by_std"].items())
            if "pairs" in entry:
                notes += f"; broken counts (image, draw) pairs of {entry['pairs']}"
        elif "transformations" in entry:
            notes = f"all of {entry['transformations']} rotations/translations (not in the worst case)"
        if entry.get("non_finite"):
            notes += f"{', ' if notes else ''}{entry['non_finite']} non-finite (counted as broken)"
        print(f"{name:<20} {entry['robust_acc']:>9.2%} {entry['broken']:>7} {entry['seconds']:>9.1f} "
              f"{_per_point(record, name, 'forward'):>8} {_per_point(record, name, 'backward'):>8}  {notes}", file=file)
    if record["robust_acc"] is not None:
        print(f"{'worst case':<20} {record['robust_acc']:>9.2%}", file=file)
    if "autoattack-fast" in record["attacks"]:
        print(AUTOATTACK_FAST_NOTE, file=file)
    cost = record.get("cost")
    if cost:
        print(f"cost: {cost['forward']:,} forward and {cost['backward']:,} backward passes of the model (rows), "
              f"{cost['seconds']:.1f} s ({cost['process_seconds']:.1f} s process) on {cost['device']}, "
              f"{cost['precision']}; fwd/pt, bwd/pt: passes per point attacked", file=file)
    for name, reason in record.get("skipped", {}).items():
        print(f"skipped {name}: {reason}", file=file)
    protocol = record.get("protocol")
    if protocol:
        info = record["model_info"]
        order = "the official test order" if protocol["official_order"] else "NOT the official test order"
        print(f"protocol {protocol['name']}: {protocol['points']} ({order}); clean_acc {info['clean_acc']}, "
              f"autoattack_acc {info['autoattack_acc']} ({info['autoattack_version']} AutoAttack), "
              f"{info['threat_model']} eps {info['eps']}", file=file)
    check = record.get("cross_check")
    if check:
        print(f"cross-check with the official AutoAttack on {check['points']} random points: {check['agree']} "
              f"agree per point (robust: fastrobust {check['fastrobust_robust']}, official "
              f"{check['official_robust']})" + (f"; differ at points {check['differ']}" if check["differ"] else ""),
              file=file)
    for flag in record.get("sanity", []):
        mark = "ok  " if flag["passed"] else "FAIL"
        print(f"sanity {mark} {flag['name']}: {flag['detail']}", file=file)
