"""Ctrl-C during torch.compile's build gives the one documented line, and a compile cache left damaged by an
interrupted build does not break the next start (issue 23, point 5).

The fast tests raise the exceptions torch.compile wraps an interrupt into, and damage synthetic cache files;
the two real ones compile a tiny model in a subprocess with a private ``TORCHINDUCTOR_CACHE_DIR``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor.exc import CppCompileError

from fastrobust.analysis.sweep import run_sweep
from fastrobust.cli import main
from fastrobust.core.compiling import compile_model, damaged_cache_files, inductor_cache_dir, repair_cache
from fastrobust.errors import is_interrupt
from fastrobust.train import Trainer
from fastrobust.train.trainer import _StopFlag

from helpers import synthetic_dataset, write_image_folder

EXE = shutil.which("fastrobust") or str(Path(sys.executable).with_name("fastrobust"))
# importing inductor's compile path touches torch.jit.script_method, deprecated from torch 2.9 on
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

INTERRUPTED = "fastrobust train: interrupted"
COMPILERS = {"g++", "gcc", "c++", "cc", "clang", "clang++", "cc1plus"}


def train_argv(data: Path, out: Path) -> list[str]:
    return ["train", "--dataset", "imagefolder", "--data-root", str(data), "--model", "tinycnn", "--set",
            "model.width=4", "--method", "natural", "--device", "cpu", "--epochs", "1", "--batch-size", "8",
            "--val-size", "8", "--set", "val_pgd_steps=1", "--set", "test_pgd_steps=1", "--seed", "0",
            "--out", str(out), "--compile", "--quiet"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compile_data")
    write_image_folder(root, ["a", "b"], {"train": 16, "test": 4})
    return root


def wrapped_in_compile(error: BaseException) -> BackendCompilerFailed:
    """``error`` as torch.compile's build hands it on: raised inside the backend, wrapped by dynamo."""
    try:
        try:
            raise error
        except BaseException as inner:
            raise RuntimeError("inductor failed while it handled that") from inner
    except RuntimeError as outer:
        return BackendCompilerFailed(lambda: None, outer, None)


def killed_compiler(returncode: int) -> CppCompileError:
    """The compile error inductor raises when its C++ compiler dies with ``returncode``."""
    try:
        raise subprocess.CalledProcessError(returncode, ["g++", "kernel.cpp"])
    except subprocess.CalledProcessError as died:
        try:
            raise CppCompileError(["g++", "kernel.cpp"], "") from died
        except CppCompileError as error:
            return error


# ----------------------------------------------------------------------------- an interrupt, however wrapped
def test_an_interrupt_is_found_anywhere_in_the_chain():
    assert is_interrupt(KeyboardInterrupt())
    assert is_interrupt(wrapped_in_compile(KeyboardInterrupt()))
    assert is_interrupt(killed_compiler(-signal.SIGINT))
    assert is_interrupt(killed_compiler(-signal.SIGTERM))
    assert is_interrupt(BackendCompilerFailed(lambda: None, killed_compiler(-signal.SIGINT), None))


def test_a_real_failure_is_not_taken_for_an_interrupt():
    assert not is_interrupt(wrapped_in_compile(ValueError("a real bug")))
    assert not is_interrupt(killed_compiler(1))  # the compiler refused the code: a real compile error
    assert not is_interrupt(BackendCompilerFailed(lambda: None, killed_compiler(-signal.SIGSEGV), None))


@pytest.mark.parametrize("error", [wrapped_in_compile(KeyboardInterrupt()),
                                   BackendCompilerFailed(lambda: None, killed_compiler(-signal.SIGINT), None)],
                         ids=["keyboard-interrupt-wrapped", "compiler-killed-by-sigint"])
def test_cli_prints_the_one_line_for_an_interrupt_inside_the_compile(image_folder, tmp_path, monkeypatch, capsys,
                                                                     one_thread, error):
    steps = []

    def interrupted_compile(self, x, y):  # the first step is where torch.compile builds
        steps.append(self.forward_model)
        raise error

    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(Trainer, "_step", interrupted_compile)
    run = tmp_path / "run"
    code = main(train_argv(image_folder, run))
    out, err = capsys.readouterr()
    assert code == 130
    assert err.strip() == INTERRUPTED and out == ""
    assert hasattr(steps[0], "_orig_mod")  # the run did compile its model
    assert (run / "config.json").is_file() and not list((run / "checkpoints").glob("step-*/state.json"))


