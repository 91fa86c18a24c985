"""The authors' AutoAttack, for cross-checks and benchmarks only (fastrobust never needs it).

The official attack code is importable as ``pyautoattack`` (the package index, ``pip install pyautoattack``
or ``pip install "fastrobust[reference]"``: the authors' ``autopgd_base.py``, ``fab_*.py`` and ``square.py``
with a refactored wrapper) or as ``autoattack`` (``pip install git+https://github.com/fra31/auto-attack``).
Both are supported; ``pyautoattack`` is preferred. Nothing of that code is copied here: these functions only
call it.

``run_official`` runs the official AutoAttack (or some of its attacks) on a batch. ``official_apgd_flags`` and
``official_fab_t_flags`` run one official component *started at the clean point* (no random start), on one
target class, so that fastrobust's components can be compared with it point by point.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from importlib.metadata import version as dist_version
from types import ModuleType
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from fastrobust.attacks.toolkit import model_mode
from fastrobust.errors import FastRobustError

PACKAGES = ("pyautoattack", "autoattack")
NORM_NAMES = {"linf": "Linf", "l2": "L2", "l1": "L1"}
OFFICIAL_MISSING = (
    "the official AutoAttack is not importable: install it with `pip install pyautoattack` "
    "(or `pip install 'fastrobust[reference]'`), or use attack 'autoattack'"
)


def official_package() -> ModuleType | None:
    """The importable official package (``pyautoattack`` first, then ``autoattack``), else None."""
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "AutoAttack"):
            return module
    return None


def official_available() -> bool:
    return official_package() is not None


def official_version() -> str | None:
    """``"pyautoattack 0.2.0"`` (package name and version), or None when not installed."""
    module = official_package()
    if module is None:
        return None
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = dist_version(module.__name__)
        except Exception:  # the GitHub package may carry no metadata
            version = "unknown"
    return f"{module.__name__} {version}"


def _require() -> ModuleType:
    module = official_package()
    if module is None:
        raise FastRobustError(OFFICIAL_MISSING)
    return module


def _component(name: str) -> ModuleType:
    return importlib.import_module(f"{_require().__name__}.{name}")


@contextlib.contextmanager
def _parameter_grads_kept(model: nn.Module) -> Iterator[None]:
    """The official FAB calls ``backward()``, which accumulates into parameter gradients: put them back."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    try:
        yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g


class InputPath(nn.Module):
    """``model(x)`` plus an exact zero computed from ``x``, so that the official code's ``torch.autograd.grad``
    (without ``allow_unused``) sees a zero input gradient, as fastrobust's attacks do (``fastrobust.core.gradients``),
    instead of raising on a model whose logits have no autograd path to the input (bit-depth reduction, a
    detach). The logits are the model's (x is finite); every other model's gradient is unchanged."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return out + (x.flatten(1)[:, :1] * 0).to(out.dtype)


def _for_official(model: nn.Module, x: Tensor | None) -> nn.Module:
    """``InputPath(model)`` when the model's logits have no autograd path to its input (probed on the batch
    ``x``: one forward and backward, against the reference's hundreds), else the model itself: the reference
    runs on exactly the user's model whenever it can."""
    if x is None or len(x) == 0:
        return model
    probe = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), model_mode(model, training=False):
        out = model(probe)
        connected = out.requires_grad and torch.autograd.grad(out.sum(), probe, allow_unused=True)[0] is not None
    return model if connected else InputPath(model)


# classes each official component needs: its DLR loss reads the 3rd-highest logit, its targeted DLR the 4th
# (the official APGD-T runs the targeted DLR only), a targeted attack one class besides the true one
OFFICIAL_MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4, "fab-t": 2}
OFFICIAL_TARGETS = 9  # the official versions' APGD-T and FAB-T targets
OFFICIAL_VERSIONS = {  # the components each official version runs, in its order (its _set_version)
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}


def official_plan(attacks: list[str], num_classes: int) -> dict[str, Any]:
    """How the official AutoAttack runs ``attacks`` on a model of ``num_classes`` outputs, as fastrobust's own
    AutoAttack does: the targeted attacks with at most C - 1 targets (``n_targets``), and without the components
    the official code cannot run on so few classes (it fails with an IndexError inside: its APGD-T knows only the
    targeted DLR loss, which needs 4 classes). Returns ``{}`` when it runs as the version says, else
    ``{"n_targets": ...}`` and, when a component is dropped, ``{"attacks": [what runs], "dropped": {name: why}}``
    (what an evaluation record shows)."""
    plan: dict[str, Any] = {}
    if any(name in ("apgd-t", "fab-t") for name in attacks) and num_classes - 1 < OFFICIAL_TARGETS:
        plan["n_targets"] = max(num_classes - 1, 1)
    dropped = {name: f"the official {name.upper()} needs at least {OFFICIAL_MIN_CLASSES[name]} classes, the model "
                     f"has {num_classes}" for name in attacks if num_classes < OFFICIAL_MIN_CLASSES.get(name, 0)}
    if dropped:
        plan["attacks"] = [name for name in attacks if name not in dropped]
        plan["dropped"] = dropped
    return plan


