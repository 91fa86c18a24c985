"""Sweeps: the cross product of a grid of training settings, run one after another, restartable.

A spec (YAML, parsed with ``yaml.safe_load``; nothing is evaluated)::

    description: what this sweep is for            # optional, free text
    preset: cifar10-resnet18-trades                 # optional: a shipped preset name or a YAML path
    base:                                           # optional: TrainConfig settings over the preset
      model: tinycnn
      epochs: 10
    methods:                                        # optional: method parameters per method name
      trades: {steps: 10, step_size: 2/255, beta: 6}
    grid:                                           # setting -> list of values; the runs are the cross product
      method: [natural, trades]
      seed: [0, 1, 2]
      method.beta: [1, 6]                           # a method parameter; model.NAME for a model keyword
    evaluate: [pgd100, autoattack-fast]             # optional: extra attacks on each run's best model
    # or, with settings:
    # evaluate: {attacks: [pgd100], eps: [4/255, 8/255], test_subset: 500, batch_size: 256,
    #            options: {autoattack-fast: {apgd-t: {n_targets: 3}}},
    #            hessian: {n: 64, per_epoch: true}}     # loss smoothness per epoch (needs save_epoch_models;
    #                                                   # per_epoch is true unless set, false: the best model only)

The evaluation's ``test_subset: N`` and the Hessian's ``n`` take the first N points of the run's test split
round-robin over its classes (``fastrobust.data.balanced_head``), class-balanced whatever the order of the
split's source (an official order is not exactly balanced). ``eval.json`` and ``hessian.json`` store that point set
(``points``); one stored with another point set, or without one (written before the points were
class-balanced), is evaluated again.

``grid`` may also be a list of such mappings: the runs are then the union of their cross products (for
example every method once, plus more seeds for some of them); a run planned twice with the same settings
runs once.

Method parameters of one run, later ones winning: ``base.method_params`` (only for runs of the base's
method, or for every run when the base names no method), then ``methods[METHOD]``, then ``method.PARAM``
grid values. The whole spec is validated (every run's TrainConfig built and checked) before any run starts.

``run_sweep(spec, out)`` runs every planned run in ``out/<name>`` where the name is made of the varied
values (``trades_seed-1``). A run whose ``result.json`` exists (and ``eval.json`` with every requested
attack and eps on the spec's point set, when the spec asks for evaluation) is skipped; one with a result
but not that evaluation is only evaluated; one with checkpoints but no result is
resumed from its newest checkpoint; a run folder whose saved config differs from the plan is an error
(the spec changed: use another ``--out``). ``out/sweep.json`` lists the runs and their status, rewritten
atomically after every change, so a crashed sweep is restarted by running the same command again. When the
first runs of a sweep all fail with the same error (a broken data loader, a typo in code the runs share),
the sweep stops after the second with that error instead of failing every run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from fastrobust.analysis.hessian import INITS, LOSSES, epoch_model_files, model_eigenvalues
from fastrobust.core.files import atomic_write_json
from fastrobust.core.values import check_eps, check_nonnegative_int, check_positive_int, parse_number, pixel_text
from fastrobust.data import balanced_head, load_dataset
from fastrobust.errors import ConfigError, FastRobustError, is_interrupt
from fastrobust.evaluate import ATTACKS, attack_settings, evaluate
from fastrobust.methods import method_class
from fastrobust.models.checkpoint import load_model
from fastrobust.train.presets import load_preset, make_config
from fastrobust.train.run_folder import without_legacy_eval_step
from fastrobust.train.trainer import TrainConfig, Trainer, TrainingStopped, resolve_device, resume

SPEC_KEYS = ("description", "preset", "base", "methods", "grid", "evaluate")
EVAL_KEYS = ("attacks", "eps", "test_subset", "batch_size", "options", "seed", "hessian")
HESSIAN_KEYS = ("n", "inits", "loss", "iterations", "gamma", "batch_size", "seed", "per_epoch")
SWEEP_FILE = "sweep.json"
EVAL_FILE = "eval.json"
HESSIAN_FILE = "hessian.json"


@dataclass
class HessianSpec:
    """Loss smoothness of each run (paper Fig. 3): the top input-Hessian eigenvalue of the inner-max loss at
    the attack's starting points, on ``n`` class-balanced test points (``points_key``), for ``best`` or (``per_epoch``) every
    per-epoch model the run kept (``save_epoch_models``). Written to ``RUN/hessian.json``."""

    n: int = 64
    inits: list[str] = field(default_factory=lambda: ["random", "backward_smoothing"])
    loss: str = "kl"
    iterations: int = 20
    gamma: float = 1.0
    batch_size: int = 128
    seed: int = 0
    per_epoch: bool = True


@dataclass
class EvalSpec:
    """Extra attacks run on each finished run's best model (through ``fastrobust.evaluate.evaluate``)."""

    attacks: list[str]
    eps: list[float | None] = field(default_factory=lambda: [None])  # None: the run's own attack eps
    test_subset: int | None = None  # N class-balanced points of the run's test split (None: all of it)
    batch_size: int = 256
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0
    hessian: HessianSpec | None = None


