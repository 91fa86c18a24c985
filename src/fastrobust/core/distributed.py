"""Distributed training and evaluation on ``torch.distributed`` (launched by torchrun); see docs/distributed.md.

The trainer and ``evaluate`` use this module only; with one process every function here is a no-op or
returns its input, so single-process behaviour is unchanged.

* ``setup()`` initialises the process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): nccl (+ gloo for CPU tensors) when the run trains on
  CUDA, gloo on CPU. Each rank uses ``cuda:LOCAL_RANK``.
* ``GradientSync`` replaces DistributedDataParallel's reducer: at the end of every ``backward()`` that
  accumulates gradients into the model's parameters it all-reduces them, weighted by each rank's share of
  the global batch, in one flat buffer per bucket. Forwards and ``torch.autograd.grad`` with respect to the
  input (the methods' attacks) never trigger it; any number of forwards before one backward (TRADES) is
  fine; a method that does several updates per batch (SPROUT) gets one all-reduce per backward.
* Evaluation shards whole batches across ranks (batch ``b`` of the single-process loop goes to one rank,
  computed with the same batch size and the same per-batch seed), then sums integer counts exactly.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from fastrobust.core.contract import check_device
from fastrobust.errors import ConfigError, FastRobustError

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    restart_count: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not a whole number (set by torchrun)") from None


def restart_count() -> int:
    """How many times torchrun has restarted the workers (TORCHELASTIC_RESTART_COUNT; 0 on the first try)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def context() -> Context:
    """The current process's rank and world size (from the process group if there is one, else the env)."""
    if is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), restart_count())
    return Context(0, 1, 0, restart_count())


def wants_cuda(device_name: str) -> bool:
    return (device_name == "auto" and torch.cuda.is_available()) or str(device_name).startswith("cuda")


def setup(device_name: str = "auto") -> Context:
    """Initialise the process group when torchrun started several processes (``WORLD_SIZE`` > 1).

    An already initialised group (a user's own ``init_process_group``) is used as it is.
    """
    if is_initialized():
        ctx = context()
    else:
        world_size = _env_int("WORLD_SIZE", 1)
        if world_size <= 1:
            return context()
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        if wants_cuda(device_name):
            if device_name != "auto":
                check_device(device_name, where=None, fix="--device cpu")
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                                  "use --nproc_per_node <= the number of GPUs")
            torch.cuda.set_device(local_rank)
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        timeout = datetime.timedelta(seconds=_env_int("FASTROBUST_DIST_TIMEOUT", 1800))
        dist.init_process_group(backend=backend, store=_store(rank, world_size, timeout), rank=rank,
                                world_size=world_size, timeout=timeout)
        ctx = context()
    if ctx.active and wants_cuda(device_name) and torch.cuda.is_available():
        torch.cuda.set_device(ctx.local_rank)
    return ctx


def _store(rank: int, world_size: int, timeout: datetime.timedelta) -> "dist.Store":
    """The rendezvous store of MASTER_ADDR:MASTER_PORT, its keys prefixed by the torchrun attempt.

    torchrun's restarted workers reuse its agent's store (same MASTER_PORT): without the prefix a restarted
    rank can read the address a dead worker of the previous attempt published there and fail to connect
    (seen with gloo on torch 2.13 whenever the ranks of the new attempt start at different times).
    """
    address = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = _env_int("MASTER_PORT", 29500)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # the agent hosts the server
    store = dist.TCPStore(address, port, world_size, is_master=(rank == 0 and not agent_store), timeout=timeout,
                          multi_tenant=not agent_store)
    return dist.PrefixStore(f"fastrobust/attempt{restart_count()}", store)


