"""The vector unpack-and-scale intrinsics attention decodes codes with, against NumPy."""

import numpy as np
import pytest
from numba import njit

from kvq.kernels import pack_codes
from kvq.kernels._unpack import (
    RUN,
    unpack_affine_32_2,
    unpack_affine_32_3,
    unpack_affine_32_4,
    unpack_affine_32_6,
    unpack_affine_32_8,
)

UNPACKERS = {
    8: unpack_affine_32_8,
    6: unpack_affine_32_6,
    4: unpack_affine_32_4,
    3: unpack_affine_32_3,
    2: unpack_affine_32_2,
}


def _caller(unpack):
    @njit
    def call(row, index, scale, lowest, out, at):
        unpack(row, index, scale, lowest, out, at)

    return call


@pytest.mark.parametrize("bits", sorted(UNPACKERS))
def test_every_run_of_a_stream_decodes_to_numpy(bits):
    runs = 7
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, RUN * runs).astype(np.uint8)
    codes[:RUN] = 2**bits - 1  # the top code in every lane of the first run
    packed = np.zeros(RUN * runs * bits // 8, np.uint8)
    pack_codes(codes, bits, packed)
    call = _caller(UNPACKERS[bits])
    scale, lowest = np.float32(0.37), np.float32(-2.5)
    for run in range(runs):
        out = np.full(RUN + 9, -7.0, np.float32)
        call(packed, run * RUN, scale, lowest, out, 5)
        expected = codes[run * RUN : (run + 1) * RUN].astype(np.float64) * scale + lowest
        # one fused multiply-add per lane: within half an ulp of the exact value
        np.testing.assert_allclose(out[5 : 5 + RUN], expected, rtol=2**-24, atol=0)
        assert (out[:5] == -7.0).all() and (out[5 + RUN :] == -7.0).all(), "wrote outside"


def test_last_run_of_a_row_decodes_from_a_view_ending_there():
    """The 4-bit run ending the row decodes right from a view that ends exactly there (its
    load is the run's 16 bytes: the LLVM vector type fixes the width)."""
    codes = np.arange(64, dtype=np.uint8) % 16
    packed = np.zeros(32, np.uint8)
    pack_codes(codes, 4, packed)
    out = np.empty(RUN, np.float32)
    _caller(unpack_affine_32_4)(packed[16:], 0, np.float32(1), np.float32(0), out, 0)
    np.testing.assert_array_equal(out, codes[32:])
