"""Numba kernels: arrays and scalars in, no validation, no allocation."""

from kvq.kernels.attention import attention_blocks
from kvq.kernels.blockwise import (
    MAX_RANGE_F32,
    dequantize_blocks,
    encode_blocks,
    extrema_blocks,
    quantize_blocks,
)
from kvq.kernels.convert import bf16_to_f32, mxfp4_to_f32
from kvq.kernels.packing import pack_codes, unpack_codes
from kvq.kernels.rotate import rotate_rows
from kvq.kernels.search import refine_subcodes, search_blocks

__all__ = [
    "MAX_RANGE_F32",
    "attention_blocks",
    "bf16_to_f32",
    "dequantize_blocks",
    "encode_blocks",
    "extrema_blocks",
    "mxfp4_to_f32",
    "pack_codes",
    "quantize_blocks",
    "refine_subcodes",
    "rotate_rows",
    "search_blocks",
    "unpack_codes",
]
