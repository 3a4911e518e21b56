"""``MemoryPool``: NumPy arrays carved from one preallocated, 64-byte aligned buffer.

Bookkeeping, all under one lock: a sorted list of free ranges ``[offset, size]`` and a dict of
live allocations ``offset -> (array, reserved bytes)``. Every offset and reserved size is a
multiple of ``ALIGNMENT``, so every array starts 64-byte aligned.
"""

from __future__ import annotations

import bisect
import operator
import threading

import numpy as np

from kvq.errors import PoolExhausted

ALIGNMENT = 64


def _round_up(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _as_int(value) -> int | None:
    """``value`` as an int (NumPy ints accepted), or None for bools, floats and the rest."""
    if isinstance(value, bool | np.bool_):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_shape(shape) -> tuple[int, ...]:
    """An int or a sequence of ints, each >= 0."""
    dims = (shape,) if _as_int(shape) is not None else shape
    try:
        dims = tuple(_as_int(d) for d in dims)
    except TypeError:
        dims = (None,)
    if None in dims:
        raise TypeError(f"shape must be an int or a tuple of ints, got {shape!r}")
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must not have negative dimensions, got {shape!r}")
    return dims


def _check_dtype(dtype) -> np.dtype:
    """A NumPy dtype of fixed, nonzero itemsize that holds no Python objects."""
    try:
        result = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a NumPy dtype, got {dtype!r}") from None
    if result.hasobject or result.itemsize == 0:
        raise TypeError(
            f"dtype must be a fixed-size dtype without Python objects, got {result}; "
            "use e.g. np.float32, np.uint8 or 'S16'"
        )
    return result


class MemoryPool:
    """Arrays carved from one preallocated buffer of ``capacity`` bytes, 64-byte aligned.

    ``capacity`` is ``nbytes`` rounded up to a multiple of 64. Each ``acquire`` reserves its
    size rounded up to 64 bytes (at least 64, so a zero-size request still gets its own
    address and is released like any other). Placement is first-fit: the lowest-addressed
    free range that is large enough. ``release`` returns a range and merges it with free
    neighbours, so the free ranges are always exactly the gaps between live arrays.
    Thread-safe: all bookkeeping happens under one lock.
    """

    def __init__(self, nbytes: int) -> None:
        size = _as_int(nbytes)
        if size is None:
            raise TypeError(f"nbytes must be an integer, got {type(nbytes).__name__} {nbytes!r}")
        if size < 1:
            raise ValueError(f"nbytes must be >= 1, got {size}")
        capacity = _round_up(size)
        raw = np.empty(capacity + ALIGNMENT, np.uint8)
        pad = -raw.ctypes.data % ALIGNMENT
        self._buffer = raw[pad : pad + capacity]
        self._address = self._buffer.ctypes.data
        self._lock = threading.Lock()
        self._free: list[list[int]] = [[0, capacity]]  # sorted by offset, never adjacent
        self._live: dict[int, tuple[np.ndarray, int]] = {}  # offset -> (array, reserved)
        self._in_use = 0
        self._peak = 0

    @property
    def capacity(self) -> int:
        """Bytes in the pool (``nbytes`` rounded up to a multiple of 64)."""
        return self._buffer.size

    def acquire(self, shape, dtype) -> np.ndarray:
        """A writeable C-contiguous ``dtype`` array of ``shape`` whose start is 64-byte aligned.

        Its contents are whatever was there before (like ``np.empty``). Raises PoolExhausted
        when no free range holds the request rounded up to 64 bytes.
        """
        dims = _check_shape(shape)
        dtype = _check_dtype(dtype)
        nbytes = dtype.itemsize
        for d in dims:
            nbytes *= d
        reserved = max(_round_up(nbytes), ALIGNMENT)
        with self._lock:
            index = next((i for i, (_, size) in enumerate(self._free) if size >= reserved), None)
            if index is None:
                largest = max((size for _, size in self._free), default=0)
                raise PoolExhausted(
                    f"MemoryPool cannot fit shape {dims} {dtype}: it needs {reserved:,} bytes "
                    f"({nbytes:,} rounded up to a multiple of 64), but "
                    f"{self.capacity - self._in_use:,} of {self.capacity:,} bytes are free and "
                    f"the largest free range is {largest:,} bytes; release arrays or create a "
                    "larger pool"
                )
            offset, size = self._free[index]
            if size == reserved:
                del self._free[index]
            else:
                self._free[index] = [offset + reserved, size - reserved]
            array = np.ndarray(dims, dtype, buffer=self._buffer, offset=offset)
            self._live[offset] = (array, reserved)
            self._in_use += reserved
            self._peak = max(self._peak, self._in_use)
        return array

    def release(self, array: np.ndarray) -> None:
        """Return ``array`` to the pool. It must be the very object ``acquire`` returned.

        Views, slices and reshapes of it are refused (ValueError), and so is a second release:
        the pool keeps the acquired object and compares identity, so a stale array is caught
        even after its memory went to a new ``acquire``. Do not use the array afterwards.
        """
        if not isinstance(array, np.ndarray):
            raise TypeError(
                f"release needs a NumPy array from acquire(), got {type(array).__name__}"
            )
        offset = array.ctypes.data - self._address
        with self._lock:
            entry = self._live.get(offset)
            if entry is not None and entry[0] is array:
                del self._live[offset]
                self._in_use -= entry[1]
                self._insert_free(offset, entry[1])
                return
        if not 0 <= offset < self.capacity:
            raise ValueError(
                f"release got an array (shape {array.shape}, {array.dtype}) that did not come "
                "from this pool"
            )
        raise ValueError(
            f"release got an array (shape {array.shape}, {array.dtype}) at pool offset "
            f"{offset} that is not a live array of this pool: it was already released, or it "
            "is a view, slice or reshape of one; pass the exact object acquire() returned"
        )

    def _insert_free(self, offset: int, size: int) -> None:
        """Add ``[offset, offset + size)`` to the free list, merged with touching neighbours."""
        i = bisect.bisect_left(self._free, [offset, size])
        if i < len(self._free) and offset + size == self._free[i][0]:
            size += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            self._free[i - 1][1] += size
        else:
            self._free.insert(i, [offset, size])

    def stats(self) -> dict[str, int]:
        """Byte counts (reserved, in 64-byte units) and counts of the pool's state.

        capacity, in_use, peak (largest in_use so far), largest_free (largest free range):
        bytes; live: arrays acquired and not released; free_blocks: separate free ranges.
        """
        with self._lock:
            return {
                "capacity": self.capacity,
                "in_use": self._in_use,
                "peak": self._peak,
                "live": len(self._live),
                "largest_free": max((size for _, size in self._free), default=0),
                "free_blocks": len(self._free),
            }

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"MemoryPool(capacity={s['capacity']:,}, in_use={s['in_use']:,}, "
            f"peak={s['peak']:,}, live={s['live']}, largest_free={s['largest_free']:,})"
        )
