"""Dense bit packing of codes (1-8 bits each) as a little-endian bit stream.

Code ``i`` occupies bits ``[i * bits, (i + 1) * bits)`` of the stream, low bits first: with
4 bits, byte j holds codes 2j (low nibble) and 2j + 1; with 2 bits, four codes per byte; with
3 bits, 8 codes fill 3 bytes. The stream is ``ceil(n * bits / 8)`` bytes long.
"""

import numpy as np
from numba import njit, prange

from kvq.kernels._unpack import unpack_run

_CODES_PER_CHUNK = 8  # 8 codes of b bits are exactly b bytes


@njit(inline="always")
def _pack_chunk(codes, first, count, bits, packed, out_first, out_count):
    value = np.uint64(0)
    for i in range(count):
        value |= np.uint64(codes[first + i]) << np.uint64(bits * i)
    for j in range(out_count):
        packed[out_first + j] = np.uint8((value >> np.uint64(8 * j)) & np.uint64(0xFF))


_PACK_SLAB = 1 << 16  # bytes of packed output per prange iteration on the fast paths


@njit(parallel=True, cache=True)
def pack_codes(codes, bits, packed):
    """packed <- codes (uint8[n], each < 2**bits), bits in 1..8; packed: uint8[ceil(n*bits/8)].

    4 and 2 bits pack byte by byte in long slabs (contiguous loops LLVM vectorizes); other
    widths go 8 codes at a time through a 64-bit word.
    """
    n = codes.shape[0]
    if (bits == 4 or bits == 2) and n % (8 // bits) == 0:
        per_byte = 8 // bits
        total = n // per_byte
        for slab in prange((total + _PACK_SLAB - 1) // _PACK_SLAB):
            lo = slab * _PACK_SLAB
            hi = min(lo + _PACK_SLAB, total)
            out = packed[lo:hi]
            source = codes[lo * per_byte : hi * per_byte]
            if bits == 4:
                for i in range(hi - lo):
                    out[i] = source[2 * i] | (source[2 * i + 1] << 4)
            else:
                for i in range(hi - lo):
                    out[i] = (
                        source[4 * i]
                        | (source[4 * i + 1] << 2)
                        | (source[4 * i + 2] << 4)
                        | (source[4 * i + 3] << 6)
                    )
        return
    whole = n // _CODES_PER_CHUNK
    for chunk in prange(whole):
        _pack_chunk(codes, chunk * 8, 8, bits, packed, chunk * bits, bits)
    rest = n - whole * 8
    if rest:
        _pack_chunk(codes, whole * 8, rest, bits, packed, whole * bits, (rest * bits + 7) // 8)


_UNPACK_SLAB = 1 << 16  # codes per prange iteration of unpack_codes (a multiple of 8)


@njit(parallel=True, cache=True)
def unpack_codes(packed, bits, codes):
    """codes (uint8[n]) <- packed, the inverse of :func:`pack_codes`, through the one decoder
    of the format (``_unpack.unpack_run``), in slabs of 65536 codes."""
    n = codes.shape[0]
    for slab in prange((n + _UNPACK_SLAB - 1) // _UNPACK_SLAB):
        lo = slab * _UNPACK_SLAB
        hi = min(n, lo + _UNPACK_SLAB)
        unpack_run(packed, lo, hi - lo, bits, codes[lo:hi])
