"""Training methods: ``loss, stats = method(model, x, y)``, usable in any training loop.

>>> from fastrobust import methods
>>> method = methods.create("backward_smoothing", beta=10)
>>> method.cost.passes   # forward+backward passes per step (a forward alone counts 1/3)
4.0
"""

from fastrobust.methods import backward_smoothing, fast, slat, sprout, standard  # noqa: F401  (registration)
from fastrobust.methods.backward_smoothing import BackwardSmoothing, BackwardSmoothingAT, backward_smoothing_points
from fastrobust.methods.base import (
    Cost,
    Method,
    MethodConfig,
    available_methods,
    create,
    describe,
    method_class,
    register,
)
from fastrobust.methods.fast import FastAT, FastAT2Step, FastATPlus, FastTRADES
from fastrobust.methods.slat import SLAT
from fastrobust.methods.sprout import SPROUT
from fastrobust.methods.standard import PGDAT, TRADES, Natural, adversarial_ce, trades_objective

__all__ = [
    "PGDAT",
    "SLAT",
    "SPROUT",
    "TRADES",
    "BackwardSmoothing",
    "BackwardSmoothingAT",
    "Cost",
    "FastAT",
    "FastAT2Step",
    "FastATPlus",
    "FastTRADES",
    "Method",
    "MethodConfig",
    "Natural",
    "adversarial_ce",
    "available_methods",
    "backward_smoothing_points",
    "create",
    "describe",
    "method_class",
    "register",
    "trades_objective",
]
