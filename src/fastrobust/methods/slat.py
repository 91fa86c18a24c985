"""SLAT, single-step latent adversarial training (Park & Lee): FGSM-cost training that also perturbs
hidden activations.

Per batch, in the mode the model is in (the trainer's train mode):
  1. one forward on the clean batch x with forward hooks recording the outputs h_m of the chosen latent
     modules; one backward, by ``torch.autograd.grad`` with respect to x and the h_m only (no parameter
     gradient is ever accumulated), gives grad_x and grad_{h_m} of CE(f(x), y);
  2. x' = Pi(x + step_ratio * eps * sign(grad_x))  (eps-ball and [0, 1]; step_ratio = 0.9; no random start);
  3. a second forward on x' in which each chosen module's output h (as computed in this forward) is replaced
     by h + delta, delta = sign(grad_h) * eps_latent (default: eps, as the authors) clipped so that h + delta stays in that channel's
     [min, max] over the clean forward's batch and |delta| <= eps_latent per element (where h already lies
     outside the clean range, delta moves it back towards the range by at most eps_latent);
  4. loss = CE on that second forward.

``latent_modules`` is a comma-separated list of module names (``model.get_submodule`` paths); ``auto``
(the default) is ``conv1`` and the first stage, ``layer1`` (ResNets, CNNs) or ``block1`` (WideResNets);
``none`` perturbs the input only. Cost: two passes (the first backward reaches the input, so it is a full pass).

Hooks and torch.compile: the forward hooks on the latent modules are registered once per model (on its first
SLAT call) and stay, switched by state: outside a SLAT call (and after one that raised) they do nothing.
torch.compile traces a module's hooks into its graph and does not notice hooks added or removed later
(``torch._dynamo.config.skip_nnmodule_hook_guards``), so hooks that came and went with every call ran stale
under compile (a loss 0.12-0.40 off the eager one on tinycnn); the state the hooks read is guarded, so each
phase gets its own graph. A model compiled and run before its first SLAT call was traced without the hooks:
SLAT then stops with a ConfigError that says so. The clean pass needs gradients of hidden activations, which a
compiled graph does not expose: it runs on the uncompiled module; the perturbed pass (the training forward and
backward) runs on the model as given, compiled or not. :func:`remove_latent_hooks` takes the hooks off a model.

Precision: under autocast a latent module's output may be bf16 or fp16, whose spacing above 8 (bf16) is
larger than a latent step of 8/255 -- in bf16 ``h + delta`` doubles the step for 8 <= |h| < 16 and loses it
for |h| >= 16. The step is computed in float32 and the perturbed activation returned in float32; the next
layer under autocast rounds its input again, but a residual stream added to it stays in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastrobust.attacks import project
from fastrobust.attacks.toolkit import upcast
from fastrobust.core.precision import attack_autocast, attack_gradients
from fastrobust.core.values import parse_number
from fastrobust.errors import ConfigError
from fastrobust.methods.base import Cost, Method, MethodConfig, Stats, accuracy, register


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose submodule names the user gives (through torch.compile and DDP wrappers)."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def resolve_latent_modules(model: nn.Module, spec: str) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs for a ``latent_modules`` setting ("auto", "none" or "name,name,...")."""
    model = _unwrap(model)
    text = spec.strip()
    children = dict(model.named_children())
    if text.lower() == "auto":
        names = [name for name in ("conv1",) if name in children]
        stage = next((name for name in ("layer1", "block1") if name in children), None)
        if stage is not None:
            names.append(stage)
        if not names:
            raise ConfigError(
                "slat latent_modules=auto needs a module named conv1, layer1 or block1; this model has "
                f"{', '.join(children) or 'no submodules'}: name the modules with method.latent_modules=a,b"
            )
    elif text.lower() in ("", "none"):
        names = []
    else:
        names = [name.strip() for name in text.split(",") if name.strip()]
    if len(set(names)) != len(names):
        raise ConfigError(f"slat latent_modules={spec!r} names a module twice")
    resolved = []
    for name in names:
        try:
            resolved.append((name, model.get_submodule(name)))
        except AttributeError:
            raise ConfigError(
                f"slat latent_modules: the model has no module {name!r}; its top-level modules are "
                f"{', '.join(children)}"
            ) from None
    return resolved


