"""Block-wise affine quantization kernels (any bit width up to 8) over flat float32 arrays.

Each kernel call covers whole blocks: ``x.shape[0] == n_blocks * block_size``. The caller
handles a shorter last block (or a partial first/last block of a range) with a second call
whose ``block_size`` is that piece's length, which keeps every inner loop's trip count equal
to ``block_size`` and lets LLVM vectorize it fully (a clipped count cost ~15% here).

Per block: ``min``, ``scale = (max - min) / levels`` (``levels = 2**bits - 1``, 255 for
8 bits) and codes ``rint((x - min) * (1 / scale))`` in ``[0, levels]``, one uint8 each, so
that ``min + scale * code`` lies within ``scale / 2`` of ``x`` (plus float32 rounding).
Kernels take arrays and scalars only; callers validate and allocate.
"""

import numpy as np
from numba import njit, prange

from kvq.kernels._floatbits import (
    F32_MIN_NORMAL,
    FLOAT16_MAX,
    KEY_NEG_INF,
    KEY_POS_INF,
    float16_round_down,
    float16_round_up,
    key_to_float,
    order_key,
)
from kvq.kernels._simd import SIMD_BLOCK, decode_32, encode_32, extrema_keys_32

#: Largest block range (max - min) accepted with float32 scales: 2**127, so that
#: ``x - min`` and ``scale * levels`` stay finite in float32.
MAX_RANGE_F32 = np.float32(2.0**127)
# Below this scale, 1/scale may overflow float32: such blocks divide instead of multiplying.
_SMALLEST_INVERTIBLE_SCALE = np.float32(F32_MIN_NORMAL * 4)


@njit(inline="always")
def _extrema_keys(bits, lo, count):
    """Order keys of the smallest and largest float32 in bits[lo:lo + count].

    On a view of the block: indices provably >= 0 let LLVM drop Numba's negative-index
    wraparound and vectorize (flat bits[lo + i] indexing ran 2x slower).
    """
    block_bits = bits[lo : lo + count]
    key_min = np.int32(0x7FFFFFFF)
    key_max = np.int32(-0x80000000)
    for i in range(count):
        key = order_key(block_bits[i])
        key_min = np.int32(min(key_min, key))
        key_max = np.int32(max(key_max, key))
    return key_min, key_max


@njit(inline="always")
def _min_and_scale(key_min, key_max, levels, half_scales):
    """(accepted, min, scale) of a block from the order keys of its extremes."""
    if key_min <= KEY_NEG_INF or key_max >= KEY_POS_INF:  # NaN or +-Inf in the block
        return False, np.float32(0.0), np.float32(0.0)
    lowest = key_to_float(key_min)
    highest = key_to_float(key_max)
    if not highest - lowest <= MAX_RANGE_F32:
        return False, lowest, np.float32(0.0)
    if not half_scales:
        return True, lowest, (highest - lowest) / levels
    if lowest < -FLOAT16_MAX or highest > FLOAT16_MAX:
        return False, lowest, np.float32(0.0)
    lowest = float16_round_down(lowest)
    scale = float16_round_up((highest - lowest) / levels)
    return scale <= FLOAT16_MAX, lowest, scale


@njit(inline="always")
def _invertible(scale):
    """True when codes may use x * (1 / scale): scale is 0 (inverse 0) or 1/scale is finite."""
    return scale == 0 or scale >= _SMALLEST_INVERTIBLE_SCALE


@njit(inline="always")
def _encode(x, lo, count, lowest, scale, levels, codes):
    """codes[lo:lo + count] for one block, any scale (generic loop)."""
    block = x[lo : lo + count]
    block_codes = codes[lo : lo + count]
    if _invertible(scale):
        inverse = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
        for i in range(count):
            level = np.rint((block[i] - lowest) * inverse)
            block_codes[i] = np.uint8(min(level, levels))
    else:  # subnormal scale (max - min < 2**-116): divide, rare and slower
        for i in range(count):
            level = np.rint((block[i] - lowest) / scale)
            block_codes[i] = np.uint8(min(level, levels))


