"""``Array``: one n-d array type for CPU (a NumPy array) and GPU (a numba.cuda device array).

numba.cuda is imported only when a GPU is asked about (``devices()``, ``to("gpu")``), so
``import kvq`` does not pay for it, and the availability check runs once per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvq.errors import DeviceError

DEVICES = ("cpu", "gpu")


@functools.cache
def _gpu_available() -> bool:
    """True when numba.cuda sees a CUDA GPU (or its simulator, NUMBA_ENABLE_CUDASIM=1)."""
    try:
        from numba import cuda
    except ImportError:  # pragma: no cover - numba ships numba.cuda
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # pragma: no cover - a broken driver counts as no GPU
        return False


def devices() -> list[str]:
    """The devices an ``Array`` can live on here: ``["cpu"]`` or ``["cpu", "gpu"]``."""
    return ["cpu", "gpu"] if _gpu_available() else ["cpu"]


def _check_device(device) -> str:
    if not isinstance(device, str) or device not in DEVICES:
        raise ValueError(f"device must be one of {list(DEVICES)}, got {device!r}")
    if device == "gpu" and not _gpu_available():
        raise DeviceError(
            "device 'gpu' is not available: no CUDA GPU is visible to numba.cuda "
            f"(numba.cuda.is_available() is False); kvq.devices() is {devices()}"
        )
    return device


@dataclass(frozen=True, eq=False, repr=False)
class Array:
    """An n-d array of any fixed-size NumPy dtype on ``device`` ("cpu" or "gpu").

    ``data`` is the storage itself: the ``np.ndarray`` on "cpu", a numba.cuda device array on
    "gpu". Build one with ``Array.from_numpy(a)`` (zero-copy), or wrap an existing numba.cuda
    device array with ``Array(d, "gpu")``. Transfers copy bytes, so every value comes back bit
    for bit (NaN payloads, -0.0, any byte order); ``to("gpu")`` makes a C-contiguous copy.
    """

    data: Any
    device: str = "cpu"

    def __post_init__(self) -> None:
        _check_device(self.device)
        if self.device == "cpu" and not isinstance(self.data, np.ndarray):
            raise TypeError(
                f"data of a 'cpu' Array must be a NumPy array, got {type(self.data).__name__}; "
                "use Array.from_numpy(np.asarray(x))"
            )
        if self.device == "gpu" and not hasattr(self.data, "copy_to_host"):
            raise TypeError(
                "data of a 'gpu' Array must be a numba.cuda device array, got "
                f"{type(self.data).__name__}; use Array.from_numpy(x).to('gpu')"
            )

    @classmethod
    def from_numpy(cls, a: np.ndarray) -> Array:
        """A "cpu" Array holding ``a`` itself: no copy, same memory, same strides.

        Any shape (0-d, 1-d, N-d, zero-size) and layout (non-contiguous views are kept as
        they are); writes through ``a`` show in the Array and back. Dtypes holding Python
        objects are refused (TypeError), because their bytes cannot move between devices.
        """
        if not isinstance(a, np.ndarray):
            raise TypeError(
                f"Array.from_numpy needs a NumPy ndarray, got {type(a).__name__}; "
                "convert it first, e.g. Array.from_numpy(np.asarray(x))"
            )
        if a.dtype.hasobject:
            raise TypeError(
                f"Array.from_numpy needs a fixed-size dtype, got {a.dtype} (holds Python "
                "objects); convert it first, e.g. a.astype(np.float32)"
            )
        return cls(a, "cpu")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    @property
    def ndim(self) -> int:
        return len(self.data.shape)

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(self.data.size)

    @property
    def nbytes(self) -> int:
        """Bytes of the elements: ``size * dtype.itemsize`` (not the span of a strided view)."""
        return self.size * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        """The data as a NumPy array: on "cpu" the held array itself (no copy); on "gpu" a
        new C-contiguous host copy."""
        if self.device == "cpu":
            return self.data
        return self.data.copy_to_host()

    def to(self, device: str) -> Array:
        """This array on ``device`` ("cpu" or "gpu"): ``self`` when already there, else a copy.

        Raises ValueError for an unknown device and DeviceError for "gpu" without CUDA.
        """
        device = _check_device(device)
        if device == self.device:
            return self
        if device == "cpu":
            return Array(self.data.copy_to_host(), "cpu")
        from numba import cuda

        # Device arrays are C-contiguous; only a non-C-contiguous input is copied on the host.
        return Array(cuda.to_device(np.array(self.data, order="C", copy=None)), "gpu")

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """``np.asarray(array)``: no copy on "cpu" when ``dtype`` matches; a copy on "gpu"."""
        if self.device == "cpu":
            return np.array(self.data, dtype=dtype, copy=copy)
        if copy is False:
            raise ValueError(
                "a 'gpu' Array cannot become a NumPy array without a copy (copy=False); "
                "use copy=None or array.numpy()"
            )
        return np.asarray(self.data.copy_to_host(), dtype=dtype)

    def __repr__(self) -> str:
        layout = "" if self.device == "gpu" or self.data.flags.c_contiguous else ", strided"
        return (
            f"Array(shape={self.shape}, dtype={self.dtype}, device={self.device!r}, "
            f"nbytes={self.nbytes:,}{layout})"
        )