def test_cli_still_reports_a_real_compile_failure(image_folder, tmp_path, monkeypatch, one_thread):
    def failing_compile(self, x, y):
        raise wrapped_in_compile(ValueError("a real bug"))

    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(Trainer, "_step", failing_compile)
    with pytest.raises(BackendCompilerFailed):
        main(train_argv(image_folder, tmp_path / "run"))



def test_a_sweep_run_interrupted_inside_the_compile_is_interrupted_not_failed(tmp_path, monkeypatch, one_thread):
    def interrupted_compile(self, x, y):
        raise wrapped_in_compile(KeyboardInterrupt())

    spec = {"base": {"model": "tinycnn", "model_params": {"width": 4}, "dataset": "synthetic", "epochs": 1,
                     "batch_size": 64, "device": "cpu", "compile": True},
            "grid": {"method": ["natural"], "seed": [0, 1]}}
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(Trainer, "_step", interrupted_compile)
    with pytest.raises(BackendCompilerFailed):  # the sweep stops (the CLI prints the one line)
        run_sweep(spec, tmp_path / "sweep", dataset_loader=lambda config: synthetic_dataset(train=64, val=16, test=16),
                  progress=False, log=lambda _line: None)
    runs = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"]
    assert [run["status"] for run in runs] == ["interrupted", "pending"]

# ----------------------------------------------------------------------------- a damaged compile cache
OUTPUT_CODE = textwrap.dedent('''\
    # AOT ID: ['0_forward']
    import torch


    def call(args):
        return args


    if __name__ == "__main__":
        from torch._inductor.wrapper_benchmark import compiled_module_main
        compiled_module_main('None', lambda times, repeat: 0.0)
    ''')


