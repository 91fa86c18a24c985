"""One prepared GPU run that measures what the speed targets and the paper need, inside a time budget.

Stages, in priority order (each guarded: a failure is recorded with its error and the suite goes on; each has
a share of the time left and is skipped, with the reason, when too little is left):

1. ``env``: GPU, driver, clocks (nvidia-smi), torch / CUDA / cuDNN versions, the command, the git commit
   (``.gpu-carry/COMMIT`` written by ``benchmarks/prepare_gpu_carry.sh``, else ``git rev-parse``).
2. ``data``: CIFAR-10 decoded from the carried archive into a fresh cache (timed; decode runs in a process
   pool on many cores); every later stage reads that cache.
3. ``speed``: natural training img/s of PreActResNet-18 at batch 512 (bf16 autocast, channels_last) eager,
   with weight averaging, and with ``torch.compile``; ``benchmarks/cost.py`` (every method's measured /
   declared step cost); ``benchmarks/epoch.py`` (fast path vs the authors-style reference, backward_smoothing
   and trades, a fixed number of steps).
4. ``speedrun``: time to robustness: the ``speedrun`` preset (Backward Smoothing) on full CIFAR-10 with its
   epochs fitted to the budget, then PGD-20 and AutoAttack-fast on 1,000 test points; wall time from the
   process start to a trained model.
5. ``autoattack``: ``benchmarks/autoattack.py`` (official vs fastrobust AutoAttack on 500 points of the
   speedrun's model), when the script and ``pyautoattack`` (carried in ``.gpu-carry/site``) are there.
6. ``fast_at`` and ``trades``: the speedrun's schedule for those methods, when the budget allows.
7. ``precision``: ``benchmarks/precision_study.py`` (attack precision fp32 vs bf16), when present and the
   budget allows.

Heavy stages run in child processes with a hard timeout (a training child is first asked to stop with
SIGTERM, which checkpoints and keeps the finished epochs); ``--smoke`` runs every stage on the CPU with a
tiny model, a synthetic JPEG copy of CIFAR-10's layout and a few batches (in-process where it can), as a CI
test. Records go to ``OUT/gpu_suite.json`` (rewritten after every stage, so a killed run keeps what it
measured), the output to ``OUT/gpu_suite.log``, and the Markdown table, printed last, to ``OUT/gpu_suite.md``.

    python benchmarks/gpu_suite.py --budget-seconds 300 --out results/gpu          # on the GPU machine
    python benchmarks/gpu_suite.py --smoke --out /tmp/suite-smoke                  # anywhere, < 1 minute

See benchmarks/README.md for the device command (carry folder, PYTHONPATH) and docs/performance.md.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CARRY = ROOT / ".gpu-carry"
STAGES = ("speed", "speedrun", "autoattack", "baselines", "precision")  # env and data always run
# each timed part's share of the time left (trades and the precision study take what is left at the end)
WEIGHTS = {"natural": 1.5, "cost": 0.9, "epoch": 0.9, "speedrun": 2.6, "autoattack": 0.9, "fast_at": 1.3}
PART_STAGE = {"natural": "speed", "cost": "speed", "epoch": "speed", "speedrun": "speedrun",
              "autoattack": "autoattack", "fast_at": "baselines"}
EPS = 8 / 255
REDUCED_AA = {"apgd-ce": {"n_iter": 5}, "apgd-t": {"n_iter": 5, "n_targets": 2}}  # smoke only


# ---------------------------------------------------------------------------------------------- small helpers
def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_json_or_lines(path: Path) -> Any:
    """A JSON file, or a JSON-lines file as a list; None when absent or unreadable."""
    if not path.is_file():
        return None
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        rows = []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows


def git_commit() -> str:
    """The commit of the code: .gpu-carry/COMMIT (the device copy has no .git), else git rev-parse."""
    if (CARRY / "COMMIT").is_file():
        return (CARRY / "COMMIT").read_text().strip()
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no .gpu-carry/COMMIT, no git)"


NVIDIA_FIELDS = ("name", "driver_version", "pstate", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
                 "power.draw", "power.limit", "temperature.gpu", "memory.total", "memory.used", "utilization.gpu")


def nvidia_smi() -> dict[str, Any] | str:
    """One read-only query of the GPU's state (clocks in MHz, power in W, memory in MiB); a note without it."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(NVIDIA_FIELDS)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as error:
        return f"nvidia-smi not available ({type(error).__name__})"
    if out.returncode != 0:
        return f"nvidia-smi failed: {out.stderr.strip()[:200]}"
    first = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    return dict(zip(NVIDIA_FIELDS, (v.strip() for v in first.split(","))))


