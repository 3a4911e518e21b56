"""Numba kernels: arrays and scalars in, no validation, no allocation."""

from kvq.kernels.blockwise import (
    MAX_RANGE_F32,
    dequantize_blocks,
    encode_blocks,
    extrema_blocks,
    quantize_blocks,
)
from kvq.kernels.convert import bf16_to_f32, mxfp4_to_f32
from kvq.kernels.packing import pack_codes, unpack_codes
from kvq.kernels.search import search_blocks

__all__ = [
    "MAX_RANGE_F32",
    "bf16_to_f32",
    "dequantize_blocks",
    "encode_blocks",
    "extrema_blocks",
    "mxfp4_to_f32",
    "pack_codes",
    "quantize_blocks",
    "search_blocks",
    "unpack_codes",
]