def write_cache(folder: Path) -> dict[str, Path]:
    """A cache folder with one complete file of each kind and the same files cut short."""
    elf = Path(sys.executable).resolve().read_bytes()  # a complete ELF file (a .so is ELF too)
    entry = pickle.dumps({"graph": list(range(100))}, protocol=4)  # a compiled-graph entry is one pickle
    files = {
        "module": ("ab/complete.py", OUTPUT_CODE.encode()),
        "helper": ("ab/helper.py", b"x = 1\n"),  # not inductor output code: parsing is all that is checked
        "library": ("cd/complete.so", elf),
        "module_cut_at_a_line": ("ef/cut_line.py", OUTPUT_CODE.encode()[:OUTPUT_CODE.index("def call")]),
        "module_cut_mid_line": ("ef/cut_mid.py", OUTPUT_CODE.encode()[:OUTPUT_CODE.index("(args)")]),
        "library_cut": ("gh/cut.so", elf[: len(elf) // 2]),
        "library_empty": ("gh/empty.so", b""),
        "graph": ("fxgraph/ij/fij/complete", entry),
        "graph_cut": ("aotautograd/akl/cut", entry[:-20]),
    }
    paths = {}
    for name, (relative, data) in files.items():
        paths[name] = folder / relative
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        paths[name].write_bytes(data)
    return paths


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the library check reads ELF files (Linux)")
def test_damaged_cache_files_are_the_cut_ones(tmp_path):
    paths = write_cache(tmp_path)
    damaged = {name for name, path in paths.items() if path in damaged_cache_files(tmp_path)}
    assert damaged == {"module_cut_at_a_line", "module_cut_mid_line", "library_cut", "library_empty", "graph_cut"}
    assert damaged_cache_files(tmp_path / "missing") == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the library check reads ELF files (Linux)")
def test_the_compile_door_removes_damaged_files_and_says_so_in_one_line(tmp_path, monkeypatch):
    paths = write_cache(tmp_path)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert inductor_cache_dir() == tmp_path
    lines: list[str] = []
    model = compile_model(torch.nn.Linear(2, 2), lines.append)
    assert hasattr(model, "_orig_mod")
    assert len(lines) == 1 and str(tmp_path) in lines[0] and "removed 5 damaged file(s)" in lines[0]
    assert {name for name, path in paths.items() if path.exists()} == {"module", "helper", "library", "graph"}
    assert repair_cache(tmp_path, lines.append) == [] and len(lines) == 1  # nothing left to say



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the library check reads ELF files (Linux)")
def test_a_damaged_file_that_cannot_be_removed_is_named_in_the_line(tmp_path, monkeypatch):
    paths = write_cache(tmp_path)
    unlink = Path.unlink

    def refused(self, missing_ok=False):  # another user's cache folder
        if self == paths["library_cut"]:
            raise PermissionError(13, "Permission denied", str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    lines: list[str] = []
    removed = repair_cache(tmp_path, lines.append)
    assert len(removed) == 4 and paths["library_cut"].exists()
    assert len(lines) == 1 and "removed 4 damaged file(s)" in lines[0] and "could not remove 1" in lines[0]
    assert "TORCHINDUCTOR_CACHE_DIR" in lines[0]

# ----------------------------------------------------------------------------- real compiles (subprocesses)
COMPILE_TINYCNN = textwrap.dedent("""\
    import sys
    import torch
    from fastrobust.core.compiling import compile_model
    from fastrobust.models import create

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = compile_model(create("tinycnn", width=4, num_classes=2, in_channels=3, image_size=8),
                          lambda line: print(line, file=sys.stderr))
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    print("compiled and ran")
    """)


def run_compile(cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", COMPILE_TINYCNN], env=env, capture_output=True, text=True,
                          check=False, timeout=600)


@pytest.mark.slow
def test_a_real_cache_cut_short_does_not_break_the_next_start(tmp_path):
    cache = tmp_path / "inductor"
    first = run_compile(cache)
    assert first.returncode == 0 and "compiled and ran" in first.stdout, first.stderr[-3000:]
    modules = [path for path in cache.rglob("*.py") if path.read_bytes().startswith(b"# AOT ID:")]
    assert modules, "inductor wrote no output code"
    for path in modules:  # cut at a line end: it still parses, and torch's next import of it fails
        source = path.read_bytes()
        path.write_bytes(source[: source.index(b"\n", len(source) // 3) + 1])
    second = run_compile(cache)
    assert second.returncode == 0 and "compiled and ran" in second.stdout, second.stderr[-3000:]
    notes = [line for line in second.stderr.splitlines() if "torch.compile cache" in line]
    assert len(notes) == 1 and f"removed {len(modules)} damaged file(s)" in notes[0]
    assert all(path.read_bytes().rstrip().endswith(b")") for path in modules)  # rebuilt whole


def compiler_running(pid: int) -> bool:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return False
    names = set()
    for child in children:
        try:
            names.add(Path(f"/proc/{child}/comm").read_text().strip())
        except OSError:
            continue
    return bool(names & COMPILERS)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the compiler process through /proc (Linux)")
@pytest.mark.skipif(not any(shutil.which(name) for name in ("g++", "c++", "clang++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_ctrl_c_during_a_real_compile_prints_one_line(image_folder, tmp_path):
    """Ctrl-C at a terminal reaches the whole process group (the C++ compiler too); a user who sees no reaction
    presses it again."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), OMP_NUM_THREADS="1",
               FASTROBUST_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    process = subprocess.Popen([EXE, *train_argv(image_folder, tmp_path / "run")], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while not compiler_running(process.pid) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None and compiler_running(process.pid), "no compiler process was seen"
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(1)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert (out + err).strip() == INTERRUPTED


def test_a_step_that_fails_after_a_ctrl_c_is_the_interrupt():
    # a Ctrl-C at a terminal also kills torch.compile's compiler probe, which then fails as "no working C++
    # compiler": with a SIGINT received, a failure that escapes the training loop is the user's stop
    with pytest.raises(KeyboardInterrupt) as stopped:
        with _StopFlag() as stop:
            stop.signal = signal.SIGINT
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
    assert isinstance(stopped.value.__cause__, RuntimeError) and is_interrupt(stopped.value)
    with pytest.raises(RuntimeError):  # without a signal a failure stays what it is
        with _StopFlag():
            raise RuntimeError("a real bug")