def official_runner(model: nn.Module, *, eps: float, norm: str = "linf", version: str = "standard", seed: int = 0,
                    device: torch.device | str = "cpu", attacks: list[str] | None = None, x: Tensor | None = None,
                    num_classes: int | None = None):
    """An official ``AutoAttack`` object (quiet), with ``attacks`` (e.g. ``["apgd-t"]``) replacing the
    version's list the way the authors' ``run_standard_evaluation_individual`` does. With ``x`` (the points it
    will attack) a model without an input gradient is wrapped in ``InputPath`` first. With ``num_classes`` the
    targets and components are fitted to the model (``official_plan``)."""
    module = _require()
    cls = module.AutoAttack
    params = inspect.signature(cls.__init__).parameters
    kwargs = {"norm": NORM_NAMES[norm], "eps": eps, "version": version, "seed": seed, "device": device}
    if "verbose" in params:
        kwargs["verbose"] = False
    runner = cls(_for_official(model, x), **kwargs)
    runner.verbose = False
    if attacks is not None:
        runner.attacks_to_run = list(attacks)
    if num_classes is not None:
        plan = official_plan(list(runner.attacks_to_run), num_classes)
        if "n_targets" in plan:
            runner.apgd_targeted.n_target_classes = plan["n_targets"]
            runner.fab.n_target_classes = plan["n_targets"]
        runner.attacks_to_run = plan.get("attacks", list(runner.attacks_to_run))
    return runner


def _num_classes(model: nn.Module, x: Tensor) -> int:
    """The model's number of outputs on the batch (no gradient, in eval mode; one forward, next to the official
    AutoAttack's thousands)."""
    with torch.no_grad(), model_mode(model, training=False):
        return int(model(x).shape[-1])


def run_official(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "linf", version: str = "standard",
                 seed: int = 0, batch_size: int | None = None, attacks: list[str] | None = None,
                 eval_mode: bool = True, runner=None) -> Tensor:
    """The official AutoAttack's adversarials for ``x`` (per example: the first attack's adversarial, else x);
    ``runner``: an ``official_runner`` to use instead of a new one. A new runner is fitted to the model's number
    of outputs (``official_plan``: at most C - 1 targets, no component the official code cannot run on C)."""
    x = x.detach()
    if len(x) == 0:
        return x.clone()
    if runner is None:
        runner = official_runner(model, eps=eps, norm=norm, version=version, seed=seed, device=x.device,
                                 attacks=attacks, x=x, num_classes=_num_classes(model, x))
    run = runner.run_standard_evaluation
    bs = batch_size or max(len(x), 1)
    with model_mode(model, training=not eval_mode), _parameter_grads_kept(model):
        if "batch_size" in inspect.signature(run).parameters:  # pyautoattack: returns (x_adv, y_adv)
            out = run(x, y, batch_size=bs)
        else:  # the GitHub package: returns x_adv
            out = run(x, y, bs=bs)
    x_adv = out[0] if isinstance(out, tuple) else out
    return x_adv.detach()


def official_apgd_flags(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, loss: str = "ce",
                        target: Tensor | None = None, n_iter: int = 100, norm: str = "linf") -> Tensor:
    """Which points one official APGD run fools (bool [B]) when started at ``x`` itself (no random start):
    ``loss='ce'`` (APGD-CE), or ``'dlr-targeted'`` with ``target`` (one APGD-T run)."""
    base = _component("autopgd_base")
    x, y = x.detach(), y.detach()
    if loss == "dlr-targeted":
        attack = base.APGDAttack_targeted(_for_official(model, x), n_iter=n_iter, norm=NORM_NAMES[norm], n_restarts=1,
                                          eps=eps, seed=0, device=x.device)
        attack.y_target = target
    else:
        attack = base.APGDAttack(_for_official(model, x), n_iter=n_iter, norm=NORM_NAMES[norm], n_restarts=1, eps=eps,
                                 seed=0, loss=loss, device=x.device)
    attack.init_hyperparam(x)
    with model_mode(model, training=False):
        _, robust, _, _ = attack.attack_single_run(x, y, x_init=x.clone())
    return ~robust.bool()


def official_fab_t_flags(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, target_rank: int = 2,
                         n_iter: int = 100, norm: str = "linf") -> Tensor:
    """Which points one official FAB-T run (target: the class ranked ``target_rank`` by the clean logits,
    2 = the runner-up) fools within ``eps``, started at ``x`` (no random start). bool [B]."""
    fab = _component("fab_pt")
    x, y = x.detach(), y.detach()
    attack = fab.FABAttack_PT(_for_official(model, x), norm=NORM_NAMES[norm], n_restarts=1, n_iter=n_iter, eps=eps,
                              seed=0, targeted=True, device=x.device)
    attack.target_class = target_rank
    with model_mode(model, training=False), _parameter_grads_kept(model), torch.no_grad():
        adv = attack.attack_single_run(x, y, use_rand_start=False, is_targeted=True)
        fooled = model(adv).argmax(1) != y
    delta = (adv - x).flatten(1)
    distance = {"linf": delta.abs().amax(1), "l2": delta.norm(dim=1), "l1": delta.abs().sum(1)}[norm]
    return fooled & (distance <= eps)
