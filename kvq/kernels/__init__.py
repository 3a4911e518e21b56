"""Numba kernels: arrays and scalars in, no validation, no allocation.

Every kernel is exported through :func:`kvq._threads.serialised`: the kernel itself under a
thread-safe Numba threading layer (omp, tbb), or a wrapper that runs one kernel at a time
under the workqueue layer, which aborts the process on concurrent launches.
"""

from kvq._threads import serialised
from kvq.kernels import _cache  # noqa: F401 (first: stamps every kernel with all of kvq/kernels)
from kvq.kernels.append import stage_tokens
from kvq.kernels.attention import attention_blocks
from kvq.kernels.blockwise import (
    MAX_RANGE_F32,
    dequantize_blocks,
    encode_blocks,
    extrema_blocks,
    quantize_blocks,
)
from kvq.kernels.convert import bf16_to_f32, mxfp4_to_f32
from kvq.kernels.ggml import ggml_dequantize_blocks, ggml_quantize_blocks
from kvq.kernels.packing import pack_codes, unpack_codes
from kvq.kernels.rotate import rotate_rows
from kvq.kernels.search import refine_subcodes, search_blocks
from kvq.kernels.second_level import second_level_codes

attention_blocks = serialised(attention_blocks)
bf16_to_f32 = serialised(bf16_to_f32)
dequantize_blocks = serialised(dequantize_blocks)
encode_blocks = serialised(encode_blocks)
extrema_blocks = serialised(extrema_blocks)
ggml_dequantize_blocks = serialised(ggml_dequantize_blocks)
ggml_quantize_blocks = serialised(ggml_quantize_blocks)
mxfp4_to_f32 = serialised(mxfp4_to_f32)
pack_codes = serialised(pack_codes)
quantize_blocks = serialised(quantize_blocks)
refine_subcodes = serialised(refine_subcodes)
rotate_rows = serialised(rotate_rows)
search_blocks = serialised(search_blocks)
second_level_codes = serialised(second_level_codes)
stage_tokens = serialised(stage_tokens)
unpack_codes = serialised(unpack_codes)

__all__ = [
    "MAX_RANGE_F32",
    "attention_blocks",
    "bf16_to_f32",
    "dequantize_blocks",
    "encode_blocks",
    "extrema_blocks",
    "ggml_dequantize_blocks",
    "ggml_quantize_blocks",
    "mxfp4_to_f32",
    "pack_codes",
    "quantize_blocks",
    "refine_subcodes",
    "rotate_rows",
    "search_blocks",
    "second_level_codes",
    "stage_tokens",
    "unpack_codes",
]
