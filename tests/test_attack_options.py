"""Attack settings are checked in one place (fastrobust.core.attack_options) at every public attack and in evaluate,
before any work: a setting is never recorded as one thing while the attack runs another. Also the Python-side
refusals a notebook user meets: torch.inference_mode(), a CUDA device on a machine without one, an eps tensor
holding one value per example."""

import pytest
import torch
from torch import nn

from fastrobust.attacks import apgd_t, autoattack, fab_t, fgsm, pgd, rays, square
from fastrobust.errors import ConfigError
from fastrobust.evaluate import evaluate
from fastrobust.methods import create
from fastrobust.core.values import parse_number
from fastrobust.evaluate.sanity import sanity_checks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = model(images.float() / 255).argmax(1)
    return model, images, labels


def run(model, images, labels, name, options, **kwargs):
    return evaluate(model, (images, labels), ["clean", name], eps=8 / 255, progress=False,
                    attack_options={name: options}, **kwargs)


@pytest.mark.parametrize("name, options, message", [
    # "False" is a non-empty string: it ran with a random start while the record said random_init 'False'
    ("pgd20", {"random_init": "False"}, r"random_init='False' must be True or False \(got type str\) \(any non-empty"),
    ("pgd20", {"stop_at_fooled": 2}, r"stop_at_fooled=2 must be True or False"),
    # no step: "pgd20" reported the clean accuracy as its robust accuracy
    ("pgd20", {"steps": 0}, r"steps=0 must be at least 1"),
    ("cw20", {"steps": -3}, r"steps=-3 must be at least 1"),
    # 2 meant 2/255: every step jumped to a corner of the ball, under the name pgd20
    ("pgd20", {"step_size": 2}, r"step_size=2 is out of range \(0, 1\].*did you mean 2/255\?"),
    ("fgsm", {"step_size": "two"}, r"step_size='two' is not a number"),
    ("pgd20", {"steps": 2.5}, r"steps=2.5 must be a whole number"),
    ("apgd-ce", {"n_iter": "ten"}, r"n_iter='ten' is not a number"),
    ("square", {"n_queries": 0}, r"n_queries=0 must be at least 1"),
    ("square", {"p_init": 1.5}, r"p_init=1.5 must be \(0, 1\]"),
    ("autoattack", {"square": {"rescale_schedule": "no"}}, r"\(square\): rescale_schedule='no'"),
    ("autoattack", {"apgd-t": {"n_targets": 0}}, r"\(apgd-t\): n_targets=0 must be at least 1"),
    ("rays", {"early_stop": "True"}, r"early_stop='True' must be True or False"),
])
def test_a_bad_setting_is_one_line_before_any_work(linear, monkeypatch, name, options, message):
    model, images, labels = linear
    calls = []
    monkeypatch.setattr(model, "forward", lambda x: calls.append(1) or nn.Sequential.forward(model, x))
    with pytest.raises(ConfigError, match=f"^attack {name!r}.*{message}"):
        run(model, images, labels, name, options)
    assert not calls  # refused before the clean pass


def test_settings_written_as_text_are_parsed_and_recorded_as_they_ran(linear):
    model, images, labels = linear
    text = run(model, images, labels, "pgd20", {"step_size": "2/255", "steps": "5", "random_init": False})
    plain = run(model, images, labels, "pgd20", {"step_size": 2 / 255, "steps": 5})
    assert text["attacks"]["pgd20"]["settings"] == plain["attacks"]["pgd20"]["settings"]
    assert text["attacks"]["pgd20"]["settings"]["steps"] == 5 and text["attacks"]["pgd20"]["robust"] == \
        plain["attacks"]["pgd20"]["robust"]
    record = run(model, images, labels, "apgd-ce", {"n_iter": "3"})
    assert record["attacks"]["apgd-ce"]["settings"]["n_iter"] == 3


