"""Read a pickled numpy array without letting the pickle run code (docs/differences.md).

The release stores the mean routing weights with `pickle.dump`. Unpickling may call any importable
function a file names, so this loader resolves only the handful of globals a plain numeric array needs
and refuses everything else before it is imported, let alone called:

    numpy 2.x:  numpy._core.multiarray._reconstruct / scalar, numpy._core.numeric._frombuffer
    numpy 1.x:  the same under numpy.core.*
    both:       numpy.ndarray, numpy.dtype (numeric dtypes only),
                _codecs.encode (latin-1 only: protocol-2 pickles carry the raw bytes as a str)
"""

from __future__ import annotations

import importlib
import logging
import numbers
import pickle
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# Kinds a stored routing distribution may have: signed/unsigned integer and float.
NUMERIC_KINDS = "iuf"


class UnsafePickleError(ValueError):
    """The file is missing, malformed, names a global outside the allowlist, or is not a numeric array."""


class _Refused(Exception):
    """Raised inside the unpickler; the loader adds the file name."""


def _numpy_core(submodule: str):
    """numpy 2 keeps the internals in numpy._core; numpy 1 in numpy.core (imported without the shim's warning)."""
    try:
        return importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{submodule}")


def _numeric_dtype(spec, align=False, copy=False):
    """numpy.dtype, restricted so that object (or structured) dtypes are refused before any data is built."""
    if not isinstance(spec, str):
        raise _Refused(f"refused dtype spec of type {type(spec).__name__} (only dtype strings are accepted)")
    dtype = np.dtype(spec, align=bool(align), copy=bool(copy))
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise _Refused(f"refused dtype {dtype} (only integer and float arrays are accepted)")
    return dtype


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """_codecs.encode as protocol-2 numpy pickles use it: a str of raw bytes back to bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _Refused(f"refused _codecs.encode with encoding {encoding!r} (only latin-1 byte strings are accepted)")
    return text.encode("latin-1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    multiarray, numeric = _numpy_core("multiarray"), _numpy_core("numeric")
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _numeric_dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy._core", "numpy.core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves globals from a fixed table instead of importing what the file asks for."""

    def __init__(self, file):
        super().__init__(file)
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _Refused(f"refused global {module}.{name} (only plain numeric numpy arrays are accepted)") from None

    def persistent_load(self, pid):
        raise _Refused("refused persistent id (only plain numeric numpy arrays are accepted)")


def _as_numeric_array(obj) -> np.ndarray | None:
    """The loaded object as a numeric ndarray, or None if it is anything else."""
    if isinstance(obj, np.generic):  # a bare numpy scalar
        obj = np.asarray(obj)
    if isinstance(obj, np.ndarray):
        if type(obj) is not np.ndarray or obj.dtype.kind not in NUMERIC_KINDS or obj.dtype.hasobject:
            return None
        return obj
    if isinstance(obj, list) and all(
        isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in obj
    ):
        return np.asarray(obj, dtype=np.float64)
    return None


def load_numpy_pickle(path: str | Path) -> np.ndarray:
    """The numeric array pickled in `path` (a plain list of numbers is accepted too, as float64).

    Raises UnsafePickleError, with one line naming the file, for anything else.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            obj = _ArrayUnpickler(handle).load()
    except FileNotFoundError:
        raise UnsafePickleError(f"{path}: file is missing") from None
    except _Refused as err:
        raise UnsafePickleError(f"{path}: {err}") from None
    except Exception as err:  # malformed pickles raise many types (UnpicklingError, EOFError, ValueError, ...)
        detail = (str(err).splitlines() or [""])[0]
        raise UnsafePickleError(f"{path}: malformed pickle ({type(err).__name__}: {detail})") from None
    array = _as_numeric_array(obj)
    if array is None:
        what = f"{type(obj).__name__} of dtype {obj.dtype}" if isinstance(obj, np.ndarray) else type(obj).__name__
        raise UnsafePickleError(f"{path}: expected a pickled numeric numpy array, found {what}")
    logger.debug("%s: read %s array of shape %s", path, array.dtype, array.shape)
    return array
