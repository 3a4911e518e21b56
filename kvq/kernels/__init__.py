"""Numba kernels: arrays and scalars in, no validation, no allocation."""

from kvq.kernels.blockwise import MAX_RANGE_F32, dequantize_blocks, quantize_blocks

__all__ = ["MAX_RANGE_F32", "dequantize_blocks", "quantize_blocks"]
