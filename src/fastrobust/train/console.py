"""What a training run says on the console: one line per epoch and the account of ``best`` at the end."""

from __future__ import annotations

import math
from typing import Any

from fastrobust.train import averaging


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is a terminal: progress bars only there (in a log file they are kilobytes of noise)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def lr_text(record: dict[str, Any]) -> str:
    """The epoch's learning rate on the console: ``0.1->0.001`` (first step -> last step) when the schedule
    moved it within the epoch, else the one value; records without ``lr_start`` (older) show ``lr``."""
    start, end = record.get("lr_start"), record.get("lr_end", record.get("lr"))
    if start is None or math.isclose(start, end, rel_tol=1e-9, abs_tol=0.0):
        return f"{end:.4g}"
    return f"{start:.4g}->{end:.4g}"


def epoch_line(record: dict[str, Any], *, best: str | None = None, averaged: bool = False) -> str:
    """One epoch on the console. With weight averaging (``averaged``) the averaged model's validation accuracy
    is shown beside the trained one's; ``best``: the weights this epoch made ``best`` ("model" or "averaged")."""
    parts = [f"epoch {record['epoch']}", f"lr {lr_text(record)}", f"loss {record.get('train_loss', float('nan')):.4f}"]
    if "val_robust_acc" in record:
        parts.append(f"{'trained ' if averaged else ''}val clean {record['val_clean_acc']:.3f} robust {record['val_robust_acc']:.3f}")
    prefix = averaging.PREFIX
    if averaged and prefix + "val_robust_acc" in record:
        parts.append(f"averaged val clean {record[prefix + 'val_clean_acc']:.3f} robust {record[prefix + 'val_robust_acc']:.3f}")
    parts.append(f"{record['epoch_seconds']:.1f}s ({record['images_per_second']:.0f} img/s)")
    if best is not None:
        parts.append(f"new best ({'averaged' if best == 'averaged' else 'trained'} weights)" if averaged else "new best")
    return " | ".join(parts)


def describe_best(result: dict[str, Any]) -> str:
    """The final summary's account of ``best.safetensors`` for a result record: its epoch, with weight
    averaging which weights it holds (trained or averaged), and the validation accuracies of that epoch
    (with averaging, of both the trained and the averaged weights), e.g.
    ``best: epoch 6, averaged weights; val trained clean 0.412 robust 0.231, averaged clean 0.430 robust 0.260``."""
    averaged = float(result.get("config", {}).get("ema_decay") or 0) > 0
    head = f"best: epoch {result['best_epoch']}"
    if averaged:
        head += f", {'averaged' if result.get('best_weights') == 'averaged' else 'trained'} weights"
    val = result.get("best_val") or {}
    shown = []
    for label, prefix in (("trained ", ""), ("averaged ", averaging.PREFIX)) if averaged else (("", ""),):
        if prefix + "val_robust_acc" in val:
            shown.append(f"{label}clean {val[prefix + 'val_clean_acc']:.3f} robust {val[prefix + 'val_robust_acc']:.3f}")
    return head + (f"; val {', '.join(shown)}" if shown else "")
