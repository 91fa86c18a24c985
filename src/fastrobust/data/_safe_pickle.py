"""A pickle reader that can rebuild numpy arrays and nothing else.

The official CIFAR batches are Python pickles. Loading a pickle with the default unpickler can run
arbitrary code, so the reader below refuses every global except the three numpy callables that an
array needs (``_reconstruct``, ``ndarray``, ``dtype``), under their numpy 1 and numpy 2 module names.
"""

from __future__ import annotations

import io
import pickle

import numpy as np

from fastrobust.errors import DataError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _RECONSTRUCT
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _RECONSTRUCT

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` only resolves the numpy array globals listed in ``_ALLOWED``."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: only numpy array reconstruction is allowed"
            ) from None


def safe_loads(data: bytes, *, what: str):
    """Load a pickle made only of builtin containers and numpy arrays; anything else is a DataError."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as error:
        raise DataError(f"{what}: unsafe or corrupt pickle ({error}); refusing to load it") from None
    except Exception as error:  # truncated / garbage input
        raise DataError(f"{what}: cannot read the pickle ({type(error).__name__}: {error})") from None
