"""Numba kernels: arrays and scalars in, no validation, no allocation."""

from kvq.kernels.blockwise import MAX_RANGE_F32, dequantize_blocks, quantize_blocks
from kvq.kernels.convert import bf16_to_f32, mxfp4_to_f32

__all__ = [
    "MAX_RANGE_F32",
    "bf16_to_f32",
    "dequantize_blocks",
    "mxfp4_to_f32",
    "quantize_blocks",
]
