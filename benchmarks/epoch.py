"""Epoch time and images/s of fastrobust's fast path against a plain reference, side by side in one run.

Fast path: the real ``fastrobust.train.Trainer`` (device-resident DeviceLoader with batched crop/flip,
bf16 autocast and channels_last on CUDA, fused SGD on CUDA / foreach on CPU, no per-step host sync;
``progress=False``), timed by the trainer's own ``epoch_seconds``.

Reference: written here the way the methods' original scripts run: ``torch.utils.data.DataLoader``
over the decoded uint8 images with per-image CPU augmentation (random crop, padding 4, and horizontal
flip, as torch ops in ``Dataset.__getitem__``), fp32, NCHW, eager, plain SGD, ``loss.item()`` every
step for logging; the attack with the model in eval mode and the loss in train mode, with the loops
of the authors' ``trades.py`` (TRADES), ``trades_backward.py`` (Backward Smoothing) and ``pgd_fast.py``
(PGD-AT / Fast AT, the Backward Smoothing authors' baseline script).

``--reference authors`` (default) keeps the authors' redundant forwards (TRADES recomputes the clean
logits in every attack step and twice in the loss; the PGD/Fast AT script runs one more forward for
its log); ``--reference lean`` makes exactly the passes fastrobust makes, so the remaining speed-up is
the systems part only (data pipeline, precision, memory format, syncs).

Timed epochs should hold at least ``MIN_STEPS`` (100) steps: the fixed costs of an epoch (the trainer's epoch
start, the reference DataLoader's first batch) are a large share of a short one and inflate the speed-up; the
record's ``notes`` say when an epoch is shorter. The reference keeps its DataLoader workers alive between epochs
(``persistent_workers``), as a long training run effectively does. With ``--progress-out FILE`` the record so far
(every finished method, and the current one's finished repeats) is appended after each repeat of each method,
so a run stopped early keeps what it measured.

Two deliberate, cost-free deviations from the authors' text, so that ``tests/test_fast_path.py`` can
check that the reference and fastrobust give the same loss to 1e-5 in fp32: random starts are clamped
to [0, 1] before the first gradient (the scripts take it at an unclamped start), and KL terms whose
target is the model's own clean prediction are written with log-probability targets
(``F.kl_div(..., log_target=True)``: the same KL and the same cost as ``KLDivLoss`` on softmax targets).

    python benchmarks/epoch.py --device cpu --model tinycnn --train-subset 2000 --json-out benchmarks/results/epoch.jsonl
    python benchmarks/epoch.py --device cuda --model preactresnet18 --batch-size 128 --json-out benchmarks/results/epoch.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

EPS = 8 / 255
MIN_STEPS = 100  # steps per timed epoch below which fixed per-epoch costs inflate the speed-up (noted in the record)
DEFAULT_METHODS = ["natural", "fast_at", "backward_smoothing", "trades", "pgd_at"]


# ---- the reference data pipeline --------------------------------------------------------------
class CropFlipImages(torch.utils.data.Dataset):
    """uint8 images [N, C, H, W]; per image: random crop with zero padding, random horizontal flip, to float."""

    def __init__(self, images: Tensor, labels: Tensor, padding: int = 4, flip: bool = True):
        self.images, self.labels, self.padding, self.flip = images, labels, padding, flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        _, height, width = image.shape
        p = self.padding
        if p:
            padded = F.pad(image, (p, p, p, p))
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            image = padded[:, top:top + height, left:left + width]
        if self.flip and torch.rand(()).item() < 0.5:
            image = image.flip(-1)
        return image.float().div(255), self.labels[index]


def reference_loader(images: Tensor, labels: Tensor, batch_size: int, *, workers: int, pin_memory: bool,
                     padding: int = 4, flip: bool = True) -> torch.utils.data.DataLoader:
    """The reference's DataLoader; its ``workers`` stay alive between epochs (``persistent_workers``): a new pool
    per epoch costs a fixed start that a real run pays once per epoch of hundreds of steps."""
    return torch.utils.data.DataLoader(CropFlipImages(images, labels, padding, flip), batch_size=batch_size,
                                       shuffle=True, num_workers=workers, pin_memory=pin_memory,
                                       persistent_workers=workers > 0)


# ---- the reference methods (authors' structure) -------------------------------------------------
def _clip(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    return torch.clamp(x_adv, 0.0, 1.0)


def _kl_sum(logits_adv: Tensor, logits_ref: Tensor) -> Tensor:
    """KL(s(ref) || s(adv)) summed over the batch (the authors' KLDivLoss(size_average=False))."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.log_softmax(logits_ref, dim=1), reduction="sum", log_target=True)


def ref_natural(model: nn.Module, x: Tensor, y: Tensor, *, lean: bool = False) -> Tensor:
    model.train()
    return F.cross_entropy(model(x), y)


def _ref_pgd_ce(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, step_size: float, steps: int, lean: bool) -> Tensor:
    model.eval()
    x_adv = _clip(x.detach() + (torch.rand_like(x) * 2 - 1) * eps, x, eps)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_inner = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss_inner, [x_adv])[0]
        x_adv = _clip(x_adv.detach() + step_size * torch.sign(grad.detach()), x, eps)
    if not lean:
        with torch.no_grad():  # the script's logged attack loss: one more forward
            F.cross_entropy(model(x_adv), y)
    model.train()
    return F.cross_entropy(model(x_adv.detach()), y)