@dataclass
class SweepSpec:
    grid: dict[str, list[Any]] | list[dict[str, list[Any]]]
    base: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluate: EvalSpec | None = None
    description: str = ""
    source: str = "<spec>"

    @property
    def grids(self) -> list[dict[str, list[Any]]]:
        """The grid as a list of mappings (one mapping when ``grid`` is a single one)."""
        return self.grid if isinstance(self.grid, list) else [self.grid]


@dataclass
class PlannedRun:
    name: str
    varied: dict[str, Any]  # the grid values of this run, by grid key
    config: Any  # TrainConfig (validated, ``out`` set)


# ----------------------------------------------------------------------------------------- parsing
def load_spec(path_or_mapping: str | Path | dict[str, Any]) -> SweepSpec:
    """Read and check a sweep spec (a YAML path or an already-parsed mapping)."""
    if isinstance(path_or_mapping, dict):
        data, source = dict(path_or_mapping), "<spec>"
    else:
        path = Path(path_or_mapping)
        if not path.is_file():
            raise ConfigError(f"sweep spec {path} does not exist: give a YAML file (see sweeps/ for examples)")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            problem = str(error).replace("\n", " ")
            raise ConfigError(f"sweep spec {path} is not valid YAML: {problem}") from None
        source = str(path)
        if data is None:
            data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"sweep spec {source} must be a mapping with base:/preset:, grid: and evaluate:")
    unknown = set(data) - set(SPEC_KEYS)
    if unknown:
        raise ConfigError(f"sweep spec {source}: unknown key(s) {', '.join(sorted(map(str, unknown)))}: "
                          f"allowed keys are {', '.join(SPEC_KEYS)}")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"sweep spec {source}: base must be a mapping of TrainConfig settings")
    grid = data.get("grid") or {}
    grids = grid if isinstance(grid, list) else [grid]
    if not grids or not all(isinstance(g, dict) for g in grids):
        raise ConfigError(f"sweep spec {source}: grid must be a mapping of setting -> list of values, "
                          "or a list of such mappings")
    for one in grids:
        for key, values in one.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep spec {source}: grid.{key} must be a non-empty list, e.g. "
                                  f"{key}: {_grid_example(key, values)}")
            if any(isinstance(v, (dict, list)) for v in values) and key not in ("model_params", "method_params"):
                raise ConfigError(f"sweep spec {source}: grid.{key} values must be plain values, got {values!r}")
    methods = data.get("methods") or {}
    if not isinstance(methods, dict) or any(not isinstance(v, dict) for v in methods.values()):
        raise ConfigError(f"sweep spec {source}: methods must map a method name to a mapping of its parameters")
    preset = data.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"sweep spec {source}: preset must be a preset name or a YAML path")
    if not (data.get("preset") or base or any(grids)):
        raise ConfigError(f"sweep spec {source} sets nothing (no preset, base or grid): it would train one run of every "
                          "default (preactresnet18 on cifar10, 100 epochs); set e.g. grid: {method: [fast_at, "
                          "backward_smoothing]} and base: {model: ..., epochs: ...} (see sweeps/ for examples)")
    normalised = [{str(k): v for k, v in one.items()} for one in grids]
    return SweepSpec(grid=normalised if isinstance(grid, list) else normalised[0], base=dict(base), preset=preset,
                     methods={str(k): dict(v) for k, v in methods.items()},
                     evaluate=_prefixed(_parse_evaluate, data.get("evaluate"), source),
                     description=str(data.get("description") or ""), source=source)


