"""Distributed training and evaluation (gloo on CPU): N ranks give the one-process result.

In-process tests spawn two ranks with torch.multiprocessing; the torchrun tests (two "nodes" on localhost,
a killed rank restarted by --max-restarts) run the CLI in subprocesses on a tiny image folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from fastrobust.data import Dataset
from fastrobust.core.distributed import strip_nproc, torchrun_command
from fastrobust.evaluate import evaluate, pgd_accuracy
from fastrobust.models import create as create_model
from fastrobust.train import TrainConfig, Trainer, resume

from helpers import synthetic_dataset, synthetic_split

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dataset16() -> Dataset:
    """16x16 synthetic images: smallcnn (no BatchNorm, dropout 0) needs at least 16 pixels."""
    return Dataset(
        name="synthetic16", num_classes=4, image_shape=(3, 16, 16),
        train=synthetic_split(73, 4, 0, size=16), val=synthetic_split(24, 4, 1, size=16),
        test=synthetic_split(20, 4, 2, size=16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
        crop_padding=2, flip=True, source="synthetic", class_names=None,
    )


def train_config(out: Path, method: str, **overrides) -> TrainConfig:
    settings = dict(method=method, model="smallcnn", model_params={"dropout": 0.0}, dataset="synthetic16",
                    epochs=1, batch_size=16, lr=0.05, schedule="constant", val_pgd_steps=1, test_pgd_steps=1,
                    eval_batch_size=7, out=str(out), device="cpu", seed=3)
    settings.update(overrides)
    return TrainConfig(**settings)


def _spawned(rank: int, world_size: int, port: int, job: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        globals()[job](rank, *args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def spawn(job: str, *args, world_size: int = 2) -> None:
    mp.spawn(_spawned, args=(world_size, free_port(), job, args), nprocs=world_size, join=True)


# ---- jobs run by every rank (module level: spawn pickles them by name) ----------------------------------
def _train_job(rank: int, runs: list[tuple[str, str, dict]]) -> None:
    for out, method, overrides in runs:
        trainer = Trainer(train_config(Path(out), method, **overrides), dataset=dataset16(), progress=False,
                          log=lambda _message: None)
        trainer.fit()
        if rank == 0:
            (Path(out) / "reductions.txt").write_text(str(trainer.grad_sync.reductions))


def _eval_job(rank: int, folder: str) -> None:
    from fastrobust.core.distributed import setup

    setup("cpu")
    torch.manual_seed(0)
    model = create_model("tinycnn", num_classes=4, image_size=8).eval()
    data = synthetic_dataset(test=37)
    record = evaluate(model, data.test, ["pgd20", "square", "rays"], eps=8 / 255, batch_size=8, progress=False,
                      seed=5, attack_options={"pgd20": {"steps": 3}, "square": {"n_queries": 15},
                                              "rays": {"n_queries": 30}},
                      state_file=Path(folder) / "state.json", distributed=True)
    quick = pgd_accuracy(model, data.test.images, data.test.labels, eps=8 / 255, steps=2, batch_size=6,
                         distributed=True)
    (Path(folder) / f"record{rank}.json").write_text(json.dumps({"record": record, "pgd": quick}))


# ---- in-process tests ---------------------------------------------------------------------------------
def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last.safetensors"))


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=lambda m: f"{key}: {m}")


def test_two_ranks_train_like_one_process_and_resume_on_one_rank(tmp_path):
    # 73 images, global batch 16: four full batches and a short last one of 9 (uneven shards of 5 and 4)
    runs = [(str(tmp_path / "nat2"), "natural", {}),
            (str(tmp_path / "bs2"), "backward_smoothing", {"method_params": {"gamma": 0.0, "beta": 6.0}})]
    spawn("_train_job", runs)
    quiet = dict(progress=False, log=lambda _message: None)
    for name, method, params in (("nat", "natural", {}), ("bs", "backward_smoothing", {"gamma": 0.0, "beta": 6.0})):
        one = Trainer(train_config(tmp_path / f"{name}1", method, method_params=params), dataset=dataset16(), **quiet)
        single = one.fit()
        assert_close_weights(final_weights(tmp_path / f"{name}2"), final_weights(tmp_path / f"{name}1"))
        record = json.loads((tmp_path / f"{name}2" / "result.json").read_text())
        assert record["world_size"] == 2 and record["test"]["n"] == single["test"]["n"] == 20
        lines = [json.loads(line) for line in (tmp_path / f"{name}2" / "metrics.jsonl").read_text().splitlines()]
        reference = [json.loads(line) for line in (tmp_path / f"{name}1" / "metrics.jsonl").read_text().splitlines()]
        assert lines[0]["train_images"] == reference[0]["train_images"] == 73
        assert lines[0]["train_loss"] == pytest.approx(reference[0]["train_loss"], rel=1e-5)
    # one reduction per backward: TRADES forwards clean and adversarial batches, then one backward
    assert (tmp_path / "bs2" / "reductions.txt").read_text() == "5"
    # only rank 0 wrote: one metrics line per epoch, one checkpoint folder per epoch end
    state = json.loads(next((tmp_path / "nat2" / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["world_size"] == 2 and state["global_step"] == 5

    # the 2-rank checkpoint resumes on one rank: epoch 2 continues the global state exactly
    resumed = resume(tmp_path / "nat2", overrides={"epochs": 2}, dataset=dataset16(), **quiet)
    straight = Trainer(train_config(tmp_path / "nat_straight", "natural", epochs=2), dataset=dataset16(), **quiet).fit()
    assert resumed["best_epoch"] is not None and straight["test"]["n"] == resumed["test"]["n"]
    assert_close_weights(final_weights(tmp_path / "nat2"), final_weights(tmp_path / "nat_straight"))
    lines = (tmp_path / "nat2" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_sharded_evaluation_equals_one_process_exactly(tmp_path):
    spawn("_eval_job", str(tmp_path))
    torch.manual_seed(0)
    model = create_model("tinycnn", num_classes=4, image_size=8).eval()
    data = synthetic_dataset(test=37)
    single = evaluate(model, data.test, ["pgd20", "square", "rays"], eps=8 / 255, batch_size=8, progress=False,
                      seed=5, attack_options={"pgd20": {"steps": 3}, "square": {"n_queries": 15},
                                              "rays": {"n_queries": 30}})
    quick = pgd_accuracy(model, data.test.images, data.test.labels, eps=8 / 255, steps=2, batch_size=6)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"record{rank}.json").read_text())
        record = got["record"]
        assert got["pgd"] == quick
        for key in ("n", "clean_correct", "robust", "clean_acc", "robust_acc"):
            assert record[key] == single[key], key
        for name in ("pgd20", "square", "rays"):
            for key in ("robust", "broken", "queries_mean", "adbd", "no_boundary_found"):
                assert record["attacks"][name].get(key) == single["attacks"][name].get(key), (name, key)
        assert record["world_size"] == 2 and "world_size" not in single
    state = json.loads((tmp_path / "state.json").read_text())  # written by rank 0, holding every batch
    assert sorted(state["clean"], key=int) == [str(b) for b in range(5)]
    assert all(len(state["attacks"][name]["batches"]) == 5 for name in ("pgd20", "square", "rays"))


def test_nproc_command_line_goes_through_torchrun():
    argv = ["train", "--method", "natural", "--nproc", "2", "--epochs", "1", "--nproc=3"]
    assert strip_nproc(argv) == ["train", "--method", "natural", "--epochs", "1"]
    command = torchrun_command(2, strip_nproc(argv))
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in command and command[-6:] == ["fastrobust", "train", "--method", "natural", "--epochs", "1"]


# ---- torchrun subprocesses ----------------------------------------------------------------------------
def write_image_folder(root: Path) -> None:
    from PIL import Image

    data = {"train": synthetic_split(128, 4, 0), "test": synthetic_split(32, 4, 2)}
    for split, images in data.items():
        for i, (image, label) in enumerate(zip(images.images, images.labels)):
            folder = root / split / f"class{int(label)}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    from fastrobust.data import load_dataset

    root = tmp_path_factory.mktemp("folder")
    write_image_folder(root / "data")
    env = dict(os.environ, FASTROBUST_CACHE=str(root / "cache"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    load_dataset("imagefolder", root / "data", val_size=16, cache_dir=root / "cache")  # decode once, before the ranks
    return root / "data", env


def train_args(data: Path, out: Path) -> list[str]:
    return ["train", "--method", "natural", "--model", "tinycnn", "--dataset", "imagefolder", "--data-root", str(data),
            "--val-size", "16", "--epochs", "2", "--batch-size", "32", "--lr", "0.05", "--schedule", "constant",
            "--checkpoint-every", "3", "--device", "cpu", "--out", str(out), "--quiet", "--json",
            "--set", "val_pgd_steps=1", "--set", "test_pgd_steps=1"]


KILLER = """
import os, sys
from fastrobust.train import Trainer

