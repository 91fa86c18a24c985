"""A new user's evaluation trial: a plain function as the model, a dict-returning model, an l2 eps given in
l_inf units, and `fastrobust eval` on a run's checkpoints folder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastrobust import methods
from fastrobust.attacks import pgd
from fastrobust.errors import ConfigError, FastRobustError
from fastrobust.evaluate import clean_and_robust_counts, evaluate
from fastrobust.evaluate.sanity import sanity_checks

pytestmark = pytest.mark.usefixtures("one_thread")

NET = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
X = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("entry", [
    lambda m: evaluate(m, (X, Y), ["pgd20"], eps=8 / 255, progress=False),
    lambda m: sanity_checks(m, (X, Y), eps=8 / 255),
    lambda m: clean_and_robust_counts(m, X, Y, None),
    lambda m: pgd(m, X, Y, eps=8 / 255, steps=2),
    lambda m: methods.create("pgd_at")(m, X, Y),
], ids=["evaluate", "sanity_checks", "clean_and_robust_counts", "pgd", "method"])
def test_a_plain_function_is_refused_with_the_wrapper_to_write(entry):
    with pytest.raises(ConfigError, match=r"the model is a function, expected a torch.nn.Module.*"
                                          r"class Logits\(nn.Module\).*return self.net\(x\)\[0\]") as info:
        entry(lambda x: NET(x))
    assert "\n" not in str(info.value)


def test_a_dict_output_is_refused_naming_its_keys():
    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = NET

        def forward(self, x):
            return {"features": x.flatten(1), "logits": self.net(x)}

    with pytest.raises(FastRobustError, match=r"returned a dict.*model\(x\)\['logits'\]; its keys are "
                                              r"\['features', 'logits'\]"):
        evaluate(DictNet(), (X, Y), ["pgd20"], eps=8 / 255, progress=False)
