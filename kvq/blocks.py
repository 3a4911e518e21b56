"""One tensor quantized in flat blocks of uint8 codes with a scale and a min per block."""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from kvq import kernels
from kvq._format import FLOAT16_MAX
from kvq._validate import (
    SCALE_DTYPES,
    as_float32,
    check_block_size,
    check_finite,
    check_out,
    check_range,
    check_scale_dtype,
    position,
)
from kvq.pool import MemoryPool

CODE_LEVELS = np.float32(255.0)  # 8-bit codes


@dataclass(frozen=True, eq=False)
class QuantizedBlocks:
    """A tensor of ``shape`` quantized in flat row-major blocks of ``block_size`` elements.

    codes: uint8[size]; scales, mins: float32 or float16 [n_blocks]. Block ``b`` covers flat
    elements ``[b * block_size, (b + 1) * block_size)`` (the last one may be shorter), and
    element ``i`` of it dequantizes to ``mins[b] + scales[b] * codes[i]``, within
    ``scales[b] / 2`` of the input plus float32 rounding. Arrays are read-only.
    """

    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray
    shape: tuple[int, ...]
    block_size: int

    def __post_init__(self) -> None:
        """Check that the parts fit together: the kernels trust them without bounds checks."""
        block_size = check_block_size(self.block_size)
        object.__setattr__(self, "block_size", block_size)
        shape = tuple(int(d) for d in self.shape)
        object.__setattr__(self, "shape", shape)
        codes = self.codes
        if not (
            isinstance(codes, np.ndarray)
            and codes.dtype == np.uint8
            and codes.ndim == 1
            and codes.flags.c_contiguous
        ):
            raise ValueError("codes must be a 1-D C-contiguous uint8 array")
        if math.prod(shape) != codes.size:
            raise ValueError(
                f"shape {shape} holds {math.prod(shape)} elements, codes {codes.size}"
            )
        n_blocks = -(-codes.size // block_size)
        for name in ("scales", "mins"):
            array = getattr(self, name)
            if not (
                isinstance(array, np.ndarray)
                and array.dtype in SCALE_DTYPES
                and array.shape == (n_blocks,)
                and array.flags.c_contiguous
            ):
                raise ValueError(
                    f"{name} must be a C-contiguous float32 or float16 array of {n_blocks} "
                    f"elements (one per block of {block_size}), got "
                    f"{getattr(array, 'dtype', type(array).__name__)} "
                    f"{getattr(array, 'shape', '')}"
                )
        if self.scales.dtype != self.mins.dtype:
            raise ValueError(
                f"scales and mins must share a dtype, got {self.scales.dtype} and "
                f"{self.mins.dtype}"
            )
        for name in ("scales", "mins"):
            rule = "scales and mins must be finite"
            check_finite(name, getattr(self, name), rule, at=lambda b: f"block {b}")

    @classmethod
    def quantize(
        cls,
        x,
        block_size: int = 32,
        scale_dtype="float32",
        name: str = "x",
        pool: MemoryPool | None = None,
    ) -> QuantizedBlocks:
        """Quantize ``x`` (float16/32/64, any shape); ``name`` is used in error messages.

        With ``pool``, codes, scales and mins live in one array acquired from it, returned to
        the pool when this object is garbage-collected (do not keep views of them beyond it).
        """
        block_size = check_block_size(block_size)
        scale_dtype = check_scale_dtype(scale_dtype)
        original, flat = as_float32(name, x)
        return cls._from_float32(name, original, flat, block_size, scale_dtype, pool)

    @classmethod
    def _from_float32(
        cls,
        name: str,
        original: np.ndarray,
        flat: np.ndarray,
        block_size: int,
        scale_dtype: np.dtype,
        pool: MemoryPool | None = None,
    ) -> QuantizedBlocks:
        """Quantize checked input; ``flat`` is the C-order float32[size] form of ``original``."""
        half = scale_dtype == np.float16
        n_blocks = -(-flat.size // block_size)
        storage, codes, params = _allocate(flat.size, n_blocks, scale_dtype, pool)
        # the kernel writes float32 scales and mins; float16 ones are rounded to fit exactly
        scales, mins = np.empty((2, n_blocks), np.float32) if half else params
        bits = flat.view(np.int32)
        rejected = 0
        for lo, hi, piece in _pieces(0, flat.size, block_size):
            blocks = slice(lo // block_size, lo // block_size + (hi - lo) // piece)
            rejected += kernels.quantize_blocks(
                flat[lo:hi],
                bits[lo:hi],
                piece,
                CODE_LEVELS,
                half,
                codes[lo:hi],
                scales[blocks],
                mins[blocks],
            )
        if rejected:
            if pool is not None:
                pool.release(storage)
            _raise_rejected(name, original, flat, block_size, half)
        if half:
            params[0], params[1] = scales, mins
        quantized = cls(
            codes=_read_only(codes),
            scales=_read_only(params[0]),
            mins=_read_only(params[1]),
            shape=tuple(original.shape),
            block_size=block_size,
        )
        if pool is not None:
            release = weakref.finalize(quantized, pool.release, storage)
            object.__setattr__(quantized, "_release_storage", release)
        return quantized

    def _release_storage(self) -> None:
        """Return pool storage now (once); a no-op for storage NumPy owns.

        For pool storage, ``_from_float32`` shadows this method with the instance's
        ``weakref.finalize``, which releases at most once: here or at garbage collection.
        """

    @property
    def size(self) -> int:
        """Number of elements."""
        return self.codes.size

    @property
    def n_blocks(self) -> int:
        return self.scales.size

    @property
    def scale_dtype(self) -> np.dtype:
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes, scales and mins."""
        return self.codes.nbytes + self.scales.nbytes + self.mins.nbytes

    def dequantize(
        self, start: int = 0, end: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """float32[end - start]: flat elements ``[start, end)``, reading only their blocks.

        ``out``, if given, is a writeable C-contiguous float32 array of ``end - start``
        elements (any shape) that receives the result, without allocating, and is returned.
        """
        start, end = check_range(start, end, self.size)
        flat_out = check_out(out, end - start)
        for lo, hi, piece in _pieces(start, end, self.block_size):
            blocks = slice(lo // self.block_size, lo // self.block_size + (hi - lo) // piece)
            kernels.dequantize_blocks(
                self.codes[lo:hi],
                self.scales[blocks].astype(np.float32, copy=False),
                self.mins[blocks].astype(np.float32, copy=False),
                piece,
                flat_out[lo - start : hi - start],
            )
        return flat_out if out is None else out


def _allocate(
    size: int, n_blocks: int, scale_dtype: np.dtype, pool: MemoryPool | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(storage, codes uint8[size], params scale_dtype[2, n_blocks]) carved from one array.

    One allocation, from ``pool`` when given: one large block of memory is faulted in faster
    than three, and keeps the tensor's storage together. params[0] holds scales, [1] mins.
    """
    params_at = -(-size // 64) * 64  # 64-byte aligned
    nbytes = params_at + 2 * n_blocks * scale_dtype.itemsize
    storage = np.empty(nbytes, np.uint8) if pool is None else pool.acquire(nbytes, np.uint8)
    params = storage[params_at:].view(scale_dtype).reshape(2, n_blocks)
    return storage, storage[:size], params


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _pieces(start: int, end: int, block_size: int) -> Iterator[tuple[int, int, int]]:
    """Split ``[start, end)`` into kernel calls ``(lo, hi, piece_block_size)``.

    At most three: a partial first block, a run of whole blocks, a partial last block. Each
    partial one is a single block whose block size is its own length.
    """
    pos = start
    if pos % block_size and pos < end:
        stop = min(end, (pos // block_size + 1) * block_size)
        yield pos, stop, stop - pos
        pos = stop
    whole_end = pos + (end - pos) // block_size * block_size
    if whole_end > pos:
        yield pos, whole_end, block_size
    if end > whole_end:
        yield whole_end, end, end - whole_end


def _raise_rejected(name, original, flat, block_size, half) -> None:
    """Raise ValueError naming the first element that made the kernel reject a block."""
    shape = original.shape
    rule = (
        "kvq quantizes finite values only (replace or mask NaN/Inf first, e.g. with np.nan_to_num)"
    )
    check_finite(name, flat, rule, original)
    starts = np.arange(0, flat.size, block_size)
    lows = np.minimum.reduceat(flat, starts)
    highs = np.maximum.reduceat(flat, starts)
    if half:
        bad = (lows < -FLOAT16_MAX) | (highs > FLOAT16_MAX)
        limit = (
            f"float16 scales and mins need every value within +-{FLOAT16_MAX:g}; "
            "use scale_dtype='float32'"
        )
    else:
        bad = ~(highs.astype(np.float64) - lows <= float(kernels.MAX_RANGE_F32))
        limit = "max - min must be at most 2**127 (1.7e38); rescale the tensor"
    block = int(np.flatnonzero(bad)[0]) if bad.any() else 0
    lo, hi = block * block_size, min((block + 1) * block_size, flat.size)
    index = lo + int(np.argmax(np.abs(flat[lo:hi])))
    raise ValueError(
        f"{name}: block {block} (flat elements [{lo}, {hi})) spans "
        f"[{float(lows[block])!r}, {float(highs[block])!r}], largest magnitude at flat index "
        f"{position(index, shape)}; {limit}"
    )