def local_device(device: torch.device, ctx: Context) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA run with several processes."""
    if ctx.active and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank % max(torch.cuda.device_count(), 1))
    return device


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def _object_device() -> torch.device:
    """Tensors of small collectives go where the default backend takes them (cuda for nccl-only groups)."""
    backend = str(dist.get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; for configs, checkpoints and records)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_counts(values: Iterable[int | float], device: torch.device | str = "cpu") -> list[int | float]:
    """Element-wise sum over ranks (int64 for whole numbers, float64 otherwise): exact for counts."""
    values = list(values)
    if not is_initialized() or dist.get_world_size() == 1:
        return values
    integral = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    dtype = torch.int64 if integral else torch.float64
    target = _collective_device(torch.device(device))
    tensor = torch.tensor(values, dtype=dtype, device=target)
    dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()] if integral else tensor.tolist()


def any_rank(flag: bool | torch.Tensor, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on at least one (one tiny all-reduce)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return bool(flag)
    target = _collective_device(torch.device(device))
    tensor = (flag.detach().to(target, torch.int32).reshape(1) if torch.is_tensor(flag)
              else torch.tensor([int(bool(flag))], dtype=torch.int32, device=target))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def _collective_device(device: torch.device) -> torch.device:
    """``device`` if the default backend can reduce tensors there, else the backend's own device."""
    backend = str(dist.get_backend())
    if device.type == "cuda" and "nccl" in backend:
        return device
    if device.type == "cpu" and ("gloo" in backend or backend == "mpi"):
        return device
    return _object_device() if backend == "nccl" else torch.device("cpu")


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers into every rank's module (in place)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            target = _collective_device(tensor.device)
            if target == tensor.device and tensor.is_contiguous():
                dist.broadcast(tensor.data, src=src)
            else:
                copy = tensor.detach().to(target).contiguous()
                dist.broadcast(copy, src=src)
                tensor.copy_(copy)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A 63-bit seed for the random draws of ``rank`` from global step ``step`` on (used only with several
    ranks, or when a checkpoint's per-rank random state does not fit the new number of ranks)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(rank) + 1) * 0xD1B54A32D192ED03 + int(step) * 0x8CB92BA72F3D8DD7) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def batch_norm_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The running statistics of every (non-synchronised) BatchNorm layer: what ranks drift apart on."""
    out = []
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and not isinstance(layer, nn.SyncBatchNorm):
            out += [b for b in (layer.running_mean, layer.running_var) if b is not None and b.is_floating_point()]
    return out


class GradientSync:
    """All-reduce parameter gradients at the end of every backward that accumulates into them.

    A post-accumulate-grad hook on each parameter queues one callback on the autograd engine, which runs when
    that backward has finished: then ``grad = sum_r weight_r * grad_r`` over ranks, where ``weight`` is this
    rank's share of the global batch (``n_local / n_global``, set by the trainer before each step; 1/world by
    default). With equal shards that is DDP's average; with a short last batch it is still the gradient of the
    global batch's mean loss. The BatchNorm running statistics are averaged with the same weights in the same
    buffer (``buffers=True``), so every rank holds the same model between steps (with SyncBatchNorm they are
    already equal: pass ``buffers=False``).
    """

    BUCKET_ELEMENTS = 1 << 23  # 32 MiB of float32 per all-reduce

    def __init__(self, model: nn.Module, *, buffers: bool = True) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = batch_norm_buffers(model) if buffers else []
        self.world_size = dist.get_world_size()
        self.weight = 1.0 / self.world_size
        self.enabled = True
        self.reductions = 0  # how many backward passes were synchronised (for tests and diagnostics)
        self._queued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_accumulate) for p in self.params]

    def _on_accumulate(self, _param: torch.Tensor) -> None:
        if self.enabled and not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)

    def _finish(self) -> None:
        self._queued = False
        self.reduce()

    def reduce(self) -> None:
        """All-reduce the gradients (and BatchNorm statistics) now; every rank must call it."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.all_reduce(grads + self.buffers):
            self.reductions += 1

    def all_reduce(self, tensors: list[torch.Tensor]) -> bool:
        """``t = sum_r weight_r * t_r`` over ranks, in place, for each tensor (every rank calls it with tensors
        of the same shapes, in the same order). Also what a method uses for gradients of parameters it owns
        (``Method.gradient_reduce``: SPROUT's u). Returns whether there was anything to reduce."""
        if not tensors:
            return False
        with torch.no_grad():
            for bucket in self._buckets(tensors):
                dtype = bucket[0].dtype
                flat = torch.cat([t.reshape(-1).to(dtype) for t in bucket])
                flat.mul_(self.weight)
                target = _collective_device(flat.device)
                work = flat if target == flat.device else flat.to(target)
                dist.all_reduce(work)
                if work is not flat:
                    flat.copy_(work)
                offset = 0
                for t in bucket:
                    n = t.numel()
                    t.copy_(flat[offset:offset + n].view(t.shape))
                    offset += n
        return True

    def broadcast_buffers(self) -> None:
        """Make every rank's BatchNorm statistics rank 0's (they are equal already unless a forward ran in
        train mode after the last backward, as SPROUT's label update does)."""
        with torch.no_grad():
            for buffer in self.buffers:
                target = _collective_device(buffer.device)
                work = buffer if target == buffer.device and buffer.is_contiguous() else buffer.to(target).contiguous()
                dist.broadcast(work, src=0)
                if work is not buffer:
                    buffer.copy_(work)

    def _buckets(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        buckets: list[list[torch.Tensor]] = []
        size = 0
        for t in tensors:
            key = (t.dtype, t.device)
            if buckets and (buckets[-1][0].dtype, buckets[-1][0].device) == key and size + t.numel() <= self.BUCKET_ELEMENTS:
                buckets[-1].append(t)
                size += t.numel()
            else:
                buckets.append([t])
                size = t.numel()
        return buckets

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> SyncBatchNorm (batch statistics over the global batch); torch supports it on GPUs only."""
    if device.type != "cuda":
        raise ConfigError("sync_bn=true needs CUDA devices (torch's SyncBatchNorm runs on GPUs only): "
                          "drop --set sync_bn=true on CPU")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def on_main(function: Callable[[], Any], ctx: Context) -> Any:
    """``function()`` run by rank 0 alone, its result (or its FastRobustError, raised) on every rank.

    For file reads and checks that only rank 0's machine can do; the error reaches every rank, so none waits."""
    result: Any = None
    if ctx.is_main:
        try:
            result = function()
        except FastRobustError as error:
            result = error
    if ctx.active:
        result = broadcast_object(result)
    if isinstance(result, FastRobustError):
        raise result
    return result


def shard_indices(count: int, ctx: Context) -> list[int]:
    """The items ``0..count-1`` this rank handles: ``i`` with ``i % world_size == rank``."""
    return list(range(ctx.rank, count, ctx.world_size))


# ---- launching ------------------------------------------------------------------------------------------
def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node N -m fastrobust ARGS`` (one machine)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc)}",
            "-m", "fastrobust", *args]