def ref_fast_at(model: nn.Module, x: Tensor, y: Tensor, *, lean: bool = False,
                eps: float = EPS, step_size: float = 10 / 255) -> Tensor:
    return _ref_pgd_ce(model, x, y, eps=eps, step_size=step_size, steps=1, lean=lean)


def ref_pgd_at(model: nn.Module, x: Tensor, y: Tensor, *, lean: bool = False,
               eps: float = EPS, step_size: float = 2 / 255, steps: int = 10) -> Tensor:
    return _ref_pgd_ce(model, x, y, eps=eps, step_size=step_size, steps=steps, lean=lean)


def ref_trades(model: nn.Module, x: Tensor, y: Tensor, *, lean: bool = False, eps: float = EPS,
               step_size: float = 2 / 255, steps: int = 10, beta: float = 6.0, init_std: float = 0.001) -> Tensor:
    batch_size = len(x)
    model.eval()
    x_adv = _clip(x.detach() + init_std * torch.randn_like(x), x, eps)
    if lean:
        with torch.no_grad():
            logits_nat = model(x)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            # the authors recompute the clean logits in every step
            reference = logits_nat if lean else model(x)
            loss_kl = _kl_sum(model(x_adv), reference)
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = _clip(x_adv.detach() + step_size * torch.sign(grad.detach()), x, eps)
    model.train()
    x_adv = x_adv.detach()
    logits = model(x)
    loss_natural = F.cross_entropy(logits, y)
    logits_adv = model(x_adv)
    clean_for_kl = logits if lean else model(x)  # the authors run the clean batch a second time
    loss_robust = _kl_sum(logits_adv, clean_for_kl) / batch_size
    return loss_natural + beta * loss_robust


def ref_backward_smoothing(model: nn.Module, x: Tensor, y: Tensor, *, lean: bool = False, eps: float = EPS,
                           step_size: float = 8 / 255, beta: float = 10.0, gamma: float = 1.0,
                           attack_steps: int = 1) -> Tensor:
    batch_size = len(x)
    model.eval()
    with torch.no_grad():
        logits_nat = model(x)
    # backward step: towards s(z + gamma * psi), psi ~ U(-1, 1)
    rand_vector = gamma * (torch.rand_like(logits_nat) * 2 - 1)
    x_adv = x.detach().requires_grad_()
    with torch.enable_grad():
        loss_os = -(1.0 / batch_size) * F.kl_div(F.log_softmax(model(x_adv), dim=1),
                                                 F.softmax(logits_nat + rand_vector, dim=1), reduction="sum")
    grad = torch.autograd.grad(loss_os, [x_adv])[0]
    x_adv = _clip(x_adv.detach() + step_size * torch.sign(grad.detach()), x, eps)
    for _ in range(attack_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_inner = (1.0 / batch_size) * _kl_sum(model(x_adv), logits_nat)
        grad = torch.autograd.grad(loss_inner, [x_adv])[0]
        x_adv = _clip(x_adv.detach() + step_size * torch.sign(grad.detach()), x, eps)
    model.train()
    x_adv = x_adv.detach()
    logits = model(x)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = beta * (1.0 / batch_size) * _kl_sum(model(x_adv), logits)
    return loss_natural + loss_robust


REFERENCE: dict[str, Callable[..., Tensor]] = {
    "natural": ref_natural,
    "fast_at": ref_fast_at,
    "pgd_at": ref_pgd_at,
    "trades": ref_trades,
    "backward_smoothing": ref_backward_smoothing,
}


def reference_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader, loss_fn: Callable[..., Tensor],
                    device: torch.device, *, lean: bool) -> dict:
    """One epoch as the scripts run it: host-side batches, .to(device), loss, backward, step, loss.item()."""
    bu.sync(device)
    start = time.perf_counter()
    model.train()
    total, seen, steps = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = loss_fn(model, x, y, lean=lean)
        loss.backward()
        optimizer.step()
        total += loss.item()
        seen += len(y)
        steps += 1
    bu.sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": seen, "mean_loss": total / max(steps, 1)}