def test_every_public_attack_checks_its_keyword_settings(linear):
    model, images, labels = linear
    x = images.float() / 255
    calls = [(pgd, {"random_init": "False"}), (pgd, {"step_size": 3}), (fgsm, {"step_size": 2}),
             (square, {"n_queries": "0"}), (apgd_t, {"n_iter": 0}), (fab_t, {"n_targets": 1.5}),
             (rays, {"early_stop": "yes"}), (autoattack, {"max_rows": 0}), (autoattack, {"max_rows": -4}),
             (autoattack, {"channels_last": "False"})]
    for attack, options in calls:
        with pytest.raises(ConfigError, match=f"^{attack.__name__}: {next(iter(options))}="):
            attack(model, x, labels, eps=8 / 255, **options)
    # numbers as text work as they do for eps; pgd's own steps=0 stays allowed (the start point itself)
    assert torch.equal(pgd(model, x, labels, eps="8/255", step_size="2/255", steps="3", random_init=False),
                       pgd(model, x, labels, eps=8 / 255, step_size=2 / 255, steps=3, random_init=False))
    assert torch.equal(pgd(model, x, labels, eps=8 / 255, steps=0, random_init=False), x)


def test_autoattack_details_show_the_targets_that_ran_on_a_few_class_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).eval()
    x = torch.rand(8, 3, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    result = autoattack(model, x, y, eps=1 / 255, return_details=True,
                        options={"apgd-t": {"n_iter": 2}, "fab-t": {"n_iter": 2}, "square": {"n_queries": 5}})
    assert result.settings["apgd-t"]["n_targets"] == 2 and result.settings["fab-t"]["n_targets"] == 2  # was 9
    assert result.settings["apgd-t"]["loss"] == "ce-targeted"  # the targeted DLR needs 4 classes


def test_inference_mode_is_one_line_where_gradients_are_needed_and_fine_where_not(linear):
    model, images, labels = linear
    x = images.float() / 255
    with torch.inference_mode():
        for where, call in (("evaluate", lambda: evaluate(model, (images, labels), "pgd20", eps=8 / 255,
                                                          progress=False)),
                            ("pgd", lambda: pgd(model, x, labels, eps=8 / 255)),
                            ("autoattack", lambda: autoattack(model, x, labels, eps=8 / 255, version="fast")),
                            ("method fast_at", lambda: create("fast_at")(model, x, labels)),
                            ("sanity_checks", lambda: sanity_checks(model, (images, labels), eps=8 / 255))):
            with pytest.raises(ConfigError, match=f"^{where}: called inside torch.inference_mode\\(\\)"):
                call()
        record = evaluate(model, (images, labels), ["clean", "square"], eps=8 / 255, progress=False,
                          attack_options={"square": {"n_queries": 10}})
    assert record["clean_acc"] == 1.0  # gradient-free evaluations still run there
    with torch.no_grad():  # lifted by the attacks themselves
        assert evaluate(model, (images, labels), "pgd20", eps=8 / 255, progress=False)["robust_acc"] < 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_cuda_device_without_cuda_is_one_line(linear):
    model, images, labels = linear
    for where, call in (("evaluate", lambda d: evaluate(model, (images, labels), "clean", eps=8 / 255, device=d,
                                                         progress=False)),
                        ("sanity_checks", lambda d: sanity_checks(model, (images, labels), eps=8 / 255, device=d))):
        with pytest.raises(ConfigError, match=f"^{where}: device='cuda' asked for CUDA but no GPU is visible"):
            call("cuda")
        with pytest.raises(ConfigError, match=f"^{where}: device='gpu' is not a device"):
            call("gpu")


def test_an_eps_tensor_of_many_values_is_one_short_line():
    with pytest.raises(ConfigError) as info:
        parse_number(torch.full((200,), 8 / 255), name="eps")
    assert str(info.value) == ("eps is a Tensor of shape [200]: give one number (a Python float, a 0-dim tensor "
                               "or .item()); one value per example is not supported")
    assert parse_number(torch.tensor([0.5]), name="eps") == 0.5


def test_unambiguous_flag_values_pass_and_the_message_names_the_type(linear):
    """numpy 2 names its bool type "bool": np.True_ was refused as "not a bool"."""
    import numpy as np

    model, images, labels = linear
    x = images.float() / 255
    reference = pgd(model, x, labels, eps=8 / 255, random_init=False, steps=2)
    for value in (np.False_, np.bool_(False), torch.tensor(False), 0):
        assert torch.equal(pgd(model, x, labels, eps=8 / 255, random_init=value, steps=2), reference)
    for value, kind in ((None, "NoneType"), (2, "int"), (torch.tensor([True, False]), "torch.Tensor")):
        with pytest.raises(ConfigError, match=rf"random_init=.* must be True or False \(got type {kind}\)$"):
            pgd(model, x, labels, eps=8 / 255, random_init=value)


def test_the_library_never_refuses_a_step_size_it_computed_itself(linear):
    """pgd_accuracy(eps=0.5, steps=1) computed a default l_inf step of 1.25 and then refused it."""
    from fastrobust.evaluate import default_step, pgd_accuracy

    model, images, labels = linear
    x = images.float() / 255
    assert default_step(0.5, 1, "linf") == 1.0 and default_step(8 / 255, 20, "linf") == 2 / 255
    assert pgd_accuracy(model, x, labels, eps=0.5, steps=1)["step_size"] == 1.0
    assert pgd(model, x, labels, eps=0.9, steps=1).sub(x).abs().max() <= 0.9 + 1e-6


def test_pgd_default_step_follows_the_steps_that_run_and_none_means_the_default(linear):
    from fastrobust.evaluate import default_step

    model, images, labels = linear
    for options, steps in (({"steps": 5}, 5), ({"step_size": None}, 20), ({"steps": "40", "step_size": None}, 40)):
        settings = run(model, images, labels, "pgd20", options)["attacks"]["pgd20"]["settings"]
        assert settings["steps"] == steps and settings["step_size"] == default_step(8 / 255, steps, "linf")
    assert run(model, images, labels, "fgsm", {"step_size": None})["attacks"]["fgsm"]["settings"]["step_size"] == \
        8 / 255


def test_autoattack_options_in_python_are_checked_like_evaluates(linear):
    model, images, labels = linear
    x = images.float() / 255
    cheap = {"apgd-ce": {"n_iter": "2"}, "apgd-t": {"n_targets": "2", "n_iter": 2}, "fab-t": {"n_iter": 2},
             "square": {"n_queries": "5"}}
    result = autoattack(model, x, labels, eps=8 / 255, options=cheap, return_details=True)
    assert result.settings["apgd-t"]["n_targets"] == 2 and result.settings["square"]["n_queries"] == 5
    with pytest.raises(ConfigError, match=r"^autoattack \(square\): n_queries=0 must be at least 1"):
        autoattack(model, x, labels, eps=8 / 255, options={"square": {"n_queries": 0}})
    with pytest.raises(ConfigError, match=r"^autoattack: options\['square'\] must be a dict"):
        autoattack(model, x, labels, eps=8 / 255, options={"square": 5})
    with pytest.raises(ConfigError, match=r"options=5 must map components to dicts"):
        run(model, images, labels, "autoattack-fast", {"options": 5})
    assert run(model, images, labels, "autoattack-fast", {"options": None})["attacks"]["autoattack-fast"]


def test_invariance_settings_take_numbers_as_text_and_numpy_numbers(linear):
    import numpy as np

    model, images, labels = linear
    record = run(model, images, labels, "gaussian-noise", {"stds": ["2/255", np.float32(0.1)], "draws": np.int64(2)})
    assert record["attacks"]["gaussian-noise"]["settings"] == {"stds": [2 / 255, pytest.approx(0.1)], "draws": 2}
    record = run(model, images, labels, "spatial", {"rotations": "3", "max_rotation": "10", "translations": 1})
    assert record["attacks"]["spatial"]["settings"]["rotations"] == 3
    with pytest.raises(ConfigError, match=r"draws=2.5 must be a whole number >= 1"):
        run(model, images, labels, "gaussian-noise", {"draws": 2.5})
