"""Counting host synchronisations on the CPU: the operations that make the host wait for a CUDA device.

On CUDA a host synchronisation happens wherever the host needs a value the device computes: ``.item()``,
``bool()``/``int()``/``float()`` of a tensor (all through ``aten._local_scalar_dense``), ``.tolist()``, and every
operation whose output shape depends on the data: ``nonzero`` (also ``torch.where(cond)``), boolean-mask
indexing and boolean-mask assignment (``x[mask]``, ``x[mask] = v``: they call ``nonzero`` inside), ``masked_select``,
``unique`` and ``repeat_interleave`` without ``output_size``. These operations go through the same dispatcher on
the CPU, so a ``TorchDispatchMode`` sees each of them there too, and a CPU test can count what a CUDA run would
wait for. Not counted (invisible on the CPU): host-to-device copies such as ``torch.tensor(values, device=cuda)``.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_ALWAYS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.repeat_interleave.Tensor, aten._unique2.default, aten.unique_dim.default,
           aten.unique_consecutive.default}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _boolean_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class HostSyncs(TorchDispatchMode):
    """Counts host synchronisations (see the module docstring) inside the block; ``count`` is the total,
    ``where`` counts them by the innermost function of ``fastrobust`` that asked (``name:line``)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.where: Counter[str] = Counter()
        self._tolist = torch.Tensor.tolist

    def _record(self) -> None:
        self.count += 1
        frame = sys._getframe(2)
        while frame is not None and "fastrobust" not in frame.f_code.co_filename:
            frame = frame.f_back
        self.where[f"{frame.f_code.co_name}:{frame.f_lineno}" if frame is not None else "?"] += 1

    def within(self, *functions: str) -> int:
        """How many were asked for by the named functions (innermost ``fastrobust`` frame)."""
        return sum(n for place, n in self.where.items() if place.split(":")[0] in functions)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _ALWAYS or (func in _INDEXING and _boolean_index(args)):
            self._record()
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        tolist, record = self._tolist, self._record

        def counted_tolist(tensor, *args, **kwargs):  # a device-to-host copy, not an operator: counted here
            record()
            return tolist(tensor, *args, **kwargs)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)
