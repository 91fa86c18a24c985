"""``fastrobust train``: a preset, then explicit flags, then ``--set key=value`` overrides."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastrobust.core.values import check_positive_int, parse_number, pixel_text
from fastrobust.errors import ConfigError, FastRobustError

PRESET_TEXT_WIDTH = 110  # --list-presets wraps each description to this many characters

# flag -> TrainConfig field, for flags that map one to one
_FLAGS = {
    "method": "method", "model": "model", "dataset": "dataset", "data_root": "data_root", "epochs": "epochs",
    "batch_size": "batch_size", "lr": "lr", "schedule": "schedule", "eps": "eps", "train_subset": "train_subset",
    "test_subset": "test_subset", "val_size": "val_size", "seed": "seed", "out": "out", "activation": "activation",
    "device": "device", "amp": "amp", "attack_precision": "attack_precision", "on_nan": "on_nan", "on_collapse": "on_collapse",
    "checkpoint_every": "checkpoint_every", "channels_last": "channels_last",
    "checkpoint_every_epochs": "checkpoint_every_epochs", "validate_every": "validate_every",
    "validate_models": "validate_models",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a robust model and evaluate it",
        description="Train with any method; eps and step sizes accept fractions such as 8/255.",
    )
    parser.add_argument("--preset", help="a shipped preset name (see --list-presets) or a YAML file")
    parser.add_argument("--list-presets", action="store_true",
                        help="print the shipped presets, each with its full description (--json: as JSON) and exit")
    parser.add_argument("--method", help="training method (fastrobust methods lists them)")
    parser.add_argument("--model", help="model name (fastrobust models lists them)")
    parser.add_argument("--activation", help="activation for every ReLU of the model (SAT: silu, gelu, ...)")
    parser.add_argument("--dataset", help="cifar10, cifar100, svhn, mnist, tiny-imagenet or imagefolder")
    parser.add_argument("--data-root",
                        help="folder holding the dataset files (default: $FASTROBUST_DATA, else "
                             "~/.cache/fastrobust/data, where a missing dataset is downloaded once)")
    parser.add_argument("--epochs", type=str)
    parser.add_argument("--batch-size", type=str)
    parser.add_argument("--lr", type=str)
    parser.add_argument("--schedule", help="piecewise, cyclic, cosine or constant")
    parser.add_argument("--eps", help="perturbation size in [0,1] pixel units, e.g. 8/255")
    parser.add_argument("--train-subset", type=str, help="train on N images (class-balanced)")
    parser.add_argument("--test-subset", type=str, help="evaluate on N test images (class-balanced)")
    parser.add_argument("--val-size", type=str, help="validation images carved from the train split (default 1000)")
    parser.add_argument("--seed", type=str)
    parser.add_argument("--out", help="run folder (default runs/METHOD-MODEL-DATASET-TIME)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", help="auto, off, bf16 or fp16")
    parser.add_argument("--attack-precision", help="auto, fp32, bf16 or fp16: the precision of the attack inside "
                        "each training step, apart from --amp (docs/training.md)")
    parser.add_argument("--channels-last", help="auto, on or off")
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    parser.add_argument("--deterministic", action="store_true", default=None,
                        help="deterministic kernels only (on CUDA needed for a bit-identical resume or repeat; slower; "
                             "docs/reliability.md)")
    parser.add_argument("--on-nan", help="stop or rollback when the loss becomes NaN/Inf")
    parser.add_argument("--on-collapse", help="warn, stop or restore on catastrophic overfitting (fast_at_plus "
                        "always restores and uses its own method.collapse_margin; the run says so)")
    parser.add_argument("--checkpoint-every", type=str, help="also checkpoint every N steps inside an epoch")
    parser.add_argument("--checkpoint-every-epochs", type=str, metavar="N",
                        help="write the epoch-end checkpoint and last/averaged weights after every N-th epoch and the "
                             "last (default 1)")
    parser.add_argument("--validate-every", type=str, metavar="N",
                        help="validate after every N-th epoch and the last (default 1); best is chosen among those")
    parser.add_argument("--validate-models", help="with weight averaging, the models validated: both (default), "
                        "trained or averaged")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any setting, or method.PARAM=VALUE / model.PARAM=VALUE (repeatable)")
    parser.add_argument("--resume", metavar="RUN",
                        help="continue the run in this folder with its own settings (only --epochs, --device and "
                             "--data-root apply)")
    parser.add_argument("--plan", action="store_true",
                        help="print the device, precision, compile setting, the method's declared cost and an estimated "
                             "time per epoch and in total on this machine (a few timed steps), then exit: no run "
                             "folder is made and no data is read")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    parser.add_argument("--json", action="store_true", help="print the result record as JSON")
    parser.add_argument("--nproc", type=str, default=None, metavar="N",
                        help="train on N processes of this machine: re-runs this command under torchrun "
                             "(batch size stays the global batch; see docs/distributed.md)")
    parser.set_defaults(func=run)


def collect_settings(args: argparse.Namespace) -> dict[str, Any]:
    from fastrobust.train.presets import load_preset, parse_assignments  # startup

    settings: dict[str, Any] = load_preset(args.preset) if args.preset else {}
    for flag, name in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            settings[name] = value
    for flag in ("compile", "deterministic"):  # store_true flags: given means true
        if getattr(args, flag, None):
            settings[flag] = True
    extra = parse_assignments(args.set)
    given = {key: dict(extra.get(key, {})) for key in ("method_params", "schedule_params")}
    for key in ("method_params", "model_params", "schedule_params"):
        if key in extra:
            settings[key] = {**settings.get(key, {}), **extra.pop(key)}
    settings.update(extra)
    preset = load_preset(args.preset) if args.preset else {}
    for flag, key in (("method", "method_params"), ("schedule", "schedule_params")):
        # a method (schedule) chosen on the command line does not inherit the preset's parameters of another one
        chosen = getattr(args, flag, None)
        if chosen and key in settings and preset.get(flag) != chosen:
            settings[key] = given[key]
    return settings


def list_presets(as_json: bool) -> None:
    """Each shipped preset with its full description, wrapped under its name (``as_json``: a JSON object)."""
    from fastrobust.train.presets import preset_descriptions  # startup

    described = preset_descriptions()
    if as_json:
        print(json.dumps(described, indent=2, sort_keys=True))
        return
    for name, text in described.items():
        print(name)
        print(textwrap.fill(text, width=PRESET_TEXT_WIDTH, initial_indent="    ", subsequent_indent="    ",
                            break_on_hyphens=False))
    print("(use one with --preset NAME; --list-presets --json prints the same as JSON)")


def check_resume_flags(args: argparse.Namespace) -> None:
    """With --resume: ConfigError naming every setting that the other flags (a preset, flags, --set) would
    change, stored vs given. --epochs, --device and --data-root apply to a resumed run (train.RESUME_OVERRIDES);
    flags that repeat the stored value are accepted."""

    from fastrobust.train import RESUME_OVERRIDES, TrainConfig, read_run_config  # startup

    given = collect_settings(args)
    for key in RESUME_OVERRIDES:
        given.pop(key, None)
    out = given.pop("out", None)
    differ = []
    if out is not None and Path(out).resolve() != Path(args.resume).resolve():
        differ.append(f"out (stored {args.resume}, given {out})")
    if given:
        stored = {**asdict(TrainConfig()), **read_run_config(args.resume)}
        wanted = asdict(_typed_config({**{key: stored[key] for key in ("method", "model", "dataset")}, **given})
                        .validate())
        differ += [f"{key} (stored {_shown(stored.get(key))}, given {_shown(wanted[key])})" for key in sorted(given)
                   if wanted[key] != stored.get(key)]
    if differ:
        raise ConfigError(f"--resume {args.resume} continues the run with its stored settings, and the flags given "
                          f"would change {'; '.join(differ)}: leave them out (only --epochs, --device and "
                          "--data-root apply to a resumed run), or start a new run with a new --out")


def _shown(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else repr(value)


def run(args: argparse.Namespace) -> int:
    if args.list_presets:
        list_presets(args.json)
        return 0
    if args.resume:
        check_resume_flags(args)
    if args.nproc is not None:
        from fastrobust.core.distributed import relaunch  # startup

        return relaunch(check_positive_int(args.nproc, name="--nproc"), command_line("train"))
    from fastrobust.core import distributed as dist_lib  # startup

    try:
        return _train(args)
    except FastRobustError as error:
        if dist_lib.is_initialized() and not dist_lib.context().is_main:  # which rank says it
            raise FastRobustError(f"rank {dist_lib.context().rank}: {error}") from None
        raise
    except Exception as error:  # a collective failed: another rank died; say so in one line
        if dist_lib.is_initialized() and dist_lib.is_collective_failure(error):
            out = getattr(args, "resume", None) or _out_of(args)
            raise FastRobustError(dist_lib.failure_message(error, dist_lib.context(), out)) from None
        raise
    finally:
        dist_lib.shutdown()


def command_line(command: str) -> list[str]:
    """This process's ``fastrobust`` arguments (``COMMAND ...``), for re-running them under torchrun."""
    argv = list(sys.argv[1:])
    if command not in argv:
        raise ConfigError(f"--nproc works from the command line only (fastrobust {command} ... --nproc N)")
    return argv