# a real example per grid key for "must be a non-empty list" (other keys: the value given, in a list)
GRID_EXAMPLES = {"method": "[fast_at, backward_smoothing]", "seed": "[0, 1, 2]", "eps": "[4/255, 8/255]",
                 "model": "[tinycnn, preactresnet18]", "epochs": "[10, 30]", "lr": "[0.05, 0.1]"}


def _grid_example(key: str, values: Any) -> str:
    """A YAML list for grid.KEY: the given plain value in a list, else a real example for KEY."""
    if values is not None and not isinstance(values, (list, dict)):
        return f"[{values}]"
    return GRID_EXAMPLES.get(key, "[VALUE1, VALUE2]")


def _prefixed(parse: Callable[[Any, str], Any], value: Any, source: str) -> Any:
    """``parse(value, source)`` with "sweep spec SOURCE: " before a ConfigError that lacks it (the number checks
    shared with the CLI name only the setting)."""
    try:
        return parse(value, source)
    except ConfigError as error:
        if str(error).startswith("sweep spec "):
            raise
        raise ConfigError(f"sweep spec {source}: {error}") from None


def _parse_evaluate(value: Any, source: str) -> EvalSpec | None:

    if value is None or value == []:
        return None
    if isinstance(value, list):
        value = {"attacks": value}
    if not isinstance(value, dict):
        raise ConfigError(f"sweep spec {source}: evaluate must be a list of attacks or a mapping with attacks:")
    unknown = set(value) - set(EVAL_KEYS)
    if unknown:
        raise ConfigError(f"sweep spec {source}: evaluate has unknown key(s) {', '.join(sorted(unknown))}: "
                          f"allowed are {', '.join(EVAL_KEYS)}")
    hessian = _parse_hessian(value.get("hessian"), source)
    attacks = value.get("attacks", [] if hessian is not None else None)
    if not isinstance(attacks, list) or not (attacks or hessian) or not all(isinstance(a, str) for a in attacks):
        raise ConfigError(f"sweep spec {source}: evaluate.attacks must be a non-empty list of attack names")
    eps_values = value.get("eps")
    if eps_values is None:
        eps_list: list[float | None] = [None]
    else:
        eps_list = [check_eps(e, name="evaluate.eps") for e in (eps_values if isinstance(eps_values, list) else [eps_values])]
    test_subset = value.get("test_subset")
    if test_subset is not None:
        test_subset = check_positive_int(test_subset, name="evaluate.test_subset")
    options = value.get("options") or {}
    if not isinstance(options, dict) or any(not isinstance(v, dict) for v in options.values()):
        raise ConfigError(f"sweep spec {source}: evaluate.options must map an attack name to its settings")
    spec = EvalSpec(attacks=list(dict.fromkeys(attacks)), eps=eps_list, test_subset=test_subset,
                    batch_size=check_positive_int(value.get("batch_size", 256), name="evaluate.batch_size"),
                    options={str(k): dict(v) for k, v in options.items()},
                    seed=check_nonnegative_int(value.get("seed", 0), name="evaluate.seed"), hessian=hessian)
    for key in spec.options:
        if key not in spec.attacks:
            raise ConfigError(f"sweep spec {source}: evaluate.options names {key!r}, which is not among the attacks {spec.attacks}")
    for name in spec.attacks:
        if name not in ATTACKS:
            raise ConfigError(f"sweep spec {source}: evaluate attack {name!r} is unknown: choose from {', '.join(ATTACKS)}")
        attack_settings(name, 8 / 255, "linf", spec.options.get(name))
    return spec