@njit(parallel=True, cache=True)
def quantize_blocks(x, bits, block_size, levels, half_scales, codes, scales, mins):
    """Quantize ``x`` to uint8 codes, block by block; return the number of rejected blocks.

    x: float32[n_blocks * block_size]; bits: int32 view of the same memory.
    levels: float32 top code, 2**bits - 1 (at most 255).
    half_scales: round each min down and scale up to float16-representable values first.
    Out: codes uint8[n]; scales, mins float32[n_blocks].
    A block is rejected (its outputs unspecified) if it holds NaN or +-Inf, if max - min
    exceeds MAX_RANGE_F32, or, with half_scales, if a value or the scale exceeds 65504.
    The extremes come from integer min/max of order-preserving keys: that vectorizes without
    fast-math, and a NaN or Inf puts a key on or beyond those of +-inf.
    """
    rejected = 0
    if block_size == SIMD_BLOCK:  # separate loop: generic code in the body slowed it 1.5x
        for b in prange(scales.shape[0]):
            lo = b * SIMD_BLOCK
            key_min, key_max = extrema_keys_32(bits, lo)
            accepted, lowest, scale = _min_and_scale(key_min, key_max, levels, half_scales)
            if not accepted:
                rejected += 1
                continue
            scales[b] = scale
            mins[b] = lowest
            if _invertible(scale):
                inverse = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
                encode_32(x, lo, lowest, inverse, levels, codes)
            else:
                _encode(x, lo, SIMD_BLOCK, lowest, scale, levels, codes)
    else:
        for b in prange(scales.shape[0]):
            lo = b * block_size
            key_min, key_max = _extrema_keys(bits, lo, block_size)
            accepted, lowest, scale = _min_and_scale(key_min, key_max, levels, half_scales)
            if not accepted:
                rejected += 1
                continue
            scales[b] = scale
            mins[b] = lowest
            _encode(x, lo, block_size, lowest, scale, levels, codes)
    return rejected


@njit(parallel=True, cache=True)
def extrema_blocks(bits, block_size, lows, highs):
    """Per-block min and max of float32 values given as int32 ``bits``; returns the number of
    blocks holding NaN or +-Inf (their extremes are unspecified).

    bits: int32[n_blocks * block_size]. Out: lows, highs float32[n_blocks].
    """
    rejected = 0
    for b in prange(lows.shape[0]):
        lo = b * block_size
        if block_size == SIMD_BLOCK:
            key_min, key_max = extrema_keys_32(bits, lo)
        else:
            key_min, key_max = _extrema_keys(bits, lo, block_size)
        if key_min <= KEY_NEG_INF or key_max >= KEY_POS_INF:
            rejected += 1
            continue
        lows[b] = key_to_float(key_min)
        highs[b] = key_to_float(key_max)
    return rejected


@njit(parallel=True, cache=True)
def encode_blocks(x, block_size, levels, scales, mins, codes):
    """codes = min(rint((x - mins[b]) * (1 / scales[b])), levels), clipped below at 0.

    For scales and mins chosen by the caller (second-level quantized, or range-searched):
    values outside ``[min, min + levels * scale]`` clip to the end codes.
    x: float32[n_blocks * block_size]; scales, mins: float32[n_blocks]; codes: uint8[n].
    """
    for b in prange(scales.shape[0]):
        lo = b * block_size
        scale = scales[b]
        lowest = mins[b]
        block = x[lo : lo + block_size]
        block_codes = codes[lo : lo + block_size]
        if _invertible(scale):
            inverse = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
            for i in range(block_size):
                level = np.rint((block[i] - lowest) * inverse)
                block_codes[i] = np.uint8(min(max(level, np.float32(0.0)), levels))
        else:
            for i in range(block_size):
                level = np.rint((block[i] - lowest) / scale)
                block_codes[i] = np.uint8(min(max(level, np.float32(0.0)), levels))


@njit(parallel=True, cache=True)
def dequantize_blocks(codes, scales, mins, block_size, out):
    """out = mins[b] + scales[b] * codes, block by block.

    codes: uint8[n_blocks * block_size]; scales, mins: float32[n_blocks];
    out: float32[n_blocks * block_size].
    """
    for b in prange(scales.shape[0]):
        lo = b * block_size
        scale = scales[b]
        lowest = mins[b]
        if block_size == SIMD_BLOCK:
            decode_32(codes, lo, scale, lowest, out)
        else:
            block_codes = codes[lo : lo + block_size]
            block_out = out[lo : lo + block_size]
            for i in range(block_size):
                block_out[i] = lowest + scale * np.float32(block_codes[i])
