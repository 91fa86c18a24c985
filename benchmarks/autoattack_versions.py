"""Agreement of fastrobust's AutoAttack versions and threat models with the authors' code (``pyautoattack``).

On a small fixed (seeded) MLP of 3x8x8 images and ``--n-points`` random points (the first 4 given a wrong label),
each row runs one version at one norm on both sides (full settings: 100 iterations, every restart and target) and
prints the robust accuracy of each and the points where they differ. The random starts differ (the official draws
from the global generator, fastrobust from its own), so a point may fall on one side only. l_1: fastrobust's
``fast`` version (the official standard's l_1 APGD-CE and APGD-T) against the official's APGD-CE + APGD-T, and the
full standard l_1 version (APGD-CE, APGD-T, FAB-T, Square) on both sides. ``rand`` runs also on the same model with 30%
input dropout at every call (a randomised model), where both sides decide each point by one noisy pass (each side's
own verdict is compared: the official's predictions at its adversarials, fastrobust's ``robust`` flags); there one
run's count is noisy (on 256 points, 4 seeds: official 37, 23, 30, 30 robust, fastrobust 28, 33, 26, 31), so compare
means over seeds, not points.

    OMP_NUM_THREADS=1 python benchmarks/autoattack_versions.py --n-points 24
    OMP_NUM_THREADS=1 python benchmarks/autoattack_versions.py --n-points 64 --norm l1   # the l_1 rows only
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from fastrobust.attacks import autoattack
from fastrobust.attacks.official import official_runner

ROWS = [  # (fastrobust version, norm, eps, official version, official attacks or None, model)
    ("standard", "linf", 0.02, "standard", None, "fixed"),
    ("plus", "linf", 0.02, "plus", None, "fixed"),
    ("rand", "linf", 0.02, "rand", None, "fixed"),
    ("standard", "l2", 0.3, "standard", None, "fixed"),
    ("plus", "l2", 0.3, "plus", None, "fixed"),
    ("fast", "l1", 1.0, "standard", ["apgd-ce", "apgd-t"], "fixed"),
    ("standard", "l1", 1.0, "standard", None, "fixed"),
    ("rand", "linf", 0.01, "rand", None, "noisy"),
]


class InputDropout(nn.Module):
    """``inner`` on the input with a share ``p`` of its values dropped at random at every call (a randomised defense)."""

    def __init__(self, inner: nn.Module, p: float = 0.3):
        super().__init__()
        self.inner, self.p = inner, p

    def forward(self, x):
        return self.inner(x * (torch.rand_like(x) > self.p).to(x.dtype) / (1 - self.p))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-points", type=int, default=24)
    parser.add_argument("--norm", choices=("linf", "l2", "l1"), default=None,
                        help="run only the rows of this threat model (default: every row)")
    args = parser.parse_args()
    torch.manual_seed(0)
    fixed = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.rand(args.n_points, 3, 8, 8)
    with torch.no_grad():
        y = fixed(x).argmax(1)
    y[:4] = (y[:4] + 1) % 10
    models = {"fixed": fixed, "noisy": InputDropout(fixed)}
    print("| version | norm | eps | model | official (attacks) | robust official / fastrobust | points that differ "
          "| seconds official / fastrobust |")
    print("|---|---|---|---|---|---|---|---|")
    for version, norm, eps, official_version, attacks, which in ROWS:
        if args.norm is not None and norm != args.norm:
            continue
        model = models[which]
        torch.manual_seed(1)
        t0 = time.process_time()
        runner = official_runner(model, eps=eps, norm=norm, version=official_version, seed=0, attacks=attacks,
                                 num_classes=10)
        with torch.no_grad():  # the official's own verdict per point (on a randomised model a fresh pass differs)
            _, y_adv = runner.run_standard_evaluation(x, y, batch_size=len(x))
        t1 = time.process_time()
        official = y_adv == y
        result = autoattack(model, x, y, eps=eps, norm=norm, version=version, return_details=True,
                            generator=torch.Generator().manual_seed(0))
        t2 = time.process_time()
        ours = result.robust
        differ = (ours != official).nonzero().squeeze(1).tolist()
        what = official_version + (f" ({'+'.join(attacks)})" if attacks else "")
        print(f"| {version} | {norm} | {eps:g} | {which} | {what} | {int(official.sum())} / {int(ours.sum())} of "
              f"{len(y)} | {differ or 'none'} | {t1 - t0:.1f} / {t2 - t1:.1f} |")


if __name__ == "__main__":
    main()