def _parse_hessian(value: Any, source: str) -> HessianSpec | None:

    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"sweep spec {source}: evaluate.hessian must be true or a mapping with {', '.join(HESSIAN_KEYS)}")
    unknown = set(value) - set(HESSIAN_KEYS)
    if unknown:
        raise ConfigError(f"sweep spec {source}: evaluate.hessian has unknown key(s) {', '.join(sorted(map(str, unknown)))}: "
                          f"allowed are {', '.join(HESSIAN_KEYS)}")
    spec = HessianSpec()
    inits = value.get("inits", spec.inits)
    if not isinstance(inits, list) or not inits or any(i not in INITS for i in inits):
        raise ConfigError(f"sweep spec {source}: evaluate.hessian.inits={inits!r} must be a list of {', '.join(INITS)}")
    if value.get("loss", spec.loss) not in LOSSES:
        raise ConfigError(f"sweep spec {source}: evaluate.hessian.loss={value.get('loss')!r} is not one of {', '.join(LOSSES)}")
    per_epoch = value.get("per_epoch", spec.per_epoch)
    if not isinstance(per_epoch, bool):
        raise ConfigError(f"sweep spec {source}: evaluate.hessian.per_epoch={per_epoch!r} must be true or false")
    return HessianSpec(n=check_positive_int(value.get("n", spec.n), name="evaluate.hessian.n"), inits=list(inits),
                       loss=value.get("loss", spec.loss),
                       iterations=check_positive_int(value.get("iterations", spec.iterations), name="evaluate.hessian.iterations"),
                       gamma=float(parse_number(value.get("gamma", spec.gamma), name="evaluate.hessian.gamma")),
                       batch_size=check_positive_int(value.get("batch_size", spec.batch_size), name="evaluate.hessian.batch_size"),
                       seed=check_nonnegative_int(value.get("seed", spec.seed), name="evaluate.hessian.seed"),
                       per_epoch=per_epoch)


