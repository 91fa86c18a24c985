"""What the attacks do differently on CUDA, checked on the CPU (no GPU runs these tests).

* Random draws: torch draws only on a generator's own device (a CPU ``torch.Generator()`` with CUDA inputs
  raises inside torch). ``DrawsLikeCuda`` raises the same way on any device, and 'meta' tensors stand in for
  CUDA ones: every draw must happen on the generator's device, then move to the inputs'.
* Host synchronisations: ``HostSyncs`` counts them (see tests/host_syncs.py). An ``Execution`` on "cuda" runs
  the engines' CUDA decisions (a check every 5 iterations, sync-free choices, fp32 confirmations) on CPU tensors.
  Pinned: per check of the working batch, per iteration and per query, as docs/performance.md states them.
* Duplicate rows of one point (APGD-T, FAB-T): one documented row wins, whatever order a device writes in.
* Confirmations and final flags run with TF32 off and the flags restored; backward passes run outside autocast.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastrobust.attacks import apgd, apgd_t, autoattack, fab_t, project
from fastrobust.attacks._engine import CUDA_CHECK_EVERY, Execution, confirm, write_per_point
from fastrobust.attacks.toolkit import random_start
from fastrobust.core.precision import no_tf32
from fastrobust.evaluate.invariance import add_gaussian_noise
from host_syncs import HostSyncs

apgd_module = importlib.import_module("fastrobust.attacks.apgd")  # the package exports functions of these names
fab_module = importlib.import_module("fastrobust.attacks.fab")
square_module = importlib.import_module("fastrobust.attacks.square")
rays_module = importlib.import_module("fastrobust.attacks.rays")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:precision='bf16' on a CPU without")]  # bf16 on purpose here
C = 6
N_ITER = 20  # a multiple of CUDA_CHECK_EVERY: the last iteration is a check
FAB_L1_NONE, FAB_L1_SOME = 3.0, 15.0  # l_1 budgets at which no FAB-T run / some run finds an adversarial here
SQUARE_L1_EPS = 6.0  # some points fall within 40 l_1 Square queries, some do not


class Counting(nn.Module):
    """A random net that counts its forward calls: a small conv net, or (``linear``) one linear layer."""

    def __init__(self, linear: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, C)) if linear else nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(8 * 4 * 4, C))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.body(x)


def labelled_by(model: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """12 images of 3x8x8 labelled by the model's own predictions (all correct at eps 0)."""
    x = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return labelled_by(Counting().eval())


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- A2: generators and devices
class DrawsLikeCuda(TorchDispatchMode):
    """Raises, as torch does for CUDA, when an operation draws from a generator of another device type."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        generator = kwargs.get("generator")
        if generator is not None:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            device = torch.device(kwargs.get("device") or (tensors[0].device if tensors else "cpu"))
            if device.type != generator.device.type:
                raise RuntimeError(f"Expected a '{device.type}' device type for generator but found "
                                   f"'{generator.device.type}'")
        return func(*args, **kwargs)


def test_random_draws_happen_on_the_generators_device():
    meta = torch.rand(2, 3, 8, 8).to("meta")  # stands in for CUDA inputs
    g = seeded()
    with DrawsLikeCuda():
        drawn = [random_start(meta, 0.1, "linf", g), random_start(meta, 0.5, "l2", g),
                 fab_module._random_start_half_eps(meta, 0.1, "linf", g),
                 fab_module._random_start_half_eps(meta, 0.5, "l2", g),
                 fab_module._random_start_half_eps(meta, 2.0, "l1", g),
                 square_module._signs((2, 3, 1, 8), g, meta.device), square_module._l2_init(meta, 0.5, g),
                 square_module._l1_init(meta, g),
                 square_module._corners(2, 8, 8, 3, g, meta.device)[0], square_module._eta_batch(2, 3, g, meta.device),
                 add_gaussian_noise(meta, 0.1, g)]
    assert all(t.device.type == "meta" for t in drawn)
    with pytest.raises(RuntimeError, match="device type for generator"), DrawsLikeCuda():  # the stand-in raises
        torch.rand(3, generator=g, device="meta")


def test_a_cpu_generator_on_cpu_inputs_draws_the_same_numbers_as_before():
    x = torch.rand(4, 3, 8, 8, generator=seeded(1))
    noise = torch.rand(x.shape, generator=seeded(0)) * 2 - 1
    assert torch.equal(random_start(x, 0.1, "linf", seeded(0)), project(x + 0.1 * noise, x, 0.1, "linf"))
    assert torch.equal(add_gaussian_noise(x, 0.1, seeded(2)),
                       (x + 0.1 * torch.randn(x.shape, generator=seeded(2))).clamp(0, 1))
    assert torch.equal(square_module._signs((4, 3, 1, 8), seeded(3), x.device),
                       torch.randint(0, 2, (4, 3, 1, 8), generator=seeded(3)).float() * 2 - 1)


# ----------------------------------------------------------------------------- C5: host synchronisations
def test_the_execution_decides_how_the_engines_run_by_its_device(small):
    model = small[0]
    cpu, cuda = Execution(model, None, "cpu"), Execution(model, None, "cuda")
    assert (cpu.check_every, cpu.sync_free, cpu.approximate) == (1, False, False)
    # on CUDA even fp32 flags are confirmed: the attack's own fp32 convolutions may be TF32 there
    assert (cuda.check_every, cuda.sync_free, cuda.approximate) == (CUDA_CHECK_EVERY, True, True)


def _targeted_rows(x, y, targets: int):
    """Every point with its ``targets`` next classes, target-major, and each row's point (as APGD-T's waves)."""
    rows = len(x) * targets
    group = torch.arange(len(x)).repeat(targets)
    target = (y.repeat(targets) + 1 + torch.arange(targets).repeat_interleave(len(x))) % C
    return x[group], y[group], target, group, rows


@pytest.mark.parametrize("falls", [False, True])  # no point falls / some points fall
@pytest.mark.parametrize("grouped", [False, True])
def test_apgd_synchronises_once_per_check(small, falls, grouped):
    model, x, y = small
    eps = (0.15 if grouped else 0.05) if falls else 1e-4
    if grouped:
        xs, ys, target, group, _ = _targeted_rows(x, y, 2)
        fn, extra = apgd_module._loss_fn("dlr-targeted", C), {"group": group, "n_groups": len(x)}
    else:
        xs, ys, target, fn, extra = x, y, None, apgd_module._loss_fn("ce", C), {}

    def run(device_type):
        with HostSyncs() as syncs:
            _, _, fooled = apgd_module._apgd_rows(
                xs, ys, target, fn, eps=eps, norm="linf", n_iter=N_ITER, alpha=0.75, rho=0.75, random_init=True,
                generator=seeded(), execution=Execution(model, None, device_type), **extra)
        return syncs, fooled

    syncs, fooled = run("cpu")  # a check before the loop and after every iteration: one each, rows leaving or not
    assert syncs.count == N_ITER + 1, syncs.where
    assert bool(fooled.any()) == falls and not bool(fooled.all())
    syncs, fooled = run("cuda")
    checks = 1 + N_ITER // CUDA_CHECK_EVERY
    assert syncs.within("confirm_any", "split") == syncs.count, syncs.where  # none between the checks
    if not bool(fooled.any()):  # a check with nothing to confirm: its look-up only; then the final confirmation
        assert syncs.count == checks + 1, syncs.where
    else:  # a check where rows leave: the look-up, the split and the leaving rows' confirmation
        assert checks + 1 < syncs.count <= 3 * checks + 1, syncs.where


@pytest.mark.parametrize("norm,eps,falls", [("linf", 0.1, False), ("linf", 0.15, True),  # no run finds one / one does
                                            ("l1", FAB_L1_NONE, False), ("l1", FAB_L1_SOME, True)])
def test_fab_synchronises_only_at_its_checks_on_cuda(small, norm, eps, falls):
    model, x, y = small
    xs, ys, target, group, _ = _targeted_rows(x, y, 2)
    with HostSyncs() as syncs:
        _, _, found = fab_module._fab_rows(xs, ys, target, start=xs.clone(), eps=eps, norm=norm, n_iter=N_ITER,
                                        alpha_max=0.1, eta=1.05, beta=0.9, execution=Execution(model, None, "cuda"),
                                        group=group, n_groups=len(x))
    checks = N_ITER // CUDA_CHECK_EVERY
    # per iteration none (Newton's projection, or l_1's sort, without asking the host); per check the look-up of
    # the rows to confirm, and the split when some are found
    assert syncs.within("confirm_any") == checks, syncs.where
    assert syncs.count == checks + syncs.within("split") <= 2 * checks, syncs.where
    assert bool(found.any()) == falls


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_square_linf_synchronises_per_check_only(small, monkeypatch, device_type):
    model, x, y = small
    ex = Execution(model, None, device_type)
    monkeypatch.setitem(square_module.SPECULATE_BELOW, "cpu", 0)  # the in-place phase: one query per iteration
    n_queries = 41
    with HostSyncs() as syncs:
        _, queries = square_module._square_linf(ex, x, y, 0.3, n_queries, 0.8, seeded(), False)
    n_iter = n_queries - 1
    assert bool((queries < n_queries).any()) and bool((queries == n_queries).any())  # some points fall
    if device_type == "cpu":  # exact: the split, before the loop, after every iteration and after the loop
        assert syncs.count == 1 + (n_iter + 2), syncs.where  # 1: the draws, read once before the loop
    else:  # a check every 5 iterations (and after the loop): the fp32 confirmation's look-up and the split
        assert syncs.count == 1 + 2 * (1 + n_iter // CUDA_CHECK_EVERY + 1), syncs.where
    monkeypatch.setitem(square_module.SPECULATE_BELOW, "cpu", 64)  # few points: the speculative phase
    with HostSyncs() as syncs:
        square_module._square_linf(ex, x, y, 0.3, 200, 0.8, seeded(), False)
    assert syncs.within("_speculate") == 0, syncs.where  # only its checks synchronise
    assert syncs.count == 1 + syncs.within("split", "settle"), syncs.where


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("norm,eps", [("l2", 3.0), ("l1", SQUARE_L1_EPS)])
def test_square_l2_and_l1_look_up_their_points_once_per_check(small, device_type, norm, eps):
    model, x, y = small
    n_queries = 41
    search = {"l2": square_module._square_l2, "l1": square_module._square_l1}[norm]
    with HostSyncs() as syncs:
        _, queries = search(Execution(model, None, device_type), x, y, eps, n_queries, 0.8, seeded(), False)
    assert bool((queries < n_queries).any()) and bool((queries == n_queries).any())
    drawn = 0 if norm == "l2" else 2  # l_1: its start's orientations and every query's windows, read once each
    if device_type == "cpu":  # one look-up of the points still searching per query
        assert syncs.count == drawn + n_queries - 1, syncs.where
    else:  # every 5 queries: the fp32 confirmation's look-up and the points still searching
        assert syncs.count == drawn + 2 * -(-(n_queries - 1) // CUDA_CHECK_EVERY), syncs.where


def test_rays_synchronises_once_per_look_up_and_its_results_do_not_depend_on_how_often(monkeypatch):
    torch.manual_seed(0)
    model, x, y = labelled_by(Counting(linear=True).eval())  # RayS finds boundaries of a linear model
    results = {}
    for every in (1, CUDA_CHECK_EVERY):
        monkeypatch.setattr(rays_module, "check_every", lambda device_type, every=every: every)
        model.calls = 0
        with HostSyncs() as syncs:
            results[every] = rays_module.rays(model, x, y, n_queries=150, eps=0.1, early_stop=True)
        steps = model.calls - 1  # one query of every example still searching per step (the clean pass aside)
        assert syncs.within("rays") == steps // every + 1, syncs.where  # the last look-up finds none left
    queries = results[1].queries
    assert len(set(queries.tolist())) > 2  # examples stopped at different queries (early stop, budget)
    for field in ("x_adv", "queries", "distance", "direction"):
        assert torch.equal(getattr(results[1], field), getattr(results[CUDA_CHECK_EVERY], field)), field


# ----------------------------------------------------------------------------- B2: duplicate-index writes
class DuplicateWrites(TorchDispatchMode):
    """Counts index writes (no accumulation) that give one position several rows, and those among them that
    give it different values: there, which value stays depends on the order the device writes in."""

    def __init__(self):
        super().__init__()
        self.duplicated = 0
        self.conflicting = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        if func in (aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default):
            target, indices, values = args[:3]
            accumulate = args[3] if len(args) > 3 else (kwargs or {}).get("accumulate", False)
            index = indices[0] if len(indices) == 1 else None
            if not accumulate and index is not None and index.dtype == torch.long and len(index.unique()) < len(index):
                self.duplicated += 1
                values = torch.broadcast_to(values, (len(index),) + tuple(target.shape[1:]))
                for point in index.unique():
                    rows = values[index == point]
                    if not bool((rows == rows[0]).all()):
                        self.conflicting += 1
                        break
        return func(*args, **(kwargs or {}))


def test_duplicate_rows_of_a_point_keep_the_documented_row():
    points = torch.tensor([1, 3, 1, 1, 3, 0])
    values = torch.arange(12.0).view(6, 2) + 1
    rank = torch.tensor([0, 0, 1, 0, 0, -1])
    result = torch.zeros(4, 2)
    with DuplicateWrites() as writes:
        write_per_point(result, points, values, rank)
    # point 1: the row of the highest rank (2); point 3: same ranks, the last row (4); point 0: rank -1 writes
    # nothing; point 2: no row
    assert torch.equal(result, torch.stack([torch.zeros(2), values[2], torch.zeros(2), values[4]]))
    assert writes.duplicated == 1 and writes.conflicting == 0  # every row of a point writes the same values
    # the rule is what sequential writes on the CPU gave: all writing rows in order, then the rank-1 rows
    sequential = torch.zeros(4, 2)
    for r in (0, 1):
        for i in (rank >= r).nonzero().squeeze(1).tolist():
            sequential[points[i]] = values[i]
    assert torch.equal(result, sequential)


def test_targeted_attacks_write_one_value_per_point(small):
    model, x, y = small
    for attack in (lambda: apgd_t(model, x, y, eps=0.05, n_iter=10, n_targets=3, max_rows=3 * len(x),
                                  generator=seeded(), n_restarts=2),
                   lambda: fab_t(model, x, y, eps=0.15, n_iter=10, n_targets=3, max_rows=3 * len(x), n_restarts=2,
                                 generator=seeded())):
        with DuplicateWrites() as writes:
            attack()
        assert writes.duplicated > 0  # several targets of a point in one batch: the case decided here
        assert writes.conflicting == 0


# ----------------------------------------------------------------------------- B3: TF32 off where "fp32" is promised
def _tf32_state() -> tuple:
    cudnn = torch.backends.cudnn
    strings = (torch.backends.cuda.matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision) \
        if hasattr(cudnn, "conv") else ()
    return strings, torch.get_float32_matmul_precision(), cudnn.allow_tf32


@pytest.fixture
def tf32_allowed():
    """TF32 allowed for matrix products and convolutions (as many GPU users set it), restored after the test."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


