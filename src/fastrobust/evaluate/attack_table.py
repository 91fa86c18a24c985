"""The attacks ``evaluate`` knows by name, in one table: for each, its default settings, how it runs on a batch of
correctly classified points, the settings it actually ran with, and what its record adds.

A new named attack is one ``NamedAttack`` entry here; nothing else in the evaluation knows attacks by name. The
invariance evaluations (``gaussian-noise``, ``spatial``; ``fastrobust.evaluate.invariance``) are named too but are
not eps-ball attacks: they are not part of the worst case and have their own table there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastrobust.attacks import (
    apgd_ce,
    apgd_t,
    autoattack,
    autoattack_official,
    fab_t,
    fgsm,
    pgd,
    rays,
    square,
)
from fastrobust.attacks.apgd import targeted_settings_used
from fastrobust.attacks.autoattack import DEFAULTS, VERSIONS, version_settings
from fastrobust.attacks.official import OFFICIAL_VERSIONS, official_plan
from fastrobust.attacks.pgd import default_step
from fastrobust.attacks.rays import official_tol
from fastrobust.core.attack_options import check_options
from fastrobust.errors import ConfigError
from fastrobust.evaluate.invariance import EVALUATIONS as INVARIANCE

AUTOATTACK_EXECUTION = ("precision", "channels_last", "compile")  # accepted in attack_options["autoattack"]: how it runs
PerPoint = Callable[[str], list]  # the per-point values of one extra (None where a batch has none), in point order


# ----------------------------------------------------------------------------------------- running on a batch
# Each runner: (settings, model, x, y, eps, norm, generator, seed, max_rows) -> (x_adv, per-example extras)

def _fgsm(s, model, x, y, eps, norm, generator, seed, max_rows):
    return fgsm(model, x, y, eps=eps, norm=norm, generator=generator, **s), {}


def _pgd(s, model, x, y, eps, norm, generator, seed, max_rows):
    return pgd(model, x, y, eps=eps, norm=norm, generator=generator, **s), {}


def _calling(attack: Callable[..., Tensor]):
    def run(s, model, x, y, eps, norm, generator, seed, max_rows):
        return attack(model, x, y, eps=eps, norm=norm, generator=generator, **s), {}
    return run


def _square(s, model, x, y, eps, norm, generator, seed, max_rows):
    x_adv, queries = square(model, x, y, eps=eps, norm=norm, generator=generator, return_queries=True, **s)
    return x_adv, {"queries": queries.tolist()}


def _autoattack(s, model, x, y, eps, norm, generator, seed, max_rows):
    result = autoattack(model, x, y, eps=eps, norm=norm, version=s["version"], options=s["options"],
                        generator=generator, return_details=True, max_rows=max_rows,
                        **{k: s[k] for k in AUTOATTACK_EXECUTION if k in s})
    return result.x_adv, {"broken_by": result.broken_by}


def _rays(s, model, x, y, eps, norm, generator, seed, max_rows):
    result = rays(model, x, y, eps=eps, norm=norm, **s)
    return result.within(x, eps), {
        "distance": [None if d == float("inf") else d for d in result.distance.tolist()],
        "distance_official": result.official_distance(x).tolist(),
        "queries": result.queries.tolist(),
    }


def _official(s, model, x, y, eps, norm, generator, seed, max_rows):
    return autoattack_official(model, x, y, eps=eps, norm=norm, seed=seed, **s), {}


# ----------------------------------------------------------------------------------------- what the record adds
def _square_summary(settings: dict, per_point: PerPoint, clean: list[bool], n: int) -> dict[str, Any]:
    queries = [q for q in per_point("queries") if q is not None]
    return {"queries_mean": sum(queries) / len(queries) if queries else 0.0}


def _rays_summary(settings: dict, per_point: PerPoint, clean: list[bool], n: int) -> dict[str, Any]:
    dists = [d for d, c in zip(per_point("distance"), clean) if c]
    official = [d for d, c in zip(per_point("distance_official"), clean) if c]
    queries = [q for q in per_point("queries") if q is not None]
    found = [d for d in dists if d is not None]
    return {
        "adbd": sum(official) / n if n else None,  # the RayS leaderboard's: over all n points
        "adbd_correct_only": sum(found) / len(found) if found else None,
        "no_boundary_found": len(dists) - len(found),
        "queries_mean": sum(queries) / len(queries) if queries else 0.0,
        "queries_median": float(sorted(queries)[len(queries) // 2]) if queries else 0.0,
    }


def _autoattack_summary(settings: dict, per_point: PerPoint, clean: list[bool], n: int) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for who in per_point("broken_by"):
        if who is not None and who != "clean":
            counts[who] = counts.get(who, 0) + 1
    order = [who for who in settings["options"] if who in counts]  # the order the components ran
    out: dict[str, Any] = {"broken_by": {who: counts[who] for who in order + sorted(set(counts) - set(order))}}
    eot = eot_samples_of(settings)
    if eot > 1:  # the rand version: gradients averaged per step
        out["eot_samples"] = eot
    return out


def eot_samples_of(settings: dict[str, Any]) -> int:
    """The most gradients per step (``eot_iter``, EOT) an attack's settings average: 1 without EOT."""
    values = [settings.get("eot_iter", 1)]
    values += [component.get("eot_iter", 1) for component in (settings.get("options") or {}).values()
               if isinstance(component, dict)]
    return max(values)