def strip_nproc(argv: list[str]) -> list[str]:
    """The command line without ``--nproc N`` / ``--nproc=N``."""
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--nproc":
            skip = True
            continue
        if item.startswith("--nproc="):
            continue
        out.append(item)
    return out


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``fastrobust ARGV`` (without --nproc) under torchrun with ``nproc`` processes; its exit status."""

    if _env_int("WORLD_SIZE", 1) > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        raise ConfigError("--nproc given inside a torchrun worker: drop --nproc when launching with torchrun")
    command = torchrun_command(nproc, strip_nproc(argv))
    with tempfile.TemporaryDirectory(prefix="fastrobust-status-") as folder:
        status_file = os.path.join(folder, "status")
        try:
            code = subprocess.call(command, env={**os.environ, EXIT_STATUS_ENV: status_file})
        except KeyboardInterrupt:
            return 130
        if code == 0 and os.path.exists(status_file):  # a verdict rank 0 reached (e.g. a failed sanity check)
            with open(status_file) as handle:
                return int(handle.read().strip() or 0)
        return code


EXIT_STATUS_ENV = "FASTROBUST_EXIT_STATUS_FILE"


def exit_status(code: int, ctx: "Context") -> int:
    """The status a command returns for a verdict (not a crash): under ``relaunch`` rank 0 hands it to the
    launcher through a file and exits 0, because torchrun turns any non-zero worker status into its own failure
    (a traceback and status 1)."""
    path = os.environ.get(EXIT_STATUS_ENV)
    if not ctx.active or not path or code == 0:
        return code
    if ctx.is_main:
        with open(path, "w") as handle:
            handle.write(str(code))
    return 0


def failure_message(error: BaseException, ctx: Context, out: str | None) -> str:
    """One line for a collective that failed because another rank died or hung."""
    where = f" The last checkpoint in {out} is intact; resume with: fastrobust train --resume {out}" if out else ""
    first = " ".join(str(error).split())[:300]
    return (f"rank {ctx.rank} of {ctx.world_size} lost contact with the other ranks ({type(error).__name__}: {first}); "
            f"another rank probably died (see its output above).{where}")


def is_collective_failure(error: BaseException) -> bool:
    names = {type(e).__name__ for e in (error, error.__cause__, error.__context__) if e is not None}
    if names & {"DistBackendError", "DistNetworkError", "DistError", "DistStoreError"}:
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        key in text for key in ("gloo", "nccl", "connection closed by peer", "connection reset", "broken pipe"))


__all__ = [
    "Context", "GradientSync", "any_rank", "broadcast_module", "broadcast_object", "context", "convert_sync_batchnorm",
    "exit_status", "failure_message", "gather_objects", "is_collective_failure", "local_device", "on_main",
    "rank_seed", "relaunch", "restart_count", "setup", "shard_indices", "shutdown", "sum_counts", "torchrun_command",
]
