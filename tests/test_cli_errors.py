"""Bad input everywhere: property-based tests of number parsing, presets and the command line.

Every user-facing failure must be a FastRobustError (ConfigError for values) that the CLI prints as ONE line
with a non-zero exit; nothing typed by a user is ever evaluated. The CLI fuzz calls ``fastrobust.cli.main``
in-process with argument lists that always end in a value that cannot work (an unknown dataset, a missing
checkpoint, a missing data root), so no example ever starts training, evaluation or a download.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from fastrobust.cli import main
from fastrobust.core.values import check_eps, check_nonnegative_int, check_positive_int, parse_number
from fastrobust.errors import ConfigError, FastRobustError
from fastrobust.train import TrainConfig, resolve_device
from fastrobust.train.presets import available_presets, load_preset, make_config, parse_assignments

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

CODE = [
    "__import__('os').system('touch {marker}')",
    "eval('1')",
    "exec('import os')",
    "open('{marker}', 'w')",
    "(lambda: 1)()",
    "8/255 if True else 0",
    "1+1",
    "2**8",
    "8*1/255",
    "8/255/2",
    "1_000",
    "0x10",
    "nan",
    "inf",
    "-inf",
    "1e999",
    "0/0",
    "8/0",
    "",
    "   ",
    "8/",
    "/255",
    "8 255",
    "None",
    "True",
    "[8, 255]",
    "{{'eps': 1}}",
    "8/255; import os",
    "8/255\x00",
]


# ----------------------------------------------------------------------------- numbers
@FAST
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_decimal_text_round_trips(x):
    assert parse_number(repr(x)) == x
    assert parse_number(f"  {x!r}\t") == x
    assert parse_number(x) == x


@FAST
@given(st.integers(-10**6, 10**6), st.integers(1, 10**6), st.sampled_from(["{a}/{b}", " {a} / {b} ", "{a}.0/{b}"]))
def test_fractions_round_trip(a, b, template):
    assert parse_number(template.format(a=a, b=b)) == pytest.approx(a / b, rel=1e-15)


@FAST
@given(st.integers(1, 255))
@example(8)
def test_eps_in_255ths_is_accepted_and_out_of_range_rejected(k):
    assert check_eps(f"{k}/255") == k / 255
    assert check_eps(k / 255) == k / 255
    if k > 1:
        with pytest.raises(ConfigError, match=f"did you mean {k}/255"):
            check_eps(str(k))
    with pytest.raises(ConfigError, match="out of range"):
        check_eps(f"-{k}/255")


@FAST
@given(st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not 0 < v <= 1))
def test_eps_outside_unit_interval_is_a_config_error(value):
    with pytest.raises(ConfigError):
        check_eps(value)


@FAST
@given(st.one_of(st.text(max_size=40), st.sampled_from(CODE), st.binary(max_size=20).map(lambda b: b.decode("latin1"))))
def test_arbitrary_text_parses_or_is_a_config_error_and_nothing_runs(text):
    try:
        value = parse_number(text, name="eps")
    except ConfigError as error:
        assert "\n" not in str(error) or "\n" in text  # the message quotes the value with repr
        return
    assert isinstance(value, float) and math.isfinite(value)
    # accepted text is only digits, signs, a point, an exponent, a slash and blanks: no names, no calls
    assert not re.search(r"[A-DF-Za-df-z_()\[\]'\"*%]", text), text


@pytest.mark.parametrize("template", CODE)
def test_code_is_never_evaluated(tmp_path, template):
    marker = tmp_path / "marker"
    text = template.format(marker=marker)
    with pytest.raises(ConfigError):
        parse_number(text)
    with pytest.raises(ConfigError):
        check_eps(text)
    if text != "1_000":  # int() reads Python's digit separators: harmless, nothing is evaluated
        with pytest.raises(ConfigError):
            check_positive_int(text, name="epochs")
    assert not marker.exists()


@FAST
@given(st.one_of(st.text(max_size=20), st.integers(-10**30, 10**30), st.floats(), st.none(), st.booleans()))
def test_integer_checks_accept_whole_numbers_or_raise_config_error(value):
    for check in (check_positive_int, check_nonnegative_int):
        try:
            number = check(value, name="epochs")
        except ConfigError:
            continue
        assert isinstance(number, int) and number >= (1 if check is check_positive_int else 0)


# ----------------------------------------------------------------------------- presets, --set and TrainConfig
_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(), st.text(max_size=15),
    st.sampled_from(["8/255", "1e-3", "0", "-1", "yes", "null", "2.5", "__import__('os')"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@FAST
@given(st.dictionaries(st.sampled_from(_FIELDS), _VALUES, min_size=1, max_size=6))
def test_make_config_and_validate_only_raise_config_errors(settings_):
    try:
        config = make_config(settings_)
        config.validate()
    except FastRobustError as error:
        assert str(error)
        return
    # what was accepted is typed as the dataclass says
    assert isinstance(config.epochs, int) and config.epochs > 0
    assert isinstance(config.lr, float) and config.lr > 0 and math.isfinite(config.lr)
    assert config.eps is None or 0 < config.eps <= 1


@FAST
@given(st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda k: k not in _FIELDS), _VALUES, min_size=1, max_size=3))
def test_unknown_settings_are_named(settings_):
    with pytest.raises(ConfigError, match="unknown setting"):
        make_config(settings_)


@FAST
@given(st.lists(st.text(max_size=25), max_size=5))
def test_parse_assignments_never_crashes(items):
    try:
        settings_ = parse_assignments(items)
    except ConfigError as error:
        assert "key=value" in str(error)
        assert any("=" not in item for item in items)
        return
    assert all("=" in item for item in items)
    try:
        make_config(settings_).validate()
    except FastRobustError:
        pass


def test_model_keyword_values_are_typed_never_constructed():
    settings_ = parse_assignments(["model.width=8", "model.flag=true", "model.d=2001-13-01",
                                   "model.x=!!python/object/apply:os.system ['true']", "method.beta=6", "epochs=2"])
    assert settings_["model_params"] == {"width": 8, "flag": True, "d": "2001-13-01",
                                         "x": "!!python/object/apply:os.system ['true']"}
    assert settings_["method_params"] == {"beta": "6"} and settings_["epochs"] == "2"


@FAST
@given(st.text(max_size=60))
@example("a: 2001-13-01")
@example("epochs: !!int 'x'")
@example("lr: !!float 'x'")
@example("a: &a [*a]")
@example("- 1\n- 2")
@example("method: [")
def test_any_preset_file_loads_or_is_a_config_error(tmp_path, text):
    path = tmp_path / "preset.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        settings_ = load_preset(str(path))
    except ConfigError as error:
        assert "\n" not in str(error)
        return
    try:
        make_config(settings_).validate()
    except FastRobustError:
        pass


def test_yaml_code_tags_are_refused_and_run_nothing(tmp_path):
    marker = tmp_path / "marker"
    for tag in ("!!python/object/apply:os.system", "!!python/object/new:os.system"):
        path = tmp_path / "evil.yaml"
        path.write_text(f"epochs: 1\nlr: {tag} ['touch {marker}']\n")
        with pytest.raises(ConfigError, match="not valid YAML"):
            load_preset(str(path))
    assert not marker.exists()


def test_every_shipped_preset_builds_a_valid_config():
    for name in available_presets():
        make_config(load_preset(name)).validate()


@FAST
@given(st.text(max_size=20))
@example("meta")
@example("xla")
@example("cuda:x")
@example("cpu:-1")
@example("auto")
@example("cuda")
def test_device_names_resolve_or_are_config_errors(name):
    """A name resolves to a device this machine has, or is a ConfigError: `auto` is the GPU when torch sees one
    (the same test passes on a CPU machine and on a GPU machine)."""
    try:
        device = resolve_device(name)
    except ConfigError:
        assert name != "auto" and not (name == "cuda" and torch.cuda.is_available())
        return
    here = {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())
    assert device.type in here
    if name == "auto":
        assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- the command line
@pytest.fixture
def sandbox(tmp_path_factory, monkeypatch):
    """An empty working folder (run folders land here) and no shared data root to fall back on."""
    folder = tmp_path_factory.mktemp("cli")
    monkeypatch.chdir(folder)
    monkeypatch.setenv("FASTROBUST_DATA", str(folder / "no-data"))
    monkeypatch.setenv("FASTROBUST_CACHE", str(folder / "cache"))
    return folder


def run_cli(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_failure(code, err, argv):
    assert code not in (0, None), argv
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, f"no reason printed for {argv}"
    if code == 2 and lines[-1].startswith("fastrobust") and ": error: " in lines[-1] and "usage:" not in err:
        assert len(lines) == 1, f"our error must be one line: {err!r}"  # FastRobustError from a command


_NEGATIVE = re.compile(r"-\d+(\.\d*)?([eE][+-]?\d+)?(/\d+)?")


def _value(text: str) -> bool:
    """A value argparse will not read as an option (so that no example turns into --help)."""
    return not text.startswith("-") or bool(_NEGATIVE.fullmatch(text))


_BAD = st.one_of(
    st.sampled_from(["0", "-1", "1.5", "abc", "8/0", "nan", "inf", "1e999", "__import__('os')", "", " ", "8/255",
                     "2001-13-01", "cuda:7", "meta", "rollback", "stop", "restore", "piecewise", "tinycnn", "x=y"]),
    st.text(alphabet=string.printable, max_size=12),
).filter(_value)

_TRAIN_FLAGS = ["--method", "--model", "--activation", "--epochs", "--batch-size", "--lr", "--schedule", "--eps",
                "--train-subset", "--test-subset", "--val-size", "--seed", "--device", "--amp", "--channels-last",
                "--on-nan", "--on-collapse", "--checkpoint-every", "--set", "--preset", "--data-root"]


@FAST
@given(st.lists(st.tuples(st.sampled_from(_TRAIN_FLAGS), _BAD), max_size=6),
       st.sampled_from([["--dataset", "no-such-dataset"], ["--resume", "no-such-run"],
                        ["--dataset", "imagefolder", "--data-root", "missing-folder"]]))
def test_train_with_bad_arguments_fails_with_one_line(sandbox, capsys, pairs, ending):
    argv = ["train", "--quiet", *[token for pair in pairs for token in pair], *ending]
    assume(not any(flag == "--set" and value.split("=")[0].strip().replace("-", "_") in ("dataset", "data_root")
                   for flag, value in pairs))
    code, _, err = run_cli(argv, capsys)
    assert_clean_failure(code, err, argv)


_EVAL_FLAGS = ["--dataset", "--data-root", "--eps", "--norm", "--test-subset", "--batch-size", "--device", "--queries",
               "--seed", "--attack", "--model", "--out", "--state"]


@FAST
@given(st.lists(st.tuples(st.sampled_from(_EVAL_FLAGS), _BAD), max_size=6),
       st.sampled_from(["missing.safetensors", "missing.pt", "missing-run", "corrupt.safetensors", "evil.pt"]))
def test_eval_with_bad_arguments_fails_with_one_line(sandbox, capsys, pairs, checkpoint):
    (sandbox / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    (sandbox / "evil.pt").write_bytes(b"cos\nsystem\n(Vtouch marker\ntR.")
    argv = ["eval", "--quiet", "--dataset", "cifar10", *[token for pair in pairs for token in pair],
            "--checkpoint", checkpoint, "--model", "tinycnn"]
    code, _, err = run_cli(argv, capsys)
    assert_clean_failure(code, err, argv)
    assert not (sandbox / "marker").exists()


@FAST
@given(st.one_of(st.sampled_from(["cifar10", "mnist", "svhn", "imagefolder", "tiny-imagenet"]), _BAD),
       st.lists(st.tuples(st.sampled_from(["--val-size", "--cache-dir", "--json"]), _BAD), max_size=4))
def test_data_with_bad_arguments_fails_with_one_line(sandbox, capsys, name, pairs):
    argv = ["data", name, *[token for pair in pairs for token in pair], "--root", str(sandbox / "nowhere")]
    code, _, err = run_cli(argv, capsys)
    assert_clean_failure(code, err, argv)


@FAST
@given(st.sampled_from(["methods", "models"]),
       st.lists(st.text(alphabet=string.printable, min_size=1, max_size=10), min_size=1, max_size=3))
def test_listing_commands_reject_extra_arguments(sandbox, capsys, command, extra):
    assume(not any(t.startswith("-") and any(o.startswith(t) for o in ("--json", "--help", "-h")) for t in extra))
    argv = [command, *extra]
    code, _, err = run_cli(argv, capsys)
    assert_clean_failure(code, err, argv)


@pytest.mark.parametrize("argv, reason", [
    (["train", "--eps", "__import__('os').system('true')", "--dataset", "x"], "is not a number"),
    (["train", "--eps", "8", "--dataset", "x"], "did you mean 8/255"),
    (["train", "--epochs", "0", "--dataset", "x"], "epochs=0 must be positive"),
    (["train", "--device", "meta", "--dataset", "no-such"], "not supported"),
    (["train", "--set", "nonsense", "--dataset", "x"], "is not key=value"),
    (["train", "--set", "bogus=1", "--dataset", "x"], "unknown setting(s) bogus"),
    (["train", "--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
    (["train", "--resume", "no-such-run"], "not a fastrobust run folder"),
    (["eval", "--checkpoint", "missing.safetensors", "--dataset", "cifar10"], "does not exist"),
    (["eval", "--checkpoint", "w.pt", "--dataset", "cifar10"], "w.pt does not exist"),
    (["eval", "--checkpoint", "m.safetensors", "--dataset", "cifar10", "--eps", "8/0"], "divides by zero"),
    (["data", "nosuch", "--root", "."], "unknown dataset 'nosuch'"),
])
def test_known_bad_commands_print_one_line_reason(sandbox, capsys, argv, reason):
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and reason in err, err


# ----------------------------------------------------------------------------- argparse errors: one line
@pytest.mark.parametrize("argv, prog, reason", [
    (["eval", "--attack", "autoatack"], "fastrobust eval",
     "argument --attack: invalid choice 'autoatack' (did you mean 'autoattack'?)"),
    (["trian"], "fastrobust", "argument COMMAND: invalid choice 'trian' (did you mean 'train'?)"),
    (["train", "--no-such-flag"], "fastrobust train", "unrecognized arguments: --no-such-flag"),
    (["eval", "--dataset", "cifar10"], "fastrobust eval", "the following arguments are required: --checkpoint"),
])
def test_argument_errors_are_one_line_with_a_suggestion(sandbox, capsys, argv, prog, reason):
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.strip() == f"{prog}: error: {reason}; see {prog} --help", err


@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_negative_fraction_is_read_as_the_value_of_eps(sandbox, capsys, command):
    """``--eps -8/255`` reaches the value check (eps must be positive), not argparse's "expected one argument"."""
    extra = ["--dataset", "cifar10", "--plan"] if command == "train" else ["--checkpoint", "m.safetensors",
                                                                            "--dataset", "cifar10"]
    code, _, err = run_cli([command, "--eps", "-8/255", *extra], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "expected one argument" not in err and "out of range (0, 1]" in err, err


def test_an_unknown_preset_suggests_the_closest_in_one_short_line(sandbox, capsys):
    code, _, err = run_cli(["train", "--preset", "speedrn"], capsys)
    assert code == 2 and err.strip() == (
        "fastrobust train: error: unknown preset 'speedrn' (did you mean 'speedrun'?): give a YAML file or a "
        "shipped preset's name (fastrobust train --list-presets lists them)"), err