original = Trainer._step

def step(self, x, y):
    if self.global_step == 6 and os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        os._exit(17)  # a rank dies without a word in the first attempt, mid-epoch 2, after the step-6 checkpoint
    return original(self, x, y)

Trainer._step = step
from fastrobust.cli import main
sys.exit(main())
"""


def test_two_nodes_on_localhost_and_a_killed_rank_restarts_from_the_checkpoint(tmp_path, image_folder):
    data, env = image_folder
    run = [sys.executable, "-m", "torch.distributed.run"]
    # two "machines": two torchrun invocations meeting at one c10d rendezvous endpoint
    port = free_port()
    nodes = [
        subprocess.Popen(run + ["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "job7",
                                "--local_addr", "127.0.0.1", "-m", "fastrobust"] + train_args(data, tmp_path / "nodes"),
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]
    # meanwhile, on one "machine": two ranks, rank 1 dies in step 7; torchrun restarts both, they resume
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    restarted = subprocess.run(
        run + ["--standalone", "--nproc_per_node", "2", "--max-restarts", "1", "--monitor-interval", "0.2", str(killer)]
        + [arg for arg in train_args(data, tmp_path / "restarted") if arg != "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert restarted.returncode == 0, restarted.stdout[-4000:]
    assert "rank 0 of 2 lost contact with the other ranks" in restarted.stdout  # the survivor says why it stops
    assert "torchrun restart 1: resuming" in restarted.stdout and "resumed " in restarted.stdout

    for name in ("nodes", "restarted"):
        folder = tmp_path / name
        result = json.loads((folder / "result.json").read_text())
        assert result["world_size"] == 2 and result["config"]["batch_size"] == 32
        epochs = [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [1, 2]
    # the restarted job continued the same global state: the same weights as the uninterrupted 2-rank job
    assert_close_weights(final_weights(tmp_path / "restarted"), final_weights(tmp_path / "nodes"), atol=1e-6)


# ---- a method's own parameters (SPROUT's u) and the invariance evaluations under several ranks ----------------
INVARIANCE_OPTIONS = {"gaussian-noise": {"stds": [0.1, 0.4], "draws": 2}, "spatial": {"rotations": 3, "translations": 3}}


def _method_state_and_invariance_job(rank: int, out: str) -> None:
    trainer = Trainer(train_config(Path(out), "sprout", method_params={"n_aug": 1}), dataset=dataset16(),
                      progress=False, log=lambda _message: None)
    trainer.fit()
    torch.save(trainer.method.state_dict(), Path(out) / f"sprout-state-rank{rank}.pt")
    torch.manual_seed(0)
    model = create_model("tinycnn", num_classes=4, image_size=8).eval()
    record = evaluate(model, synthetic_dataset(test=37).test, list(INVARIANCE_OPTIONS), eps=8 / 255, batch_size=8,
                      progress=False, seed=5, attack_options=INVARIANCE_OPTIONS, distributed=True)
    (Path(out) / f"invariance{rank}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-rank-sprout")
    spawn("_method_state_and_invariance_job", str(out))
    return out


def test_sprout_label_parameter_follows_the_global_batch_on_every_rank(two_rank_run):
    """u's gradient is averaged over the ranks like the weights': every rank takes the same step, so u (and its
    momentum) is identical on both ranks and in the checkpoint (before, each rank stepped on its own shard)."""
    states = [torch.load(two_rank_run / f"sprout-state-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(states[0]["u"], torch.ones(4)), "u never moved"
    for key in ("u", "u_momentum_buffer"):
        assert torch.equal(states[0][key], states[1][key]), (key, states[0][key], states[1][key])
    newest = sorted((two_rank_run / "checkpoints").iterdir())[-1]
    saved = load_file(str(newest / "train_state.safetensors"))
    assert torch.equal(saved["method/u"], states[1]["u"])


def test_sharded_invariance_evaluations_equal_one_process(two_rank_run):
    torch.manual_seed(0)
    model = create_model("tinycnn", num_classes=4, image_size=8).eval()
    single = evaluate(model, synthetic_dataset(test=37).test, list(INVARIANCE_OPTIONS), eps=8 / 255, batch_size=8,
                      progress=False, seed=5, attack_options=INVARIANCE_OPTIONS)
    for rank in (0, 1):
        record = json.loads((two_rank_run / f"invariance{rank}.json").read_text())
        for name in INVARIANCE_OPTIONS:
            for key in ("robust_acc", "robust", "broken", "by_std"):
                assert record["attacks"][name].get(key) == single["attacks"][name].get(key), (rank, name, key)
