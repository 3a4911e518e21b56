"""GGML block formats q8_0, q4_0 and q4_1: quantize to and decode from their bytes.

Every block is 32 float32 values. Its bytes start with a float16 ``d`` (q4_1: then a float16
``m``), then the codes: q8_0 one int8 per value (34 bytes a block); q4_0 and q4_1 one nibble
per value, byte ``j`` holding value ``j`` in its low nibble and value ``j + 16`` in its high
nibble (18 and 20 bytes).

The arithmetic is the reference's, in the same float32 operations and order, so the bytes
are equal. With ``id = 1 / d`` (0 when ``d == 0``): q8_0 ``d = amax / 127``, codes
``round(x * id)`` half away from zero; q4_0 ``d = x[argmax |x|] / -8`` (the first such
element), codes ``min(trunc(x * id + 8.5), 15)``; q4_1 ``d = (max - min) / 15``, codes
``min(trunc((x - min) * id + 0.5), 15)``. A float code is made an integer as x86-64 does
(``cvttss2si`` then the low byte): a NaN, an infinity or anything beyond +-2**31 becomes 0.
That only happens in blocks whose scale is subnormal (largest magnitude below about 1e-37;
their float16 scale is 0 anyway) or, in q4_1, whose max - min overflows float32.

The kernels write the code bytes and return ``d`` (and ``m``) as float32; the caller rounds
them to float16 in NumPy and writes the block headers. Kernels take arrays and scalars only.
"""

import numpy as np
from numba import njit, prange

from kvq._format import FLOAT32_MAX
from kvq.kernels._floatbits import half_bits_to_float

Q8_0 = 0
Q4_0 = 1
Q4_1 = 2
BLOCK = 32
HEADER = (2, 2, 4)  # bytes before the codes, by kind
TYPE_SIZE = (34, 18, 20)  # bytes per block, by kind

_F32_MAX = np.float32(FLOAT32_MAX)
_I32_LIMIT = np.float32(2.0**31)


@njit(inline="always")
def _low_byte(value):
    """Low byte of ``value`` converted to int32 the x86-64 way (out of range or NaN -> 0)."""
    if value > -_I32_LIMIT and value < _I32_LIMIT:
        return np.int32(value) & 0xFF
    return 0


@njit(inline="always")
def _round_half_away(value):
    """float32 ``value`` rounded half away from zero (exactly; NaN and inf give NaN)."""
    a = np.abs(value)
    whole = np.floor(a)
    rounded = whole + np.floor((a - whole) * np.float32(2.0))
    return -rounded if value < 0 else rounded


@njit(inline="always")
def _nibble(value):
    """A q4 code from its float32 value before truncation: the low byte, capped at 15."""
    return min(_low_byte(value), 15)


@njit(parallel=True, cache=True)
def ggml_quantize_blocks(x, kind, out, d, m):
    """Quantize blocks of 32 to GGML ``kind``; return how many blocks hold NaN or +-Inf.

    x: float32 (n_blocks, 32), C-contiguous; kind: Q8_0, Q4_0 or Q4_1.
    Out: out uint8 (n_blocks, TYPE_SIZE[kind]), the code bytes after HEADER[kind] (the header
    bytes are left for the caller); d float32[n_blocks], the scale; m float32[n_blocks], the
    min (q4_1 only). A rejected block's outputs are unspecified.
    """
    rejected = 0
    for b in prange(x.shape[0]):
        block = x[b]
        row = out[b]
        finite = True
        if kind == Q8_0:
            amax = np.float32(0.0)
            for i in range(BLOCK):
                a = np.abs(block[i])
                finite &= a <= _F32_MAX
                if a > amax:
                    amax = a
            scale = amax / np.float32(127.0)
            inverse = np.float32(1.0) / scale if scale != 0 else np.float32(0.0)
            for i in range(BLOCK):
                row[2 + i] = np.uint8(_low_byte(_round_half_away(block[i] * inverse)))
        elif kind == Q4_0:
            best = np.float32(-1.0)
            extreme = np.float32(0.0)
            for i in range(BLOCK):
                a = np.abs(block[i])
                finite &= a <= _F32_MAX
                if a > best:  # strict: the first of equal magnitudes, as argmax
                    best = a
                    extreme = block[i]
            scale = extreme / np.float32(-8.0)
            inverse = np.float32(1.0) / scale if scale != 0 else np.float32(0.0)
            half = np.float32(8.5)
            for j in range(BLOCK // 2):
                low = _nibble(block[j] * inverse + half)
                high = _nibble(block[j + BLOCK // 2] * inverse + half)
                row[2 + j] = np.uint8(low | (high << 4))
        else:
            lowest = block[0]
            highest = block[0]
            for i in range(BLOCK):
                v = block[i]
                finite &= np.abs(v) <= _F32_MAX
                # on ties (only +0.0 and -0.0 differ) the last one wins, as NumPy's max/min
                if v >= highest:
                    highest = v
                if v <= lowest:
                    lowest = v
            scale = (highest - lowest) / np.float32(15.0)
            inverse = np.float32(1.0) / scale if scale != 0 else np.float32(0.0)
            half = np.float32(0.5)
            for j in range(BLOCK // 2):
                low = _nibble((block[j] - lowest) * inverse + half)
                high = _nibble((block[j + BLOCK // 2] - lowest) * inverse + half)
                row[4 + j] = np.uint8(low | (high << 4))
            m[b] = lowest
        d[b] = scale
        if not finite:
            rejected += 1
    return rejected


@njit(parallel=True, cache=True)
def ggml_dequantize_blocks(blocks, kind, out):
    """out <- the float32 values of GGML ``kind`` blocks (as the reference decodes them).

    blocks: uint8 (n_blocks, TYPE_SIZE[kind]), C-contiguous; out: float32 (n_blocks, 32).
    q8_0: ``code * d``; q4_0: ``d * (code - 8)``; q4_1: ``d * code + m``.
    """
    for b in prange(blocks.shape[0]):
        row = blocks[b]
        values = out[b]
        scale = half_bits_to_float(np.int32(row[0]) | (np.int32(row[1]) << 8))
        if kind == Q8_0:
            for i in range(BLOCK):
                code = (np.int32(row[2 + i]) ^ 128) - 128  # the byte as int8
                values[i] = np.float32(code) * scale
        elif kind == Q4_0:
            for j in range(BLOCK // 2):
                byte = np.int32(row[2 + j])
                values[j] = scale * np.float32((byte & 0xF) - 8)
                values[j + BLOCK // 2] = scale * np.float32((byte >> 4) - 8)
        else:
            lowest = half_bits_to_float(np.int32(row[2]) | (np.int32(row[3]) << 8))
            for j in range(BLOCK // 2):
                byte = np.int32(row[4 + j])
                values[j] = scale * np.float32(byte & 0xF) + lowest
                values[j + BLOCK // 2] = scale * np.float32(byte >> 4) + lowest