# ----------------------------------------------------------------------------------------- planning
def _value_text(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    text = text.replace("/", "of")
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def run_name(varied: dict[str, Any]) -> str:
    """A readable folder name from the varied values: ``trades_seed-1_beta-6``."""
    parts = []
    for key, value in varied.items():
        if key == "method":
            parts.append(_value_text(value))
        else:
            short = key.split(".", 1)[1] if key.startswith(("method.", "model.")) else key
            parts.append(f"{short}-{_value_text(value)}")
    return "_".join(parts) or "run"


def _settings_for(spec: SweepSpec, assignment: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    settings = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    base_method = base.get("method")
    for key, value in assignment.items():
        if not key.startswith(("method.", "model.")):
            settings[key] = value
    method = str(settings.get("method", "backward_smoothing"))
    params: dict[str, Any] = {}
    if base_method is None or str(base_method) == method:
        params.update(base.get("method_params") or {})
    params.update(spec.methods.get(method, {}))
    model_params = dict(settings.get("model_params") or {})
    for key, value in assignment.items():
        if key.startswith("method."):
            params[key[len("method."):]] = value
        elif key.startswith("model."):
            model_params[key[len("model."):]] = value
    settings["method_params"] = params
    if model_params:
        settings["model_params"] = model_params
    return settings


def plan_sweep(spec: SweepSpec, out: str | Path) -> list[PlannedRun]:
    """Every run of the spec with a validated TrainConfig; any bad value raises ConfigError (one line)."""

    out = Path(out)
    base: dict[str, Any] = load_preset(spec.preset) if spec.preset else {}
    for key, value in spec.base.items():
        if key in ("method_params", "model_params") and isinstance(value, dict):
            base[key] = {**(base.get(key) or {}), **value}
        else:
            base[key] = value
    if "out" in base or any("out" in grid for grid in spec.grids):
        raise ConfigError(f"sweep spec {spec.source}: 'out' cannot be set in a sweep: each run goes to --out DIR/<run name>")
    for key in (k for grid in spec.grids for k in grid):
        if "." in key and not key.startswith(("method.", "model.")):
            raise ConfigError(f"sweep spec {spec.source}: grid key {key!r} is not a setting, method.PARAM or model.PARAM")
    runs: list[PlannedRun] = []
    names: set[str] = set()
    planned: list[dict[str, Any]] = []  # the config of each run so far, to plan a repeated run once
    combos = [(grid, dict(zip(grid, combo))) for grid in spec.grids for combo in itertools.product(*grid.values())]
    values: dict[str, list[str]] = {}  # a key names the runs when it takes several values over all grids
    for grid in spec.grids:
        for key, options in grid.items():
            values.setdefault(key, [])
            values[key] += [json.dumps(v, sort_keys=True, default=str) for v in options if json.dumps(v, sort_keys=True, default=str) not in values[key]]
    for grid, assignment in combos:
        varied_keys = [k for k in grid if len(values[k]) > 1]
        settings = _settings_for(spec, assignment, base)
        varied = {k: assignment[k] for k in varied_keys}
        name = run_name(varied)
        if name in names:
            suffix = 2
            while f"{name}-{suffix}" in names:
                suffix += 1
            name = f"{name}-{suffix}"
        names.add(name)
        where = f"sweep spec {spec.source}, run {name}" if varied else f"sweep spec {spec.source}"
        try:
            config = make_config(settings)
            config.out = str(out / name)
            config.validate()
        except FastRobustError as error:
            raise ConfigError(f"{where}: {error}") from None
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{where}: {error}") from None
        same = _comparable(asdict(config))
        if same in planned:  # planned by an earlier grid with the same settings: run once
            names.discard(name)
            continue
        planned.append(same)
        hessian = spec.evaluate.hessian if spec.evaluate is not None else None
        if hessian is not None and hessian.per_epoch and not config.save_epoch_models:
            raise ConfigError(f"{where}: evaluate.hessian.per_epoch (true unless set) needs the per-epoch models: "
                              "set save_epoch_models: 1 in base (or per_epoch: false for the best model only)")
        runs.append(PlannedRun(name=name, varied=varied, config=config))
    for method in spec.methods:
        try:
            method_class(method)
        except FastRobustError as error:
            raise ConfigError(f"sweep spec {spec.source}: methods: {error}") from None
    return runs


# ----------------------------------------------------------------------------------------- state of a run
POINT_SELECTION = "balanced_head"


def points_key(count: int | None) -> dict[str, Any]:
    """The test points an evaluation ran on, as stored in eval.json and hessian.json: ``count`` points of the
    run's test split taken round-robin over its classes (``fastrobust.data.balanced_head``; None: all)."""
    return {"split": "test", "selection": POINT_SELECTION, "count": count}


def eval_points(dataset: Any, count: int | None) -> tuple[Any, Any]:
    """``count`` class-balanced points of ``dataset``'s test split (images, labels); see ``points_key``."""

    return balanced_head(dataset.test.images, dataset.test.labels, count)


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(json.dumps(config))
    data.pop("out", None)
    return data


def _check_same_config(run: PlannedRun, saved: dict[str, Any], where: Path) -> None:
    """Refuse a run folder made with other settings. A setting the saved config lacks (a TrainConfig field
    added since) counts as equal when the plan leaves it at its default; one only the saved config has
    (a field since removed) is ignored."""


    planned = _comparable(asdict(run.config))
    saved = _comparable(without_legacy_eval_step(saved))
    defaults = _comparable(asdict(TrainConfig()))
    diff = sorted(k for k in planned if (planned[k] != saved[k] if k in saved else planned[k] != defaults.get(k)))
    if diff:
        raise ConfigError(
            f"run folder {where} was made with other settings ({', '.join(diff)} differ from the spec): "
            "use another --out for a changed spec, or delete that folder"
        )


def _eval_done(run_dir: Path, eval_spec: EvalSpec | None, default_eps: float) -> bool:
    if eval_spec is None:
        return True
    if eval_spec.hessian is not None and not _hessian_done(run_dir, eval_spec.hessian):
        return False
    if not eval_spec.attacks:
        return True
    path = run_dir / EVAL_FILE
    if not path.is_file():
        return False
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    if stored.get("points") != points_key(eval_spec.test_subset):
        return False  # evaluated on other test points (or on a class-sorted prefix, before "points"): redo
    records = stored.get("evaluations", [])
    return all(_eval_done_for(records, default_eps if eps is None else eps, eval_spec.attacks) for eps in eval_spec.eps)


def run_state(run: PlannedRun, eval_spec: EvalSpec | None) -> str:
    """``done``, ``evaluate`` (trained, evaluation missing), ``resume`` (checkpoints, no result) or ``train``."""
    run_dir = Path(run.config.out)
    result = run_dir / "result.json"
    if result.is_file():
        try:
            saved = json.loads(result.read_text())
        except json.JSONDecodeError:
            saved = None
        if saved is not None:
            _check_same_config(run, saved.get("config", {}), run_dir)
            return "done" if _eval_done(run_dir, eval_spec, run.config.attack_eps) else "evaluate"
    config_file = run_dir / "config.json"
    if config_file.is_file():
        _check_same_config(run, json.loads(config_file.read_text()), run_dir)
    if any((folder / "state.json").is_file() for folder in (run_dir / "checkpoints").glob("step-*")):
        return "resume"
    return "train"


# ----------------------------------------------------------------------------------------- evaluation
def evaluate_run(run_dir: Path, config: Any, dataset: Any, eval_spec: EvalSpec, *, progress: bool = False,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the spec's attacks on ``run_dir``'s best model for every eps; writes and returns ``eval.json``
    (and ``hessian.json`` when the spec asks for the loss smoothness)."""

    if eval_spec.hessian is not None and not _hessian_done(run_dir, eval_spec.hessian):
        hessian_run(run_dir, config, dataset, eval_spec.hessian, log=log)
    if not eval_spec.attacks:
        return {}

    device = resolve_device(config.device)
    model, _ = load_model(run_dir / "best.safetensors", device=device)
    images, labels = eval_points(dataset, eval_spec.test_subset)
    points = points_key(eval_spec.test_subset)
    path = run_dir / EVAL_FILE
    stored = json.loads(path.read_text()) if path.is_file() else {}
    records = [r for r in stored.get("evaluations", [])] if stored.get("points") == points else []
    for eps in eval_spec.eps:
        eps = config.attack_eps if eps is None else eps
        if _eval_done_for(records, eps, eval_spec.attacks):
            continue
        state_dir = run_dir / "eval-state"
        state_dir.mkdir(exist_ok=True)
        state_file = state_dir / f"eps-{eps * 255:.4g}of255-balanced-n{len(labels)}-{'-'.join(eval_spec.attacks)}.json"
        log(f"{run_dir.name}: evaluating {', '.join(eval_spec.attacks)} at eps {pixel_text(eps)} on {len(labels)} "
            "class-balanced test points")
        record = evaluate(model, (images, labels), eval_spec.attacks, eps=eps, batch_size=eval_spec.batch_size,
                          device=device, state_file=state_file, progress=progress, seed=eval_spec.seed,
                          attack_options={k: v for k, v in eval_spec.options.items()})
        records = [r for r in records if abs(float(r.get("eps", -1)) - eps) >= 1e-9] + [record]
        atomic_write_json(path, {"model": "best.safetensors", "test_subset": eval_spec.test_subset, "points": points,
                                 "dataset": getattr(dataset, "name", config.dataset), "evaluations": records})
    return json.loads(path.read_text())


def _hessian_done(run_dir: Path, spec: HessianSpec) -> bool:
    try:
        stored = json.loads((run_dir / HESSIAN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return stored.get("settings") == asdict(spec) and stored.get("points") == points_key(spec.n)


def hessian_run(run_dir: Path, config: Any, dataset: Any, spec: HessianSpec, *,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Top input-Hessian eigenvalues of ``run_dir``'s models (per epoch, or best); writes ``hessian.json``.

    Model paths in the records are relative to the run folder."""

    device = resolve_device(config.device)
    if spec.per_epoch:
        files = epoch_model_files(run_dir)
        if not files:
            raise FastRobustError(f"{run_dir} kept no per-epoch models for evaluate.hessian.per_epoch "
                                  "(train with save_epoch_models: 1)")
    else:
        files = [("best", None, run_dir / "best.safetensors")]
    images, labels = eval_points(dataset, spec.n)
    log(f"{run_dir.name}: Hessian eigenvalues ({', '.join(spec.inits)}) of {len(files)} model(s) on {len(labels)} "
        "class-balanced test points")
    records = []
    for label, epoch, file in files:
        model = load_model(file, device=device)[0]
        values = model_eigenvalues(model, images, labels, eps=config.attack_eps, inits=spec.inits, loss=spec.loss,
                                   iterations=spec.iterations, gamma=spec.gamma, batch_size=spec.batch_size,
                                   seed=spec.seed, device=device)
        records.append({"label": label, "epoch": epoch, "model": str(file.relative_to(run_dir)), **values})
    record = {"settings": asdict(spec), "points": points_key(spec.n), "n": len(labels), "eps": config.attack_eps,
              "records": records}
    atomic_write_json(run_dir / HESSIAN_FILE, record)
    return record


def _eval_done_for(records: list[dict[str, Any]], eps: float, attacks: list[str]) -> bool:
    match = [r for r in records if abs(float(r.get("eps", -1)) - eps) < 1e-9]
    return bool(match) and all(any(a in r.get("attacks", {}) or a in r.get("skipped", {}) for r in match) for a in attacks)


# ----------------------------------------------------------------------------------------- running
def _data_key(config: Any) -> tuple:
    return (config.dataset, config.data_root, config.val_size, config.train_subset, config.test_subset)


def _default_loader(config: Any) -> Any:

    return load_dataset(config.dataset, config.data_root, val_size=config.val_size,
                        train_subset=config.train_subset, test_subset=config.test_subset)


def _is_signal_stop(error: BaseException) -> bool:
    text = str(error)
    return "received: stopped" in text or text.startswith("stopped after epoch")


class _SweepFile:
    """``DIR/sweep.json``: the plan and each run's status, rewritten atomically after every change."""

    def __init__(self, out: Path, spec: SweepSpec, runs: list[PlannedRun]) -> None:
        self.path = out / SWEEP_FILE
        self.data: dict[str, Any] = {
            "spec": spec.source, "description": spec.description,
            "grid": spec.grid, "evaluate": asdict(spec.evaluate) if spec.evaluate else None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "runs": [{"name": r.name, "varied": r.varied, "dir": r.name, "status": "pending"} for r in runs],
        }
        self.save()

    def set(self, index: int, **fields: Any) -> None:
        self.data["runs"][index].update(fields)
        self.save()

    def save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        counts: dict[str, int] = {}
        for run in self.data["runs"]:
            counts[run["status"]] = counts.get(run["status"], 0) + 1
        self.data["counts"] = counts
        atomic_write_json(self.path, json.loads(json.dumps(self.data, default=str)))


def run_sweep(spec: SweepSpec | str | Path | dict[str, Any], out: str | Path, *,
              dataset_loader: Callable[[Any], Any] | None = None, dry_run: bool = False,
              progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or with ``dry_run`` only plan) a sweep into ``out``; returns the content of ``sweep.json``.

    ``dataset_loader(config) -> fastrobust.data.Dataset`` replaces ``load_dataset`` (tests inject small
    synthetic data); datasets are loaded once per distinct (dataset, root, val_size, subsets).
    A run that fails is recorded as ``failed`` (with the error) and the sweep goes on, except when the first
    two runs started by this call fail with the same error: then it raises FastRobustError (one line) and
    leaves the other runs ``pending``. Ctrl-C or SIGTERM stops the sweep after saving the current run's
    checkpoint (status ``interrupted``).
    """

    if log is None:
        log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    if not isinstance(spec, SweepSpec):
        spec = load_spec(spec)
    out = Path(out)
    runs = plan_sweep(spec, out)
    states = [run_state(run, spec.evaluate) for run in runs]
    if dry_run:
        return {"spec": spec.source, "dry_run": True,
                "runs": [{"name": r.name, "varied": r.varied, "dir": r.name, "status": s,
                          "config": asdict(r.config)} for r, s in zip(runs, states)]}
    out.mkdir(parents=True, exist_ok=True)
    sweep_file = _SweepFile(out, spec, runs)
    for index, (run, state) in enumerate(zip(runs, states)):
        if state == "done":
            sweep_file.set(index, status="done", action="skipped", **_summary(Path(run.config.out)))
    loader = dataset_loader or _default_loader
    cache: dict[tuple, Any] = {}

    def data_for(config: Any) -> Any:
        key = _data_key(config)
        if key not in cache:
            cache.clear()  # keep one dataset in memory at a time
            cache[key] = loader(config)
        return cache[key]

    failures: list[str] | None = []  # the errors of the runs started by this call; None once one finishes

    def failed(index: int, message: str) -> None:
        sweep_file.set(index, status="failed", error=message)
        log(f"[{index + 1}/{len(runs)}] {runs[index].name}: failed: {message}")
        if failures is None:
            return
        failures.append(message)
        if len(failures) == 2 and failures[0] == failures[1]:
            sweep_file.data["stopped"] = f"the first two runs failed with the same error: {message}"
            sweep_file.save()
            raise FastRobustError(f"sweep stopped: its first two runs failed with the same error ({message}); the "
                                  f"other runs would too: fix it and run the same command again (see {sweep_file.path})")

    for index, (run, state) in enumerate(zip(runs, states)):
        if state == "done":
            log(f"[{index + 1}/{len(runs)}] {run.name}: done, skipped")
            continue
        run_dir = Path(run.config.out)
        action = {"train": "trained", "resume": "resumed", "evaluate": "evaluated"}[state]
        log(f"[{index + 1}/{len(runs)}] {run.name}: {'training' if state == 'train' else state + ' ...'}")
        sweep_file.set(index, status="running", action=action, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        try:
            dataset = data_for(run.config)
            if state == "train":
                if (run_dir / "metrics.jsonl").exists():  # records of a start that never reached a checkpoint
                    (run_dir / "metrics.jsonl").unlink()
                config = dataclasses.replace(run.config, method_params=dict(run.config.method_params),
                                             model_params=dict(run.config.model_params))
                Trainer(config, dataset=dataset, progress=progress, log=log).fit()
            elif state == "resume":
                resume(run_dir, dataset=dataset, progress=progress, log=log)
            if spec.evaluate is not None:
                evaluate_run(run_dir, run.config, dataset, spec.evaluate, progress=progress, log=log)
        except KeyboardInterrupt:
            sweep_file.set(index, status="interrupted", error="interrupted")
            raise
        except TrainingStopped as error:
            if _is_signal_stop(error):
                sweep_file.set(index, status="interrupted", error=str(error))
                raise
            failed(index, str(error))
            continue
        except Exception as error:  # one failed run must not lose the others
            if is_interrupt(error):  # an interrupt wrapped by torch.compile's build stops the sweep as Ctrl-C does
                sweep_file.set(index, status="interrupted", error="interrupted")
                raise
            failed(index, f"{type(error).__name__}: {error}" if not isinstance(error, FastRobustError) else str(error))
            continue
        failures = None  # a run finished: later failures are the runs' own
        sweep_file.set(index, status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **_summary(run_dir))
        log(f"[{index + 1}/{len(runs)}] {run.name}: done ({short_summary(run_dir)})")
    sweep_file.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    sweep_file.save()
    return sweep_file.data


def _summary(run_dir: Path) -> dict[str, Any]:
    try:
        result = json.loads((run_dir / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    test = result.get("test", {})
    summary = {"train_seconds": result.get("train_seconds"), "test": test, "error": None}
    path = run_dir / EVAL_FILE
    if path.is_file():
        try:
            summary["eval"] = {pixel_text(float(r["eps"])): {a: e.get("robust_acc") for a, e in r.get("attacks", {}).items()}
                               for r in json.loads(path.read_text()).get("evaluations", [])}
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return summary


def short_summary(run_dir: Path) -> str:
    """The result of a finished run in a few words, for its one ``done`` line (kept under ``--quiet``).

    Args:
        run_dir: the run folder (its ``result.json`` and, after the sweep's extra evaluation, ``eval.json``).

    Returns:
        test accuracies and training seconds, then ``eval at eps EPS: attack acc ...`` for every eps evaluated.
    """
    summary = _summary(run_dir)
    test = summary.get("test", {})
    parts = [f"{k} {v:.4f}" for k, v in test.items() if k.endswith("_acc") and isinstance(v, (int, float))]
    if summary.get("train_seconds") is not None:
        parts.append(f"{summary['train_seconds']:.0f}s")
    for eps, accuracies in (summary.get("eval") or {}).items():
        shown = [f"{name} {acc:.4f}" for name, acc in accuracies.items() if isinstance(acc, (int, float))]
        if shown:
            parts.append(f"eval at eps {eps}: {' '.join(shown)}")
    return ", ".join(parts)