def test_no_tf32_turns_tf32_off_and_restores_it_also_after_an_error(tf32_allowed):
    allowed = _tf32_state()
    with no_tf32():
        assert torch.get_float32_matmul_precision() == "highest"
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert _tf32_state() == allowed
    with pytest.raises(ValueError, match="inside"), no_tf32():
        raise ValueError("inside")
    assert _tf32_state() == allowed


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch < 2.9 has no per-operator TF32 setting")
def test_no_tf32_with_torchs_per_operator_settings():
    cudnn = torch.backends.cudnn
    saved = (torch.backends.cuda.matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision)
    try:
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = "tf32", "ieee"  # torch's legacy flags now raise
        with no_tf32():
            assert cudnn.conv.fp32_precision == "ieee" and torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision) == ("tf32", "ieee")
    finally:
        torch.backends.cuda.matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved


class RecordsTF32(nn.Module):
    """The model, recording at each forward whether TF32 was allowed."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.allowed: list[bool] = []

    def forward(self, x):
        self.allowed.append(torch.get_float32_matmul_precision() != "highest" or torch.backends.cudnn.allow_tf32)
        return self.inner(x)


def test_confirmations_and_final_flags_run_without_tf32(small, tf32_allowed):
    model, x, y = small
    spy = RecordsTF32(model).eval()
    confirm(Execution(spy, None, "cuda"), x, y, torch.ones(len(x), dtype=torch.bool))
    square_module._fp32_margins(Execution(spy, None, "cuda"), x, y, torch.zeros(len(x)), torch.arange(len(x)))
    assert spy.allowed == [False, False]
    spy.allowed.clear()
    autoattack(spy, x, y, eps=0.05, attacks=("apgd-ce",), options={"apgd-ce": {"n_iter": 3}})
    assert not spy.allowed[0] and not spy.allowed[-1]  # the clean flags and the attack's final flags
    assert any(spy.allowed[1:-1])  # the attack's own forwards keep the caller's setting


# ----------------------------------------------------------------------------- D2: backward outside autocast
class RecordsAutocastInBackward(torch.autograd.Function):
    seen: ClassVar[list[bool]] = []

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        RecordsAutocastInBackward.seen.append(torch.is_autocast_enabled("cpu"))
        return grad


class BackwardSpy(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(RecordsAutocastInBackward.apply(x))


def test_attack_gradients_are_taken_outside_autocast(small):
    model, x, y = small
    spy = BackwardSpy(model).eval()
    for attack in (lambda: apgd(spy, x, y, eps=0.01, n_iter=3, precision="bf16"),
                   lambda: fab_t(spy, x, y, eps=0.01, n_iter=3, n_targets=1, precision="bf16")):
        RecordsAutocastInBackward.seen.clear()
        attack()
        assert RecordsAutocastInBackward.seen and not any(RecordsAutocastInBackward.seen)