# ----------------------------------------------------------------------------------------- settings actually used
def _targeted_used(name: str):
    return lambda used, num_classes, dim: targeted_settings_used(name, used, num_classes)


def _autoattack_used(used: dict, num_classes: int, dim: int) -> dict:
    used["options"] = {key: settings_used(key, value, num_classes, dim) for key, value in used["options"].items()}
    return used


def _official_used(used: dict, num_classes: int, dim: int) -> dict:
    """The official AutoAttack runs with at most C - 1 targets and without the components its code cannot run on
    C classes (``official_plan``)."""
    used.update(official_plan(list(OFFICIAL_VERSIONS.get(used.get("version"), ())), num_classes))
    return used


def _rays_used(used: dict, num_classes: int, dim: int) -> dict:
    if used.get("tol") is None:
        used["tol"] = official_tol(dim)
    return used


def _pgd_defaults(steps: int, loss: str) -> Callable[[float], dict]:
    # step_size None: default_step for the steps that run (filled in by attack_settings)
    return lambda eps: {"steps": steps, "step_size": None, "random_init": False, "loss": loss, "restarts": 1,
                        "stop_at_fooled": True}


def _autoattack_defaults(version: str) -> Callable[[float], dict]:
    return lambda eps: {"version": version, "options": {k: version_settings(version, k) for k in VERSIONS[version]}}


def _autoattack_for_norm(settings: dict, norm: str) -> dict:
    """AutoAttack's component settings for the threat model (l_1: 5 restarts, 5 targets, the large-eps start)."""
    settings["options"] = {k: version_settings(settings["version"], k, norm) for k in settings["options"]}
    return settings


@dataclass(frozen=True)
class NamedAttack:
    """One attack ``evaluate`` runs by name.

    ``defaults(eps)``: its settings before the user's options. ``run``: adversarials (and per-example extras) for a
    batch of correctly classified points. ``used(settings, num_classes, dim)``: the settings it actually ran with on
    a model of that many classes and images of ``dim`` values (targets capped at C - 1, ...). ``summary``: what
    its record entry adds from the per-point extras. ``gradient_free``: runs inside ``torch.inference_mode()``
    too. ``extra_settings``: settings accepted besides the defaults' keys. ``components``: its settings hold
    per-component options (AutoAttack)."""

    defaults: Callable[[float], dict[str, Any]]
    run: Callable[..., tuple[Tensor, dict[str, list]]] | None
    used: Callable[[dict, int, int], dict] | None = None
    summary: Callable[[dict, PerPoint, list, int], dict[str, Any]] | None = None
    gradient_free: bool = False
    extra_settings: tuple[str, ...] = ()
    components: bool = False
    linf_only: bool = False
    l1: bool = False  # runs in l_1 too
    for_norm: Callable[[dict, str], dict] | None = None  # its defaults for a threat model, from the l_inf ones
    queries: Callable[[int], dict[str, Any]] | None = None  # its settings for a query budget (--queries)