def _out_of(args: argparse.Namespace) -> str | None:
    try:
        return collect_settings(args).get("out")
    except Exception:  # only for the message
        return None


def _train(args: argparse.Namespace) -> int:
    from fastrobust.core import distributed as dist_lib  # startup
    from fastrobust.train import Trainer, describe_best, resume  # startup
    from fastrobust.train.plan import CPU_PRESETS, duration, gpu_preset_on_cpu, probe  # startup
    from fastrobust.train.trainer import check_new_run_folder  # startup

    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))
    if args.resume:
        overrides = {}
        if args.epochs is not None:
            overrides["epochs"] = check_positive_int(args.epochs, name="epochs")
        if args.device is not None:
            overrides["device"] = args.device
        if args.data_root is not None:
            overrides["data_root"] = args.data_root
        result = resume(args.resume, progress=not args.quiet, log=log, overrides=overrides)
        expectation = None  # a resumed run keeps its own config
    else:
        settings = collect_settings(args)
        config = _typed_config(settings)
        # read now, not after the run: a bad expected: block is refused before any work, and a preset file
        # edited during the run does not change what the run is compared with
        expectation = _expectation(args.preset, config) if args.preset else None
        if args.plan:
            print("\n".join(probe(config, log=_say).lines()))
            return 0
        if gpu_preset_on_cpu(config, args.preset) and dist_lib.context().is_main:
            check_new_run_folder(config)  # the refusals that need no probe come before its minutes
            plan = probe(config, warmup=1, steps=1, log=_say)
            print(f"fastrobust train: warning: preset {args.preset!r} is sized for a GPU ({config.model}, "
                  f"{config.epochs} epochs on the whole training set) and this run is on the CPU: about "
                  f"{duration(plan.total_seconds)} here. For a CPU use --preset {CPU_PRESETS}; --plan prints "
                  "this estimate without starting", file=sys.stderr)
        trainer = Trainer(config, progress=not args.quiet, log=log)
        ranks = f" on {trainer.dist.world_size} ranks" if trainer.dist.active else ""
        trainer.log(f"training {config.method} on {config.model} / {config.dataset}{ranks} -> {trainer.out}")
        result = trainer.fit()
    if not dist_lib.context().is_main:  # rank 0 prints the result
        return 0
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        test = result["test"]
        robust_key = next(key for key in test if key.startswith("pgd"))
        print(
            f"{result['config']['method']}: test clean {test['clean_acc']:.4f}, {robust_key[:-4].upper()} "
            f"{test[robust_key]:.4f} (n={test['n']}, eps={pixel_text(test['eps'])}); {describe_best(result)}; "
            f"trained {result['train_seconds']:.1f}s; run in {result['config']['out']}"
        )
        if expectation is not None:  # a new run of a preset
            print(_against_expected(args.preset, *expectation, test))
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _typed_config(settings: dict[str, Any]) -> Any:
    """``make_config`` with ``eps`` parsed (text such as ``8/255``)."""
    from fastrobust.train.presets import make_config  # startup

    config = make_config(settings)
    if config.eps is not None:
        config.eps = parse_number(config.eps, name="eps")
    return config


def _expectation(preset: str, config: Any) -> tuple[Any, list[str]]:
    """The result ``preset`` declares (None when it declares none) and the settings this run's ``config`` changes
    from the preset's, both as typed TrainConfig values (``--epochs 5`` repeats a preset's ``epochs: 5``)."""
    from fastrobust.train.expected import changed_settings  # startup
    from fastrobust.train.presets import load_preset, preset_expected  # startup

    expected = preset_expected(preset)
    if expected is None:
        return None, []
    return expected, changed_settings(asdict(config), asdict(_typed_config(load_preset(preset))))


def _against_expected(preset: str, expected: Any, changed: list[str], test: dict[str, Any]) -> str:
    """How a finished run of a preset compares with the result the preset declares (docs/results.md)."""
    from fastrobust.train.expected import compare  # startup

    if expected is None:
        return (f"preset {preset} has no fastrobust measurement yet: docs/results.md says what its paper "
                "reports")
    if changed:
        return (f"preset {preset}'s expected result is for its own settings, and this run changed "
                f"{', '.join(changed)}: no comparison")
    return compare(test, expected, preset)
