"""QuantizedKVCache: a key/value pair quantized block-wise to uint8 (phase 3)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvq._bytes import human_bytes
from kvq._validate import as_float32, check_block_size, check_scale_dtype
from kvq.blocks import QuantizedBlocks
from kvq.pool import MemoryPool

FLOAT32_BYTES = 4


@dataclass(frozen=True, eq=False)
class QuantizedKVCache:
    """Keys and values of one shape, each quantized in flat blocks of ``block_size`` elements.

    This is the original design's (phase 3) interface -- ``block_size``, ``dequant_k`` /
    ``dequant_v`` over flat element ranges, ``compression_ratio()`` -- over the same 8-bit
    min/max kernels as ``kvq.quantize(x, bits=8, group_size=block_size)`` on the flattened
    tensor; ``group_size`` and ``bits_per_element`` give it the rest of kvq's vocabulary.

    Each block stores uint8 codes, a min and ``scale = (max - min) / 255`` (float32, or float16
    with ``scale_dtype="float16"``). Dequantized elements are within ``scale / 2`` of the input,
    plus float32 rounding (about 1e-6 of the block's largest magnitude).

    >>> cache = QuantizedKVCache.quantize(k, v, block_size=32)   # doctest: +SKIP
    >>> cache.dequant_k(0, 64)                                   # float32[64]  # doctest: +SKIP
    """

    k: QuantizedBlocks
    v: QuantizedBlocks

    @classmethod
    def quantize(
        cls, k, v, block_size: int = 32, scale_dtype="float32", pool: MemoryPool | None = None
    ) -> QuantizedKVCache:
        """Quantize ``k`` and ``v`` (equal shapes; float16, float32 or float64 NumPy arrays,
        ``kvq.Array``, or anything ``np.asarray`` takes).

        ``pool``: a ``kvq.MemoryPool`` to store codes, scales and mins in; they return to it
        when the cache is garbage-collected.

        Empty tensors give an empty cache. Raises ValueError for NaN/Inf (naming the tensor and
        the first bad flat index), mismatched shapes or block_size < 1, and TypeError for
        non-floating dtypes. Nothing is kept when anything fails.
        """
        block_size = check_block_size(block_size)
        scale_dtype = check_scale_dtype(scale_dtype)
        k_original, k_flat = as_float32("k", k)
        v_original, v_flat = as_float32("v", v)
        if k_original.shape != v_original.shape:
            raise ValueError(
                f"k and v must have the same shape, got k {k_original.shape} "
                f"and v {v_original.shape}"
            )
        quantize = QuantizedBlocks._from_float32
        k_blocks = quantize("k", k_original, k_flat, block_size, scale_dtype, pool)
        try:
            v_blocks = quantize("v", v_original, v_flat, block_size, scale_dtype, pool)
        except BaseException:
            k_blocks._release_storage()  # leave the pool as it was
            raise
        return cls(k=k_blocks, v=v_blocks)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.k.shape

    @property
    def size(self) -> int:
        """Elements per tensor."""
        return self.k.size

    @property
    def block_size(self) -> int:
        """Elements per block (this phase's word for kvq's ``group_size``)."""
        return self.k.block_size

    @property
    def group_size(self) -> int:
        """:attr:`block_size` under the name the rest of kvq uses."""
        return self.k.block_size

    @property
    def bits_per_element(self) -> float:
        """Measured bits per stored element, K and V together (NaN for an empty cache)."""
        return 8 * self.nbytes / (2 * self.size) if self.size else float("nan")

    @property
    def scale_dtype(self) -> np.dtype:
        return self.k.scale_dtype

    @property
    def nbytes(self) -> int:
        """Every byte stored for K and V: codes, scales and mins."""
        return self.k.nbytes + self.v.nbytes

    def compression_ratio(self) -> float:
        """float32 bytes of K and V over :attr:`nbytes` (NaN for an empty cache)."""
        if self.nbytes == 0:
            return float("nan")
        return 2 * self.size * FLOAT32_BYTES / self.nbytes

    def dequant_k(
        self, start: int = 0, end: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """float32[end - start] keys of the flat row-major range ``[start, end)``.

        ``out``: optional preallocated float32 array of ``end - start`` elements to fill.
        """
        return self.k.dequantize(start, end, out)

    def dequant_v(
        self, start: int = 0, end: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """float32[end - start] values of the flat row-major range ``[start, end)``."""
        return self.v.dequantize(start, end, out)

    def __repr__(self) -> str:
        return (
            f"QuantizedKVCache(shape={self.shape}, block_size={self.block_size}, "
            f"codes=uint8, scale_dtype={self.scale_dtype}, nbytes={human_bytes(self.nbytes)}, "
            f"float32={human_bytes(2 * self.size * FLOAT32_BYTES)}, "
            f"compression={self.compression_ratio():.2f}x)"
        )
