"""Format conversion kernels: bfloat16 and MXFP4 (GPT-OSS expert weights) to float32.

Both produce float32 bit patterns with integer operations, which vectorize, rather than table
lookups, which would need gathers. Results are exact: bf16 is the top half of a float32, and
an FP4 value times a power-of-two scale is representable in float32.
"""

import numpy as np
from numba import njit, prange

from kvq.kernels._floatbits import bits_to_float

# Output elements per prange iteration: large enough to amortise scheduling, small enough to
# split a tensor across both cores.
_CHUNK = 1 << 16
_MXFP4_BLOCK_BYTES = 16  # 32 FP4 values per block, one shared scale


@njit(parallel=True, cache=True)
def bf16_to_f32(bits, out_bits):
    """out_bits[i] = bits[i] << 16: bfloat16 (uint16 bit patterns) -> float32 (uint32 bits)."""
    n = bits.shape[0]
    for chunk in prange((n + _CHUNK - 1) // _CHUNK):
        lo = chunk * _CHUNK
        hi = min(lo + _CHUNK, n)
        source = bits[lo:hi]
        target = out_bits[lo:hi]
        for i in range(hi - lo):
            target[i] = np.uint32(source[i]) << np.uint32(16)


@njit(inline="always")
def _fp4_bits(nibble):
    """float32 bit pattern of an FP4 E2M1 value (sign, 2-bit exponent, 1-bit mantissa).

    0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives: exponent field e > 0 gives
    2**(e - 1) * (1 + m / 2), e == 0 gives m / 2 (so 0 or 0.5).
    """
    sign = (nibble & np.uint32(8)) << np.uint32(28)
    exponent = (nibble >> np.uint32(1)) & np.uint32(3)
    mantissa = nibble & np.uint32(1)
    normal = ((exponent + np.uint32(126)) << np.uint32(23)) | (mantissa << np.uint32(22))
    subnormal = mantissa * np.uint32(126 << 23)  # 0.5 or +-0
    return sign | (normal if exponent != 0 else subnormal)


@njit(inline="always")
def _e8m0_bits(scale):
    """float32 bit pattern of the E8M0 scale 2**(scale - 127); 255 is NaN (OCP MX spec)."""
    if scale == 255:
        return np.uint32(0x7FC00000)
    if scale == 0:
        return np.uint32(0x00400000)  # 2**-127, a float32 subnormal
    return np.uint32(scale) << np.uint32(23)


@njit(inline="always")
def _fp4_scaled_bits(nibble, exponent_shift):
    """float32 bits of FP4 ``nibble`` times 2**exponent_shift, for results that stay normal.

    The scale is added to the exponent field, so no multiply is needed: magnitude codes 2-7
    have exponent (code >> 1) + 126 and mantissa bit code & 1; code 1 (0.5) has exponent 126;
    code 0 is zero (keeping its sign).
    """
    magnitude = nibble & np.uint32(7)
    sign = (nibble & np.uint32(8)) << np.uint32(28)
    large = magnitude >= np.uint32(2)
    exponent = (magnitude >> np.uint32(1) if large else np.uint32(0)) + np.uint32(
        126 + exponent_shift
    )
    mantissa = (magnitude & np.uint32(1)) << np.uint32(22) if large else np.uint32(0)
    body = (exponent << np.uint32(23)) | mantissa
    return sign | (body if magnitude != 0 else np.uint32(0))


@njit(parallel=True, cache=True)
def mxfp4_to_f32(blocks, scales, out):
    """Dequantize MXFP4: blocks uint8[n_blocks * 16], scales uint8[n_blocks] -> out float32.

    Byte j of a block holds values 2j (low nibble) and 2j + 1 (high nibble); every value of
    the block is multiplied by its scale. out: float32[n_blocks * 32].

    Scales 2..252 (every real checkpoint's) fold into the exponent and each byte becomes one
    64-bit store of two floats, which vectorizes; other scales multiply (subnormal results,
    2**128 overflow, NaN).
    """
    n_blocks = scales.shape[0]
    blocks_per_chunk = _CHUNK // 32
    out_pairs = out.view(np.uint64)
    for chunk in prange((n_blocks + blocks_per_chunk - 1) // blocks_per_chunk):
        first = chunk * blocks_per_chunk
        last = min(first + blocks_per_chunk, n_blocks)
        for b in range(first, last):
            scale_code = np.int32(scales[b])
            source = blocks[b * _MXFP4_BLOCK_BYTES : (b + 1) * _MXFP4_BLOCK_BYTES]
            if 2 <= scale_code <= 252:
                shift = scale_code - 127
                pairs = out_pairs[b * 16 : (b + 1) * 16]
                for j in range(_MXFP4_BLOCK_BYTES):
                    byte = np.uint32(source[j])
                    low = _fp4_scaled_bits(byte & np.uint32(15), shift)
                    high = _fp4_scaled_bits(byte >> np.uint32(4), shift)
                    pairs[j] = np.uint64(low) | (np.uint64(high) << np.uint64(32))
            else:
                scale = bits_to_float(np.int32(_e8m0_bits(scales[b])))
                target = out[b * 32 : (b + 1) * 32]
                for j in range(_MXFP4_BLOCK_BYTES):
                    byte = np.uint32(source[j])
                    low = bits_to_float(np.int32(_fp4_bits(byte & np.uint32(15))))
                    high = bits_to_float(np.int32(_fp4_bits(byte >> np.uint32(4))))
                    target[2 * j] = low * scale
                    target[2 * j + 1] = high * scale