def make_smoke_archive(root: Path, train_per_class: int = 110, test_per_class: int = 26) -> Path:
    """A CIFAR-10-shaped JPEG archive (the mirror's layout, random 32x32 images) for --smoke."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from fastrobust.data.datasets import CIFAR10_CLASSES

    path = root / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for label, name in enumerate(CIFAR10_CLASSES):
                for i in range(count):  # a class-dependent colour plus noise: learnable
                    base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], dtype=np.float32)
                    image = np.clip(base * 0.6 + rng.uniform(0, 100, (32, 32, 3)), 0, 255).astype(np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
                    info = tarfile.TarInfo(f"CIFAR-10-images/{split}/{name}/{i:04d}.jpg")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    tar.addfile(info, buffer)
    return path


# ---------------------------------------------------------------------------------------------- children
def child_natural(params: dict[str, Any], result: Path) -> None:
    """Natural training steps (the trainer's step: benchutil.fast_step) of ``model`` at ``batch``: img/s eager,
    eager with weight averaging after every step, and compiled (compile time = the warm-up steps' time)."""
    import torch

    sys.path.insert(0, str(HERE))
    import benchutil as bu

    from fastrobust import methods as methods_lib
    from fastrobust.train.averaging import WeightAverager
    from fastrobust.data import load_dataset

    device = bu.resolve(params["device"])
    dtype = bu.amp_dtype(params.get("amp", "auto"), device)
    channels_last = device.type == "cuda"
    batch = params["batch"]
    data = load_dataset("cifar10", params.get("data_root"), val_size=0, train_subset=batch * 4, test_subset=10)
    batches = [(data.train.images[i * batch:(i + 1) * batch].to(device).float().div_(255),
                data.train.labels[i * batch:(i + 1) * batch].to(device)) for i in range(4)]
    method = methods_lib.create("natural")
    out: dict[str, Any] = {"model": params["model"], "model_params": params.get("model_params", {}), "batch": batch,
                           "device": str(device), "amp": str(dtype) if dtype else "fp32", "channels_last": channels_last}

    def measure(label: str, compile_backend: str | None = None, averaged: bool = False) -> None:
        model = bu.build_model(params["model"], params.get("model_params", {}), device, channels_last=channels_last)
        model.train()
        optimizer = bu.build_optimizer(model, device)
        forward = torch.compile(model, backend=compile_backend) if compile_backend else model
        step = bu.fast_step(method, forward, optimizer, device, dtype, channels_last)
        averager = WeightAverager(model, decay=0.999) if averaged else None

        def one(i: int) -> None:
            x, y = batches[i % len(batches)]
            step(x, y)
            if averager is not None:
                averager.update(model, 0)

        start = time.perf_counter()
        for i in range(params["warmup"]):
            one(i)
        bu.sync(device)
        warm = time.perf_counter() - start
        watch = bu.Stopwatch(device).start()
        for i in range(params["steps"]):
            one(i)
        seconds = watch.stop().seconds()
        out[label] = {"images_per_second": params["steps"] * batch / seconds, "step_seconds": seconds / params["steps"],
                      "warmup_seconds": warm, "warmup_steps": params["warmup"], "timed_steps": params["steps"],
                      **({"compile_backend": compile_backend} if compile_backend else {})}
        write_json(result, out)
        print(f"natural {label}: {out[label]['images_per_second']:.0f} img/s (warm-up {warm:.1f} s)", flush=True)

    measure("eager")
    measure("eager_ema", averaged=True)
    if params.get("compile_backend"):
        measure("compiled", compile_backend=params["compile_backend"])


def child_train(params: dict[str, Any], result: Path) -> None:
    """Train a preset (with overrides) under a deadline, then evaluate its best model on N class-balanced test points.

    The deadline sends SIGTERM to this process: the trainer finishes its step, checkpoints and stops; the
    finished epochs' best model is still evaluated. Times are wall-clock from ``launch_time`` (the parent's
    clock just before starting this process)."""
    launch = params.get("launch_time", time.time())
    import torch

    from fastrobust.models.checkpoint import load_model
    from fastrobust.data import balanced_head, load_dataset
    from fastrobust.evaluate import evaluate
    from fastrobust.train.presets import load_preset, make_config
    from fastrobust.core.records import read_jsonl
    from fastrobust.train import Trainer, TrainingStopped

    settings = load_preset(params["preset"])
    overrides = dict(params.get("overrides", {}))
    if "method" in overrides and overrides["method"] != settings.get("method"):
        settings.pop("method_params", None)  # another method does not inherit the preset method's parameters
    settings.update(overrides)
    config = make_config(settings)
    out: dict[str, Any] = {"preset": params["preset"], "overrides": overrides}
    data = load_dataset(config.dataset, config.data_root, val_size=config.val_size,
                        train_subset=config.train_subset, test_subset=config.test_subset)
    trained_at: dict[str, float] = {}

    class TimedTrainer(Trainer):
        def finish(self) -> dict[str, Any]:  # the model is trained when finish() starts
            trained_at["t"] = time.time()
            return super().finish()

    deadline = params.get("deadline_seconds")
    timer = None
    if deadline:
        left = max(1.0, deadline - (time.time() - launch))
        timer = threading.Timer(left, lambda: os.kill(os.getpid(), signal.SIGTERM))
        timer.daemon = True
        timer.start()
    trainer = TimedTrainer(config, dataset=data, progress=False, log=lambda m: print(m, flush=True))
    started = time.time()
    stopped = None
    try:
        trainer.fit()
    except TrainingStopped as error:
        stopped = str(error)
        trained_at.setdefault("t", time.time())
    finally:
        if timer is not None:
            timer.cancel()
    run = Path(config.out)
    metrics = [r for r in read_jsonl(run / "metrics.jsonl") if "epoch" in r] if (run / "metrics.jsonl").is_file() else []
    final = json.loads((run / "result.json").read_text()) if (run / "result.json").is_file() else {}
    out.update(config=final.get("config") or dict(vars(config)), run=str(run), stopped=stopped,
               epochs_planned=config.epochs, epochs_completed=len(metrics),
               seconds_to_trained=trained_at["t"] - launch, seconds_trainer_to_trained=trained_at["t"] - started,
               train_seconds=trainer.train_seconds,
               epoch_seconds=[r.get("epoch_seconds") for r in metrics],
               val=[{k: r.get(k) for k in ("epoch", "val_robust_acc", "ema_val_robust_acc", "val_clean_acc", "ema_val_clean_acc")}
                    for r in metrics],
               best_epoch=final.get("best_epoch", trainer.best.get("epoch")),
               best_weights=final.get("best_weights", trainer.best.get("weights")),
               test_pgd20_from_trainer=final.get("test"))
    write_json(result, out)
    for r in metrics:  # the trainer runs without progress output here: one line per epoch afterwards
        print(f"epoch {r['epoch']}: {r.get('epoch_seconds', 0):.1f} s, loss {r.get('train_loss', float('nan')):.4f}, val robust "
              f"{r.get('val_robust_acc', float('nan')):.4f} (averaged {r.get('ema_val_robust_acc', float('nan')):.4f})", flush=True)
    print(f"trained {out['epochs_completed']}/{config.epochs} epochs: {out['seconds_to_trained']:.1f} s from launch "
          f"to a trained model ({out['train_seconds']:.1f} s of training steps)", flush=True)
    if not (run / "best.safetensors").is_file():
        raise RuntimeError("no epoch finished: no model to evaluate")
    model, meta = load_model(run / "best.safetensors", device=trainer.device)
    n = params.get("eval_points", 1000)
    images, labels = balanced_head(data.test.images, data.test.labels, n)  # the split is sorted by class
    attacks = params.get("attacks", ["pgd20", "autoattack-fast"])
    record = evaluate(model, (images, labels), attacks, eps=config.attack_eps, batch_size=params.get("eval_batch_size", 500),
                      progress=False, seed=0, attack_options=params.get("attack_options") or None)
    out["evaluation"] = {"n": record["n"], "clean_acc": record["clean_acc"], "robust_acc": record["robust_acc"],
                         "attacks": {k: {"robust_acc": v["robust_acc"], "seconds": v.get("seconds")} for k, v in record["attacks"].items()},
                         "attack_options": params.get("attack_options"), "seconds": record["seconds"],
                         "model": f"best.safetensors ({meta.get('weights', 'model')} weights, epoch {meta.get('epoch')})"}
    if torch.cuda.is_available():
        out["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    write_json(result, out)
    print("evaluated: " + ", ".join(f"{k} {v['robust_acc']:.4f}" for k, v in out["evaluation"]["attacks"].items()), flush=True)


CHILDREN: dict[str, Callable[[dict[str, Any], Path], None]] = {"natural": child_natural, "train": child_train}


# ---------------------------------------------------------------------------------------------- the suite
class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.budget = float(args.budget_seconds)
        self.smoke = args.smoke
        self.device = "cpu" if args.smoke else args.device
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu-suite-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "gpu_suite.log", "a", buffering=1)
        self.stages = set(args.stages)
        self.record: dict[str, Any] = {"suite": {"budget_seconds": self.budget, "smoke": self.smoke,
                                                 "command": " ".join(shlex.quote(a) for a in sys.argv),
                                                 "work_dir": str(self.work), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                                       "stages": {}}
        self.data_root: str | None = None
        self.env = dict(os.environ)
        paths = [str(ROOT / "src")] + ([str(CARRY / "site")] if (CARRY / "site").is_dir() else [])
        self.env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["FASTROBUST_CACHE"] = str(self.work / "decoded")  # this process too, while run() runs
        for path in reversed(paths):
            if path not in sys.path:
                sys.path.insert(0, path)
        if self.smoke:
            self.env["OMP_NUM_THREADS"] = "1"

    # -- time ----------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        return self.budget - self.elapsed() - (2.0 if self.smoke else 10.0)  # a reserve for the summary

    def cap(self, part: str) -> float:
        """Seconds for ``part``: its weight's share of the time left, against the parts after it that will run."""
        names = list(WEIGHTS)
        later = sum(WEIGHTS[n] for n in names[names.index(part):] if PART_STAGE[n] in self.stages)
        return max(0.0, self.remaining()) * WEIGHTS[part] / later

    # -- output --------------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        line = f"[suite {self.elapsed():6.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def save(self) -> None:
        self.record["suite"]["elapsed_seconds"] = self.elapsed()
        write_json(self.out / "gpu_suite.json", self.record)

    def stage(self, name: str, function: Callable[[], dict[str, Any] | None], *, needs: float = 0.0) -> dict[str, Any]:
        """Run one guarded stage: skipped when less than ``needs`` seconds are left; errors recorded."""
        entry: dict[str, Any] = {"status": "skipped"}
        if self.remaining() < needs:
            entry["reason"] = f"budget: {max(self.remaining(), 0):.0f} s left, the stage needs about {needs:.0f} s"
        else:
            start = time.perf_counter()
            self.say(f"stage {name} ...")
            try:
                entry = {"status": "ok", **(function() or {})}
            except SkipStage as reason:
                entry = {"status": "skipped", "reason": str(reason)}
            except Exception as error:  # noqa: BLE001 - one failed stage must not lose the others
                entry = {"status": "error", "error": f"{type(error).__name__}: {error}",
                         "traceback": traceback.format_exc()[-3000:]}
            entry["seconds"] = time.perf_counter() - start
        self.record["stages"][name] = entry
        self.say(f"stage {name}: {entry['status']}" + (f" ({entry.get('reason') or entry.get('error')})"
                                                       if entry["status"] != "ok" else f" in {entry['seconds']:.1f} s"))
        self.save()
        return entry

    # -- children ------------------------------------------------------------------------------------------
    def child(self, kind: str, params: dict[str, Any], timeout: float, *, subprocess_: bool | None = None) -> dict[str, Any]:
        """Run a child measurement (``CHILDREN[kind]``) with a hard timeout; returns what it wrote, even when it
        failed or was stopped (then with ``child_error``). In smoke mode it runs in this process by default."""
        result = self.work / f"{kind}-{time.monotonic_ns()}.json"
        params = {**params, "launch_time": time.time()}
        use_subprocess = (not self.smoke) if subprocess_ is None else subprocess_
        if not use_subprocess:
            params.pop("deadline_seconds", None)  # a SIGTERM timer would hit this process: in-process runs are tiny
        error = None
        if use_subprocess:
            command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child-params", json.dumps(params),
                       "--child-out", str(result)]
            error = self.run_process(command, timeout, label=kind)
        else:
            try:
                CHILDREN[kind](params, result)
            except Exception as exc:  # noqa: BLE001
                error = f"{type(exc).__name__}: {exc}"
        data = read_json_or_lines(result) or {}
        if error:
            data["child_error"] = error
        return data

    def run_process(self, command: list[str], timeout: float, *, label: str) -> str | None:
        """Run ``command`` with output streamed to the log; SIGTERM at ``timeout`` (SIGKILL 20 s later).
        Returns None on success, else the reason."""
        self.say(f"{label}: {' '.join(shlex.quote(c) for c in command[:3])} ... (timeout {timeout:.0f} s)")
        process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1, start_new_session=True)
        tail: list[str] = []

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                line = line.rstrip("\n")
                print(f"  [{label}] {line}", flush=True)
                self.log.write(f"  [{label}] {line}\n")
                tail.append(line)
                del tail[:-20]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = process.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            reader.join(timeout=5)
            return f"timed out after {timeout:.0f} s (stopped)"
        reader.join(timeout=5)
        if code != 0:
            return f"exit status {code}: " + " | ".join(tail[-3:])
        return None

    def script(self, name: str, argv: list[str], timeout: float, json_out: Path, *,
               in_process: bool = False) -> tuple[Any, str | None]:
        """Run ``benchmarks/NAME`` (its ``main(argv)`` in this process, or as a child process)."""
        if in_process:
            try:
                module = importlib.import_module(Path(name).stem)
                module.main(argv)
                error = None
            except SystemExit as exc:
                error = None if not exc.code else f"exit {exc.code}"
            except Exception as exc:  # noqa: BLE001
                error = f"{type(exc).__name__}: {exc}"
        else:
            error = self.run_process([sys.executable, str(HERE / name), *argv], timeout, label=name)
        return read_json_or_lines(json_out), error

    # -- stages --------------------------------------------------------------------------------------------
    def stage_env(self) -> dict[str, Any]:
        import platform

        import torch

        info: dict[str, Any] = {"git_commit": git_commit(), "python": platform.python_version(), "torch": torch.__version__,
                                "cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                                "device": self.device, "nvidia_smi_before": nvidia_smi()}
        smi = info["nvidia_smi_before"]
        if isinstance(smi, dict):
            info["gpu"] = smi.get("name")
        if not self.smoke and not isinstance(smi, dict):
            raise RuntimeError(f"no GPU: {smi}; run with --smoke on a CPU machine")
        try:
            import pyautoattack

            info["pyautoattack"] = getattr(pyautoattack, "__file__", "importable")
        except ImportError:
            info["pyautoattack"] = None
        return info

    def cuda_info(self) -> None:
        """torch's view of the GPU, added to the env record after the data stage (whose decode pool forks: this
        process touches CUDA only after it)."""
        import torch

        env = self.record["stages"].get("env", {})
        if not torch.cuda.is_available():
            env["cuda_available"] = False
            return
        props = torch.cuda.get_device_properties(0)
        env.update(cuda_available=True, gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                   cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
        self.save()

    def stage_data(self) -> dict[str, Any]:
        from fastrobust.data import load_dataset
        from fastrobust.data.datasets import resolve_root

        if self.smoke:
            root = self.work / "data"
            make_smoke_archive(root)
        else:
            root = Path(self.args.data_root) if self.args.data_root else resolve_root(None)
        self.data_root = str(Path(root).resolve())
        self.env["FASTROBUST_DATA"] = self.data_root
        start = time.perf_counter()
        data = load_dataset("cifar10", root, val_size=1000)
        seconds = time.perf_counter() - start
        again = time.perf_counter()
        load_dataset("cifar10", root, val_size=1000)
        return {"source_archive": str(data.source).split(" (")[0].replace(str(ROOT) + "/", ""),
                "decode_seconds": seconds, "cached_load_seconds": time.perf_counter() - again,
                "cpu_count": os.cpu_count(), "decode_pool": f"up to {min(os.cpu_count() or 1, 25)} processes (2,000 images each)",
                "train": len(data.train.labels), "val": len(data.val.labels), "test": len(data.test.labels)}

    def model_spec(self) -> dict[str, Any]:
        return {"model": "tinycnn", "model_params": {"width": 8}} if self.smoke else {"model": "preactresnet18", "model_params": {}}

    def stage_speed(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        spec = self.model_spec()
        cap = self.cap("natural")
        natural_params = {**spec, "device": self.device, "data_root": self.data_root, "batch": 32 if self.smoke else 512,
                          "warmup": 2 if self.smoke else 10, "steps": 3 if self.smoke else 50,
                          "compile_backend": "eager" if self.smoke else "inductor"}
        # compile can take a minute or hang: always a child process with a timeout (in smoke too: the plumbing)
        started = time.perf_counter()
        out["natural"] = self.child("natural", natural_params, timeout=cap, subprocess_=True)
        out["natural"]["wall_seconds"] = time.perf_counter() - started
        params: list[str] = []
        for item, value in spec["model_params"].items():
            params += ["--model-param", f"{item}={value}"]
        out["cost"] = self.benchmark("cost.py", "cost", [
            "--device", self.device, "--model", spec["model"], *params, "--batch-size", "32" if self.smoke else "512",
            "--steps", "2" if self.smoke else "8", "--warmup", "1" if self.smoke else "2"])
        steps, batch = (2, 32) if self.smoke else (25, 128)
        out["epoch"] = self.benchmark("epoch.py", "epoch", [
            "--device", self.device, "--model", spec["model"], *params, "--batch-size", str(batch),
            "--methods", "backward_smoothing", "trades", "--train-subset", str(steps * batch), "--epochs", "2"])
        out["epoch_steps_per_path"] = steps
        return out

    def benchmark(self, name: str, part: str, argv: list[str]) -> dict[str, Any]:
        """``benchmarks/NAME argv --json-out ... --data-root ...`` capped at ``part``'s share: its last record,
        the wall time and the error, if any."""
        json_out = self.work / f"{Path(name).stem}.jsonl"
        argv = [*argv, "--json-out", str(json_out)] + (["--data-root", self.data_root] if self.data_root else [])
        started = time.perf_counter()
        records, error = self.script(name, argv, timeout=self.cap(part), json_out=json_out, in_process=self.smoke)
        out = _last(records) if records else {}
        out["wall_seconds"] = time.perf_counter() - started
        if error:
            out["child_error"] = error
        return out

    def speedrun_overrides(self, method: str | None, epochs: int, compile_: bool, out: str) -> dict[str, Any]:
        overrides: dict[str, Any] = {"epochs": epochs, "out": out, "device": self.device, "data_root": self.data_root,
                                     "test_subset": 64 if self.smoke else 1000, "compile": compile_}
        if method:
            overrides["method"] = method
        if self.smoke:
            overrides.update(self.model_spec(), train_subset=256, val_size=64, batch_size=64, eval_batch_size=500,
                             amp="off", channels_last="off", val_pgd_steps=2, test_pgd_steps=2)
        return overrides

    def plan_epochs(self, method: str, seconds: float, compile_: bool) -> tuple[int, dict[str, Any]]:
        """How many epochs of ``method`` fit in ``seconds`` (from the speed stage's step times)."""
        from fastrobust.train.presets import load_preset

        preset = load_preset("speedrun")
        batch = int(preset["batch_size"])
        steps = -(-49000 // batch)
        cost = (self.record["stages"].get("speed", {}).get("cost") or {}).get("results") or []
        by = {r["method"]: r["median_s"] for r in cost if "median_s" in r}
        natural = by.get("natural") or 0.05
        step = by.get(method, natural * {"backward_smoothing": 3.4, "fast_at": 1.8, "trades": 9.0}.get(method, 4.0))
        step *= batch / 512  # cost.py times batch 512
        validation = 2 * 1000 * 11 / 512 * natural * 0.8  # PGD-10 on 1,000 points, trained and averaged models
        epoch = steps * step * 1.1 + validation
        natural_stage = (self.record["stages"].get("speed", {}).get("natural") or {})
        compile_seconds = (natural_stage.get("compiled") or {}).get("warmup_seconds", 60.0) * 2.5 if compile_ else 0.0
        startup = 20.0
        epochs = int((seconds - startup - compile_seconds) // epoch) if epoch > 0 else 0
        return epochs, {"estimated_epoch_seconds": epoch, "estimated_compile_seconds": compile_seconds,
                        "estimated_startup_seconds": startup, "step_seconds_used": step, "batch_size": batch,
                        "epochs_in_300_seconds": int((300 - startup - compile_seconds) // epoch) if epoch > 0 else None}

    def train_stage(self, method: str | None, cap: float, *, epochs: int | None = None,
                    compile_: bool = False, planning: dict[str, Any] | None = None) -> dict[str, Any]:
        name = method or "speedrun"
        run = str(self.work / "runs" / name)
        attack_options = {"autoattack-fast": REDUCED_AA} if self.smoke else None
        eval_reserve = 8.0 if self.smoke else 45.0  # AutoAttack-fast + PGD-20 on 1,000 points, and loading
        params = {"preset": "speedrun", "overrides": self.speedrun_overrides(method, epochs or 1, compile_, run),
                  "deadline_seconds": max(cap - eval_reserve, 5.0), "eval_points": 64 if self.smoke else 1000,
                  "eval_batch_size": 500, "attacks": ["pgd20", "autoattack-fast"], "attack_options": attack_options}
        started = time.perf_counter()
        out = self.child("train", params, timeout=cap)
        out["planning"] = planning
        failed = out.get("child_error") and "evaluation" not in out
        if failed and compile_ and not out.get("epochs_completed") and "timed out" not in out["child_error"]:
            left = cap - (time.perf_counter() - started)  # torch.compile failed: the same run without it
            self.say(f"{name}: failed with compile on ({out['child_error']}); again without compile in {left:.0f} s")
            params["overrides"]["compile"] = False
            params["deadline_seconds"] = max(left - eval_reserve, 5.0)
            retry = self.child("train", params, timeout=left)
            retry["planning"] = {**(planning or {}), "compile": False, "compile_failed": out["child_error"]}
            out, failed = retry, retry.get("child_error") and "evaluation" not in retry
        if failed:
            raise RuntimeError(out["child_error"])
        return out

    def stage_speedrun(self) -> dict[str, Any]:
        cap = self.cap("speedrun")
        if self.smoke:
            return self.train_stage(None, cap, epochs=1, planning={"smoke": True})
        compile_choice = self.args.speedrun_compile
        natural = (self.record["stages"].get("speed", {}).get("natural") or {})
        eager, compiled = natural.get("eager"), natural.get("compiled")
        if compile_choice == "auto":  # compile only when its measured speed-up pays for its cost within this run
            compile_ = False
            if eager and compiled and compiled.get("step_seconds"):
                saved = 1 - compiled["step_seconds"] / eager["step_seconds"]  # fraction of step time saved
                epochs_eager, plan = self.plan_epochs("backward_smoothing", cap - 45, False)
                compile_ = saved * max(epochs_eager, 0) * plan["estimated_epoch_seconds"] > compiled["warmup_seconds"] * 2.5
        else:
            compile_ = compile_choice == "on"
        if self.args.speedrun_epochs is not None:
            from fastrobust.train.presets import load_preset

            epochs = self.args.speedrun_epochs or int(load_preset("speedrun")["epochs"])
            planning = {"epochs_from": "--speedrun-epochs", **self.plan_epochs("backward_smoothing", cap - 45, compile_)[1]}
        else:
            epochs, planning = self.plan_epochs("backward_smoothing", cap - 45, compile_)
            planning["epochs_from"] = "fitted to the budget"
        if epochs < 1:
            raise SkipStage(f"not one epoch fits in {cap:.0f} s ({planning})")
        planning.update(compile=compile_, compile_choice=compile_choice, cap_seconds=cap)
        self.say(f"speedrun: {epochs} epochs, compile {compile_} ({planning})")
        return self.train_stage(None, cap, epochs=epochs, compile_=compile_, planning=planning)

    def speedrun_model(self) -> Path:
        stage = self.record["stages"].get("speedrun", {})
        if stage.get("status") != "ok" or not stage.get("run"):
            raise SkipStage("no speedrun model (the speedrun stage did not finish)")
        return Path(stage["run"]) / "best.safetensors"

    def stage_autoattack(self) -> dict[str, Any]:
        script = HERE / "autoattack.py"
        if not script.is_file():
            raise SkipStage("benchmarks/autoattack.py is not in this checkout")
        if importlib.util.find_spec("pyautoattack") is None:
            raise SkipStage("pyautoattack is not importable: run benchmarks/prepare_gpu_carry.sh and carry .gpu-carry "
                            "(its attack files go on PYTHONPATH from .gpu-carry/site)")
        model = self.speedrun_model()
        json_out = self.work / "autoattack.json"
        cap = self.cap("autoattack")
        points = 8 if self.smoke else 500 if cap >= 90 else 200  # the official standard AA costs ~30-60 s on 500
        argv = ["--checkpoint", str(model), "--dataset", "cifar10", "--data-root", str(self.data_root),
                "--n-points", str(points), "--device", self.device, "--repeats", "1",
                "--versions", "official", "fastrobust", "--json-out", str(json_out)]
        data, error = self.script("autoattack.py", argv, timeout=cap, json_out=json_out)
        if error and not data:
            raise RuntimeError(error)
        return {"n_points": points, "record": data, **({"child_error": error} if error else {})}

    def stage_baseline(self, method: str) -> dict[str, Any]:
        speedrun = self.record["stages"].get("speedrun", {})
        if speedrun.get("status") != "ok":
            raise SkipStage("the speedrun did not finish: no schedule to repeat")
        epochs = int(speedrun.get("epochs_completed") or 0)
        if epochs < 1:
            raise SkipStage("the speedrun finished no epoch")
        compile_ = bool((speedrun.get("planning") or {}).get("compile"))
        cap = self.remaining() if method == "trades" else self.cap("fast_at")
        if not self.smoke:
            fit, planning = self.plan_epochs(method, cap - 45, compile_)
            if fit < epochs:
                raise SkipStage(f"{epochs} epochs of {method} do not fit in {cap:.0f} s (about {fit} would: {planning})")
        return self.train_stage(method, cap, epochs=epochs, compile_=compile_,
                                planning={"epochs_from": "the speedrun's completed epochs"})

    def stage_precision(self) -> dict[str, Any]:
        script = HERE / "precision_study.py"
        if not script.is_file():
            raise SkipStage("benchmarks/precision_study.py is not in this checkout")
        json_out = self.work / "precision.jsonl"
        if self.smoke:
            argv = ["--device", "cpu", "--model", "tinycnn", "--model-param", "width=8", "--methods", "fast_trades",
                    "--seeds", "0", "--train-subset", "64", "--val-size", "32", "--test-subset", "32", "--epochs", "1",
                    "--batch-size", "32", "--aa-n", "8", "--aa-iters", "2", "--timing-rounds", "1", "--timing-block", "1"]
        else:
            argv = ["--device", self.device, "--model", "preactresnet18", "--methods", "trades", "fast_trades",
                    "backward_smoothing", "--seeds", "0", "--train-subset", "10000", "--epochs", "4", "--batch-size", "256",
                    "--lr", "0.1", "--test-subset", "1000", "--aa-n", "500"]
        argv += ["--data-root", str(self.data_root), "--json-out", str(json_out)]
        data, error = self.script("precision_study.py", argv, timeout=self.remaining(), json_out=json_out)
        if error and not data:
            raise RuntimeError(error)
        return {"records": data, **({"child_error": error} if error else {})}

    # -- the whole run -------------------------------------------------------------------------------------
    def run(self) -> int:
        saved = dict(os.environ)
        try:
            return self._run()
        finally:  # the suite sets FASTROBUST_CACHE for its children; a caller (a test) gets its environment back
            os.environ.clear()
            os.environ.update(saved)

    def _run(self) -> int:
        os.environ["FASTROBUST_CACHE"] = self.env["FASTROBUST_CACHE"]
        self.say(f"GPU suite: budget {self.budget:.0f} s, device {self.device}, out {self.out}, work {self.work}")
        env = self.stage("env", self.stage_env, needs=-float("inf"))  # env and data always run
        if env["status"] == "error" and not self.smoke:
            self.finish()
            return 1
        self.stage("data", self.stage_data, needs=-float("inf"))
        self.cuda_info()
        if "speed" in self.stages:
            self.stage("speed", self.stage_speed, needs=20 if not self.smoke else 0)
        if "speedrun" in self.stages:
            self.stage("speedrun", self.stage_speedrun, needs=60 if not self.smoke else 0)
        if "autoattack" in self.stages:
            self.stage("autoattack", self.stage_autoattack, needs=25 if not self.smoke else 0)
        if "baselines" in self.stages:
            self.stage("fast_at", lambda: self.stage_baseline("fast_at"), needs=45 if not self.smoke else 0)
            self.stage("trades", lambda: self.stage_baseline("trades"), needs=60 if not self.smoke else 0)
        if "precision" in self.stages:
            self.stage("precision", self.stage_precision, needs=60 if not self.smoke else 0)
        self.finish()
        return 0

    def finish(self) -> None:
        env = self.record["stages"].get("env")
        if env and env.get("status") == "ok":
            env["nvidia_smi_after"] = nvidia_smi()
        self.save()
        table = markdown_summary(self.record)
        (self.out / "gpu_suite.md").write_text(table + "\n")
        self.say(f"done in {self.elapsed():.0f} s; records in {self.out / 'gpu_suite.json'}")
        print("\n" + table, flush=True)
        self.log.write("\n" + table + "\n")
        self.log.close()


class SkipStage(Exception):
    """A stage that cannot run here (missing script, budget): recorded as skipped with this reason."""


def _last(records: Any) -> dict[str, Any]:
    if isinstance(records, list):
        return records[-1] if records else {}
    return records if isinstance(records, dict) else {}


# ---------------------------------------------------------------------------------------------- the table
def _fmt(value: Any, digits: int = 2, pct: bool = False) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return f"{100 * value:.{digits}f}%" if pct else f"{value:,.{digits}f}"


def markdown_summary(record: dict[str, Any]) -> str:
    """The suite's results as one Markdown table (the layout of docs/performance.md's GPU section)."""
    stages = record.get("stages", {})
    env = stages.get("env", {})
    rows: list[tuple[str, str, str]] = []

    def add(what: str, value: str, target: str = "") -> None:
        rows.append((what, value, target))

    speed = stages.get("speed", {})
    natural = speed.get("natural") or {}
    for label, name in (("eager", "eager"), ("eager_ema", "eager + weight averaging"), ("compiled", "torch.compile")):
        entry = natural.get(label) or {}
        extra = f" (compile/warm-up {entry['warmup_seconds']:.0f} s)" if label == "compiled" and entry else ""
        add(f"natural img/s, {natural.get('model', 'preactresnet18')} batch {natural.get('batch', 512)}, {natural.get('amp', 'bf16')}, {name}",
            _fmt(entry.get("images_per_second"), 0) + extra, ">= 20,000" if label == "eager" else "")
    cost = (speed.get("cost") or {}).get("results") or []
    if cost:
        worst = max(cost, key=lambda r: r["measured_over_declared"])
        add("max measured/declared step cost (cost.py)", f"{worst['measured_over_declared']:.2f} ({worst['method']})", "<= 1.15")
        by = {r["method"]: r for r in cost}
        if "trades" in by and "backward_smoothing" in by:
            add("trades / backward_smoothing step time", f"{by['trades']['median_s'] / by['backward_smoothing']['median_s']:.2f}", ">= 2.7")
    else:
        add("cost.py", speed.get("status", "not run") if not speed else (speed.get("cost") or {}).get("child_error", "-"))
    for row in (speed.get("epoch") or {}).get("results") or []:
        add(f"fast path vs reference, {row['method']} (epoch.py, {speed.get('epoch_steps_per_path', '?')} steps)",
            f"{row['speedup']:.2f}x ({row['fast']['images_per_second']:,.0f} vs {row['reference']['images_per_second']:,.0f} img/s)",
            ">= 3x")
    for name in ("speedrun", "fast_at", "trades"):
        stage = stages.get(name, {})
        if stage.get("status") != "ok":
            add(f"{name}", f"{stage.get('status', 'not run')}: {stage.get('reason') or stage.get('error') or ''}".strip(": "))
            continue
        evaluation = stage.get("evaluation") or {}
        attacks = evaluation.get("attacks") or {}
        epochs = stage.get("epoch_seconds") or []
        label = "speedrun (backward_smoothing)" if name == "speedrun" else f"{name}, same schedule"
        add(f"{label}: epochs, time to a trained model", f"{stage.get('epochs_completed')} epochs, "
            f"{_fmt(stage.get('seconds_to_trained'), 0)} s ({_fmt(stage.get('train_seconds'), 0)} s of steps; "
            f"epoch {_fmt(min(epochs), 1) if epochs else '-'} s)", "< 12 s per epoch (BS)" if name == "speedrun" else "")
        add(f"{label}: clean / PGD-20 / AutoAttack-fast (n={evaluation.get('n', '-')})",
            f"{_fmt(evaluation.get('clean_acc'), 2, True)} / {_fmt((attacks.get('pgd20') or {}).get('robust_acc'), 2, True)} / "
            f"{_fmt((attacks.get('autoattack-fast') or {}).get('robust_acc'), 2, True)}")
        if name == "speedrun" and (stage.get("planning") or {}).get("epochs_in_300_seconds"):
            add("speedrun: epochs that fit 300 s (estimate)", str(stage["planning"]["epochs_in_300_seconds"]))
    aa = stages.get("autoattack", {})
    if aa.get("status") == "ok":
        add("official vs fastrobust AutoAttack (autoattack.py)", _aa_summary(aa.get("record")), ">= 5x")
    else:
        add("official vs fastrobust AutoAttack", f"{aa.get('status', 'not run')}: {aa.get('reason') or aa.get('error') or ''}".strip(": "))
    precision = stages.get("precision", {})
    add("attack precision study (precision_study.py)", precision.get("status", "not run") +
        (f": {precision.get('reason') or precision.get('error')}" if precision.get("status") != "ok" else
         f": {len(precision.get('records') or [])} records"))
    data = stages.get("data", {})
    add("CIFAR-10 decode (archive -> cache)", f"{_fmt(data.get('decode_seconds'), 1)} s on {data.get('cpu_count', '?')} cores")
    head = (f"GPU suite: {env.get('gpu', env.get('device', '?'))}, torch {env.get('torch', '?')} (CUDA {env.get('cuda', '-')}), "
            f"commit {env.get('git_commit', '?')}, budget {record['suite']['budget_seconds']:.0f} s, "
            f"elapsed {record['suite'].get('elapsed_seconds', 0):.0f} s{' (SMOKE: CPU, tiny model)' if record['suite']['smoke'] else ''}")
    lines = [head, "", "| measurement | value | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def _aa_summary(data: Any) -> str:
    """The time ratio and robust counts from autoattack.py's record (its ``summary``: ``ratio_of_medians`` =
    official / fastrobust median seconds, and each version's ``robust`` count); "-" when they are missing."""
    summary = _last(data).get("summary") or {}
    ratio = summary.get("ratio_of_medians")
    official, ours = summary.get("official") or {}, summary.get("fastrobust") or {}
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool):
        return "-"
    return (f"{ratio:.2f}x official / fastrobust time (robust {official.get('robust', '-')} vs "
            f"{ours.get('robust', '-')} points)")


# ---------------------------------------------------------------------------------------------- entry point
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-seconds", type=float, default=300.0,
                        help="the whole suite ends inside this many seconds (default 300; the device command's "
                             "timeout should leave about a minute more)")
    parser.add_argument("--smoke", action="store_true", help="every stage on the CPU, tiny model, synthetic data (CI)")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-suite-out"),
                        help="folder for gpu_suite.json, gpu_suite.md and gpu_suite.log (default $OUT)")
    parser.add_argument("--work-dir", default=None, help="runs, caches and child records (default: a new temp folder)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data-root", default=None, help="where cifar10-jpeg/ lies (default $FASTROBUST_DATA)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                        help="which stages after env and data (default: all)")
    parser.add_argument("--speedrun-epochs", type=int, default=None,
                        help="N: train the speedrun N epochs; 0: the preset's own epochs (default: fit the budget)")
    parser.add_argument("--speedrun-compile", default="auto", choices=["auto", "on", "off"],
                        help="auto: compile the speedrun only when the measured compile time pays for itself")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--child-params", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        for path in (str(ROOT / "src"), str(HERE)):
            if path not in sys.path:
                sys.path.insert(0, path)
        CHILDREN[args.child](json.loads(args.child_params), Path(args.child_out))
        return 0
    return Suite(args).run()


if __name__ == "__main__":
    sys.exit(main())
