"""Short trainings on a real CIFAR-10 subset: robust methods must clearly beat natural training under PGD-20.

The numbers are small (a tiny CNN, 2,000 images, 6 epochs) but the gaps are large: natural training's
PGD-20 accuracy is a few percent, a working robust method's is several times that.
"""

from __future__ import annotations

import pytest

from fastrobust.data import load_dataset
from fastrobust.train import TrainConfig, train

MARGIN_OVER_NATURAL = 0.08
NOISE = 0.05  # about 2.8 standard deviations of an accuracy measured on 500 images


@pytest.fixture(scope="module")
def cifar(shared_data, tmp_path_factory):
    return load_dataset("cifar10", shared_data, val_size=200, train_subset=2000, test_subset=500)


@pytest.fixture(scope="module")
def results(cifar, tmp_path_factory):
    cache: dict[str, dict] = {}
    out = tmp_path_factory.mktemp("e2e")

    def run(method: str) -> dict:
        if method not in cache:
            config = TrainConfig(method=method, model="tinycnn", dataset="cifar10", epochs=6, batch_size=64,
                                 lr=0.05, schedule="cosine", device="cpu", out=str(out / method), seed=0)
            cache[method] = train(config, dataset=cifar, progress=False, log=lambda _: None)["test"]
        return cache[method]

    return run


def test_backward_smoothing_beats_natural_and_matches_fast_at(results):
    natural, smoothing, fast = results("natural"), results("backward_smoothing"), results("fast_at")
    assert natural["clean_acc"] > 0.28  # the pipeline learns at all
    assert smoothing["pgd20_acc"] >= natural["pgd20_acc"] + MARGIN_OVER_NATURAL, (natural, smoothing)
    assert smoothing["pgd20_acc"] >= fast["pgd20_acc"] - NOISE, (fast, smoothing)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pgd_at", "trades"])
def test_multi_step_baselines_beat_natural(results, method):
    natural, robust = results("natural"), results(method)
    assert robust["pgd20_acc"] >= natural["pgd20_acc"] + MARGIN_OVER_NATURAL, (natural, robust)