# ---- the fast path: the real trainer --------------------------------------------------------------
def fast_epochs(name: str, data, args, params: dict) -> list[dict]:
    from fastrobust.train import Trainer, TrainConfig

    with tempfile.TemporaryDirectory(prefix="fastrobust-bench-") as out:
        config = TrainConfig(
            method=name, model=args.model, model_params=params, dataset="cifar10", epochs=args.epochs,
            batch_size=args.batch_size, lr=0.1, schedule="piecewise", seed=0, device=args.device, amp=args.amp,
            channels_last=args.channels_last, compile=args.compile, val_pgd_steps=0, test_pgd_steps=0, out=out,
        )
        debug = args.sync_debug and torch.device(args.device).type == "cuda"
        if debug:  # every host synchronisation inside the run is reported as a warning with its source line
            torch.cuda.set_sync_debug_mode("warn")
        try:
            Trainer(config, dataset=data, progress=False, log=lambda _message: None).fit()
        finally:
            if debug:
                torch.cuda.set_sync_debug_mode("default")
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [{"seconds": r["epoch_seconds"], "images": r["train_images"], "mean_loss": r.get("train_loss")}
            for r in records if "epoch_seconds" in r]


def reference_epochs(name: str, data, args, params: dict, device: torch.device) -> list[dict]:
    model = bu.build_model(args.model, params, device, channels_last=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    workers = args.ref_workers if args.ref_workers is not None else (2 if device.type == "cuda" else 0)
    loader = reference_loader(data.train.images, data.train.labels, args.batch_size, workers=workers,
                              pin_memory=device.type == "cuda", padding=data.crop_padding, flip=data.flip)
    return [reference_epoch(model, optimizer, loader, REFERENCE[name], device, lean=args.reference == "lean")
            for _ in range(args.epochs)]


def summarise(epochs: list[dict]) -> dict:
    """The warm epochs (all after the first when there are several): median seconds and images/s."""
    warm = epochs[1:] if len(epochs) > 1 else epochs
    seconds = bu.median([e["seconds"] for e in warm])
    images = warm[0]["images"]
    return {"epoch_seconds": seconds, "images_per_second": images / seconds, "images": images,
            "all_epoch_seconds": [e["seconds"] for e in epochs]}


def combine(summaries: list[dict]) -> dict:
    """Several repeats of one path: the median epoch time over the repeats (each repeat already a median)."""
    seconds = bu.median([s["epoch_seconds"] for s in summaries])
    images = summaries[0]["images"]
    return {"epoch_seconds": seconds, "images_per_second": images / seconds, "images": images,
            "repeat_epoch_seconds": [s["epoch_seconds"] for s in summaries],
            "all_epoch_seconds": [s["all_epoch_seconds"] for s in summaries]}


def method_row(name: str, runs: dict[str, list[dict]]) -> dict:
    """One method's row: each path's epochs combined over its repeats so far, and the speed-up."""
    result = {path: combine(summaries) for path, summaries in runs.items()}
    return {"method": name, "fast": result["fast"], "reference": result["reference"],
            "speedup": result["reference"]["epoch_seconds"] / result["fast"]["epoch_seconds"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--model", default=None, help="default: preactresnet18 on CUDA, tinycnn on CPU")
    parser.add_argument("--model-param", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(REFERENCE))
    parser.add_argument("--train-subset", type=int, default=None,
                        help="train on the first N training images (CPU: e.g. 2000); default the full 49,000")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per path; the first is warm-up when > 1")
    parser.add_argument("--repeats", type=int, default=1,
                        help="repeat the fast/reference pair (alternating which goes first); medians over repeats")
    parser.add_argument("--reference", default="authors", choices=["authors", "lean"])
    parser.add_argument("--ref-workers", type=int, default=None,
                        help="reference DataLoader workers (default: 2 on CUDA as the authors' scripts, 0 on CPU)")
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16"], help="fast path precision")
    parser.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--compile", action="store_true", help="fast path with torch.compile")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sync-debug", action="store_true",
                        help="CUDA: warn at every host synchronisation of the fast path (validation and checkpoints sync by design)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--progress-out", default=None,
                        help="append the record so far after every repeat of every method (partial: true until the last)")
    args = parser.parse_args(argv)

    from fastrobust.data import load_dataset

    bu.set_threads(args.threads)
    device = bu.resolve(args.device)
    args.device = str(device)
    args.model = args.model or ("preactresnet18" if device.type == "cuda" else "tinycnn")
    params = bu.parse_params(args.model_param)
    data = load_dataset("cifar10", args.data_root, val_size=1000, train_subset=args.train_subset, test_subset=256)
    load_before = bu.load_average()
    print(f"{args.model} {params or ''} batch {args.batch_size} on {device}; {len(data.train.labels)} training images; "
          f"{torch.get_num_threads()} threads; load {load_before}; reference={args.reference}")

    steps_per_epoch = -(-len(data.train.labels) // args.batch_size)
    notes = [] if steps_per_epoch >= MIN_STEPS else [
        f"{steps_per_epoch} steps per epoch (fewer than {MIN_STEPS}): fixed per-epoch costs weigh more than in a "
        f"real epoch and inflate the speed-up; use --train-subset >= {MIN_STEPS} x --batch-size"]
    for note in notes:
        print(f"note: {note}")
    workers = args.ref_workers if args.ref_workers is not None else (2 if device.type == "cuda" else 0)
    record = bu.base_record("epoch", device, {
        "model": args.model, "model_params": params, "batch_size": args.batch_size, "device": str(device),
        "train_images": len(data.train.labels), "train_subset": args.train_subset, "epochs": args.epochs, "repeats": args.repeats,
        "steps_per_epoch": steps_per_epoch, "reference": args.reference, "amp": args.amp,
        "channels_last": args.channels_last, "compile": args.compile,
        "ref_workers": workers, "ref_persistent_workers": workers > 0,
    })
    record["notes"] = notes
    rows: list[dict] = []
    for index, name in enumerate(args.methods):
        # alternate which path goes first, so a slow drift in machine load does not favour one path
        runs: dict[str, list[dict]] = {"fast": [], "reference": []}
        for repeat in range(args.repeats):
            order = ("fast", "reference") if (index + repeat) % 2 == 0 else ("reference", "fast")
            for path in order:
                epochs = fast_epochs(name, data, args, params) if path == "fast" else reference_epochs(name, data, args, params, device)
                runs[path].append(summarise(epochs))
            last = index == len(args.methods) - 1 and repeat == args.repeats - 1
            bu.write_progress(args.progress_out, {**record, "results": rows + [method_row(name, runs)], "partial": not last,
                                                  "repeats_done": {name: repeat + 1}})
        row = method_row(name, runs)
        rows.append(row)
        print(f"  {name:20s} fast {row['fast']['epoch_seconds']:8.2f} s ({row['fast']['images_per_second']:8.0f} img/s)  "
              f"reference {row['reference']['epoch_seconds']:8.2f} s ({row['reference']['images_per_second']:8.0f} img/s)  "
              f"speed-up {row['speedup']:.2f}x", flush=True)
    load_after = bu.load_average()

    print(f"\n{'method':20s} {'fast s/epoch':>12s} {'fast img/s':>10s} {'ref s/epoch':>11s} {'ref img/s':>9s} {'speed-up':>8s}")
    for r in rows:
        print(f"{r['method']:20s} {r['fast']['epoch_seconds']:12.2f} {r['fast']['images_per_second']:10.0f} "
              f"{r['reference']['epoch_seconds']:11.2f} {r['reference']['images_per_second']:9.0f} {r['speedup']:7.2f}x")

    record["hardware"]["load_average_after"] = load_after
    record["results"] = rows
    bu.write_record(args.json_out, record)
    return record


if __name__ == "__main__":
    main()