TABLE: dict[str, NamedAttack] = {
    "clean": NamedAttack(lambda eps: {}, None, gradient_free=True),
    "fgsm": NamedAttack(lambda eps: {"step_size": eps, "random_init": False}, _fgsm),
    "pgd20": NamedAttack(_pgd_defaults(20, "ce"), _pgd),
    "pgd100": NamedAttack(_pgd_defaults(100, "ce"), _pgd),
    "cw20": NamedAttack(_pgd_defaults(20, "cw"), _pgd),
    "apgd-ce": NamedAttack(lambda eps: dict(DEFAULTS["apgd-ce"]), _calling(apgd_ce), l1=True),
    "apgd-t": NamedAttack(lambda eps: dict(DEFAULTS["apgd-t"]), _calling(apgd_t), used=_targeted_used("apgd-t"),
                          l1=True),
    "fab-t": NamedAttack(lambda eps: dict(DEFAULTS["fab-t"]), _calling(fab_t), used=_targeted_used("fab-t"),
                         l1=True),
    "square": NamedAttack(lambda eps: dict(DEFAULTS["square"]), _square, summary=_square_summary,
                          gradient_free=True, queries=lambda n: {"n_queries": n}, l1=True),
    # l_1: the official standard l_1 version (APGD with 5 restarts, 5 targets, large-eps start; FAB-T; Square)
    "autoattack": NamedAttack(_autoattack_defaults("standard"), _autoattack, used=_autoattack_used,
                              summary=_autoattack_summary, extra_settings=AUTOATTACK_EXECUTION, components=True,
                              queries=lambda n: {"square": {"n_queries": n}}, l1=True, for_norm=_autoattack_for_norm),
    # l_1: the standard version's APGD-CE and APGD-T (5 restarts, 5 targets, large-eps start)
    "autoattack-fast": NamedAttack(_autoattack_defaults("fast"), _autoattack, used=_autoattack_used,
                                   summary=_autoattack_summary, extra_settings=AUTOATTACK_EXECUTION,
                                   components=True, l1=True, for_norm=_autoattack_for_norm),
    # the official's plus and rand versions (rand: for randomized models, 20 gradients per step)
    "autoattack-plus": NamedAttack(_autoattack_defaults("plus"), _autoattack, used=_autoattack_used,
                                   summary=_autoattack_summary, extra_settings=AUTOATTACK_EXECUTION,
                                   components=True, queries=lambda n: {"square": {"n_queries": n}}),
    "autoattack-rand": NamedAttack(_autoattack_defaults("rand"), _autoattack, used=_autoattack_used,
                                   summary=_autoattack_summary, extra_settings=AUTOATTACK_EXECUTION,
                                   components=True, l1=True),
    # tol None: the authors' 1e-3/sqrt(d)
    "rays": NamedAttack(lambda eps: {"n_queries": 10000, "tol": None, "early_stop": False}, _rays, used=_rays_used,
                        summary=_rays_summary, gradient_free=True, linf_only=True, queries=lambda n: {"n_queries": n}),
    "autoattack-official": NamedAttack(lambda eps: {"version": "standard"}, _official, used=_official_used),
}
ATTACKS = tuple(TABLE) + tuple(INVARIANCE)
GRADIENT_FREE = tuple(name for name, entry in TABLE.items() if entry.gradient_free) + tuple(INVARIANCE)