def perturb_latent(h: Tensor, grad_sign: Tensor, low: Tensor, high: Tensor, eps_latent: float) -> Tensor:
    """``h + latent_delta(...)`` computed in at least float32 and returned so (a bf16 ``h`` is widened first).

    Args:
        h: the latent module's output in the perturbed forward (any float dtype).
        grad_sign, low, high: the plan from the clean pass (sign of grad_h, per-channel clean range).
        eps_latent: the step, in units of the activations.
    Returns:
        The perturbed activation, float32 (or ``h``'s dtype when wider); gradients flow to ``h``.
    """
    wide = h.to(torch.promote_types(h.dtype, torch.float32))
    return wide + latent_delta(wide, grad_sign, low, high, eps_latent)


def latent_delta(h: Tensor, grad_sign: Tensor, low: Tensor, high: Tensor, eps_latent: float) -> Tensor:
    """The latent perturbation (a constant): sign * eps_latent, kept inside [low, high] and |.| <= eps_latent."""
    with torch.no_grad():
        target = torch.clamp(h + grad_sign * eps_latent, min=low, max=high)
        return (target - h).clamp(-eps_latent, eps_latent)


def _channel_range(h: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (dim 1) min and max over the batch and every other dimension, kept for broadcasting."""
    h = h.detach()
    dims = tuple(d for d in range(h.dim()) if d != 1) if h.dim() > 1 else (0,)
    return h.amin(dim=dims, keepdim=True), h.amax(dim=dims, keepdim=True)


class _LatentState:
    """What SLAT's hooks on one model do now and the data they use (shared by the hooks of that model).

    ``phase``: ``off`` (nothing: the model as it is), ``record`` (keep each latent module's output) or
    ``perturb`` (add the planned latent step). ``handles`` remove the hooks (:func:`remove_latent_hooks`).
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.phase = "off"
        self.eps_latent = 0.0
        self.recorded: dict[str, Tensor] = {}
        self.plan: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self.applied: set[str] = set()
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def reset(self) -> None:
        """Back to ``off``, holding no tensor of the last call."""
        self.phase = "off"
        self.recorded.clear()
        self.plan.clear()
        self.applied.clear()


class _LatentHook:
    """The forward hook of one latent module (an object, so a model carrying it can still be pickled)."""

    def __init__(self, state: _LatentState, name: str) -> None:
        self.state = state
        self.name = name

    def __call__(self, _module: nn.Module, _inputs: tuple, output: Any) -> Tensor | None:
        state, name = self.state, self.name
        if state.phase == "off":
            return None
        if not torch.is_tensor(output):
            raise ConfigError(f"slat: module {name!r} returns {type(output).__name__}, not a tensor")
        seen = state.recorded if state.phase == "record" else state.applied
        if name in seen:
            raise ConfigError(f"slat: module {name!r} runs more than once per forward; name another module")
        if state.phase == "record":
            state.recorded[name] = output
            return None
        state.applied.add(name)
        sign, low, high = state.plan[name]
        return perturb_latent(output, sign, low, high, state.eps_latent)


_STATE_ATTRIBUTE = "_slat_latent_state"


def _latent_hooks(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> _LatentState:
    """The state of SLAT's hooks on ``model`` for these latent modules: registered on the first call and kept
    (so torch.compile sees them from its first trace); hooks for other modules are replaced."""
    base = _unwrap(model)
    names = tuple(name for name, _ in targets)
    state = base.__dict__.get(_STATE_ATTRIBUTE)
    if state is not None and state.names == names:
        return state
    remove_latent_hooks(base)
    state = _LatentState(names)
    state.handles = [module.register_forward_hook(_LatentHook(state, name)) for name, module in targets]
    base.__dict__[_STATE_ATTRIBUTE] = state
    return state


def remove_latent_hooks(model: nn.Module) -> None:
    """Take SLAT's forward hooks off ``model`` (they do nothing outside a SLAT call; this removes them)."""
    base = _unwrap(model)
    state = base.__dict__.pop(_STATE_ATTRIBUTE, None)
    if state is not None:
        for handle in state.handles:
            handle.remove()


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module under torch.compile's wrapper (the model itself when it is not compiled)."""
    while hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
        model = model._orig_mod
    return model


@dataclass(frozen=True)
class SLATConfig(MethodConfig):
    eps: float = 8 / 255
    step_ratio: float = 0.9          # input step = step_ratio * eps
    eps_latent: float | None = None  # latent step (units of the activations); None: eps (the authors' one eta)
    latent_modules: str = "auto"     # "auto", "none" or comma-separated module names

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.step_ratio, (int, float)) and math.isfinite(self.step_ratio) and self.step_ratio > 0):
            raise ConfigError(f"slat step_ratio={self.step_ratio!r} must be a positive number (paper: 0.9)")
        if isinstance(self.eps_latent, str):  # from the command line or a preset: "8/255", or none
            text = self.eps_latent.strip().lower()
            value = None if text in ("none", "null", "") else parse_number(text, name="slat eps_latent")
            object.__setattr__(self, "eps_latent", value)
        if self.eps_latent is not None and not (isinstance(self.eps_latent, (int, float)) and not isinstance(
                self.eps_latent, bool) and math.isfinite(self.eps_latent) and self.eps_latent >= 0):
            raise ConfigError(f"slat eps_latent={self.eps_latent!r} must be a number >= 0, or none for eps (authors)")
        if not isinstance(self.latent_modules, str):
            raise ConfigError(f"slat latent_modules={self.latent_modules!r} must be a comma-separated string")

    @property
    def latent_step(self) -> float:
        """The latent perturbation size: ``eps_latent``, or ``eps`` when it is None. The SLAT authors derive
        the input and latent perturbations from one ``eta`` (model/hidden_module.py), so the latent step
        follows eps (8/255 in the paper)."""
        return float(self.eps if self.eps_latent is None else self.eps_latent)


@register
class SLAT(Method):
    name = "slat"
    Config = SLATConfig
    description = (
        "Park & Lee SLAT: one pass gives the gradients of the input and of conv1/layer1 outputs; CE on the "
        "input step 0.9*eps plus signed latent steps eps_latent (None: eps, as the authors; clipped to the "
        "channels' clean range)."
    )

    @property
    def cost(self) -> Cost:
        return Cost(2)

    def check_model(self, model: nn.Module) -> None:
        """ConfigError now (before the trainer writes anything) when ``latent_modules`` names no module of
        ``model``; the trainer calls it once after building the model."""
        resolve_latent_modules(model, self.config.latent_modules)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Stats]:
        c = self.config
        targets = resolve_latent_modules(model, c.latent_modules)
        names = [name for name, _ in targets]
        state = _latent_hooks(model, targets)
        state.eps_latent = c.latent_step
        try:
            state.phase = "record"
            x_in = x.detach().clone().requires_grad_(True)
            with attack_autocast():  # the gradient pass is the attack: its precision (fastrobust.core.precision)
                logits = upcast(_uncompiled(model)(x_in))  # eager: it needs the hidden activations' gradients
            clean_loss = F.cross_entropy(logits, y)
            missing = [name for name in names if name not in state.recorded]
            if missing:
                raise ConfigError(f"slat: latent module(s) {', '.join(missing)} never ran in the forward pass")
            latents = [state.recorded[name] for name in names]
            state.phase = "off"
            grads = attack_gradients(clean_loss, logits, [x_in, *latents])
            x_adv = project(x.detach() + c.step_ratio * c.eps * grads[0].sign(), x.detach(), c.eps).detach()
            for name, h, grad in zip(names, latents, grads[1:]):
                low, high = _channel_range(h)
                plan_dtype = torch.promote_types(h.dtype, torch.float32)
                state.plan[name] = (grad.sign().detach().to(plan_dtype), low.to(plan_dtype), high.to(plan_dtype))
            state.recorded.clear()
            del latents, grads
            state.phase = "perturb"
            logits_adv = model(x_adv)
            if set(names) - state.applied:
                stale = (" (torch.compile traced this model before SLAT's hooks were registered and does not see "
                         "them: make SLAT's call the compiled model's first, or call torch._dynamo.reset())"
                         if _uncompiled(model) is not model else "")
                raise ConfigError(f"slat: latent module(s) {', '.join(sorted(set(names) - state.applied))} did not "
                                  f"run{stale}")
        finally:
            state.reset()
        loss = F.cross_entropy(upcast(logits_adv), y)
        return loss, {"loss": loss.detach(), "acc": accuracy(logits, y), "adv_acc": accuracy(logits_adv, y)}


__all__ = ["SLAT", "SLATConfig", "latent_delta", "perturb_latent", "remove_latent_hooks", "resolve_latent_modules"]