def attack_settings(name: str, eps: float, norm: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings attack ``name`` runs with in ``evaluate``: its defaults updated by ``options``, every value
    checked (``core.attack_options``) before any work.

    Raises:
        ConfigError: an unknown attack, an unknown setting, or a bad value (one line naming it and the fix).
    """
    if name not in ATTACKS:
        raise ConfigError(f"attack {name!r} is unknown: choose from {', '.join(ATTACKS)}")
    if name in INVARIANCE:
        return INVARIANCE[name].settings(options)
    entry = TABLE[name]
    base = entry.defaults(eps)
    if entry.for_norm is not None:
        base = entry.for_norm(base, norm)
    options = dict(options or {})
    if entry.components and options:
        merged = {k: dict(v) for k, v in base["options"].items()}
        nested = options.pop("options", None) or {}
        if not isinstance(nested, dict) or not all(isinstance(v, dict) for v in nested.values()):
            raise ConfigError(f"attack {name!r}: options={nested!r} must map components to dicts of settings, e.g. "
                              "{'square': {'n_queries': 1000}}")
        for key, value in nested.items():
            merged.setdefault(key, {}).update(value)
        for key in list(options):  # component options given directly: {"square": {...}}
            if isinstance(options[key], dict):
                merged.setdefault(key, {}).update(options.pop(key))
        base["options"] = merged
    unknown = set(options) - set(base) - set(entry.extra_settings)
    if unknown and name != "clean":
        raise ConfigError(f"attack {name!r} has no setting(s) {sorted(unknown)}: its settings are {sorted(base)}")
    base.update(options)
    return _checked(name, base, eps, norm)


def _checked(name: str, settings: dict[str, Any], eps: float, norm: str) -> dict[str, Any]:
    """The settings with every value checked and normalised, so that the record shows what runs; an attack named
    for its steps (pgd20, cw20) must take at least one, and its step size defaults (also when given as None) to
    ``default_step`` for the number of steps it runs."""
    where = f"attack {name!r}"
    # with no step a PGD attack's robust accuracy would be the clean accuracy, under the attack's name
    settings = check_options(where, settings, norm=norm, minimums={"steps": 1})
    if TABLE[name].run is _pgd and settings.get("step_size") is None:
        settings["step_size"] = default_step(eps, settings["steps"], norm)
    elif name == "fgsm" and settings.get("step_size") is None:
        settings["step_size"] = eps
    if isinstance(settings.get("options"), dict):  # AutoAttack's components
        settings["options"] = {key: check_options(f"{where} ({key})", value, norm=norm)
                               for key, value in settings["options"].items()}
    return settings


def query_budget(name: str, queries: int) -> dict[str, Any] | None:
    """Attack ``name``'s settings for a query budget of ``queries`` (``fastrobust eval --queries``); None for an
    attack that has no query budget."""
    entry = TABLE.get(name)
    return entry.queries(queries) if entry is not None and entry.queries is not None else None


def run_attack(name: str, settings: dict[str, Any], model: nn.Module, x: Tensor, y: Tensor, *, eps: float,
               norm: str, generator: torch.Generator | None, seed: int,
               max_rows: int | None = None) -> tuple[Tensor, dict[str, list]]:
    """Adversarials for the batch (all correctly classified) and per-example extras. ``max_rows``: the
    evaluation's batch size, the most rows AutoAttack's components attack at once."""
    x_adv, extras = TABLE[name].run(settings, model, x, y, eps, norm, generator, seed, max_rows)
    return x_adv.detach(), extras


def settings_used(name: str, settings: dict[str, Any], num_classes: int, dim: int) -> dict[str, Any]:
    """The settings an attack actually ran with on a model of ``num_classes`` outputs and images of ``dim``
    values: targeted attacks use at most C - 1 targets, APGD-T's DLR loss needs 4 classes, RayS's default
    tolerance is the authors' 1e-3/sqrt(d); the official AutoAttack runs with at most C - 1 targets and without
    the components its code cannot run on C classes."""
    used = jsonable(settings)
    entry = TABLE.get(name)
    return entry.used(used, num_classes, dim) if entry is not None and entry.used is not None else used


def summary(name: str, settings: dict[str, Any], per_point: PerPoint, clean: list[bool], n: int) -> dict[str, Any]:
    """What attack ``name``'s record entry adds to the robust counts (queries, ADBD, which component broke what)."""
    entry = TABLE[name]
    return entry.summary(settings, per_point, clean, n) if entry.summary is not None else {}


def jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples as lists, ...), for comparing with a state file."""
    return json.loads(json.dumps(obj))
