"""``widen_halves`` / ``widen_floats`` (``kernels/_simd.py``): 1-16 little-endian float16 or
float32 params from a byte row to float32, against NumPy's own conversion."""

import numpy as np
import pytest
from numba import njit

from kvq.kernels._simd import widen_floats, widen_halves


@njit
def _widen_halves(source, first, out, out_first, count):
    widen_halves(source, first, out, out_first, count)


@njit
def _widen_floats(source, first, out, out_first, count):
    widen_floats(source, first, out, out_first, count)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("count", range(1, 17))
def test_widen_converts_count_values_and_zeros_the_rest_of_its_16(rng, dtype, count):
    params = rng.standard_normal(40).astype(dtype)
    params[3] = np.inf  # odd values pass through as they are
    params[5] = dtype(6e-8) if dtype == np.float16 else dtype(1e-40)  # subnormal
    source = params.view(np.uint8)
    first, out_first = 3, 5
    out = np.full(30, -7.0, np.float32)
    widen = _widen_halves if dtype == np.float16 else _widen_floats
    widen(source, first, out, out_first, count)
    expected = np.full(30, -7.0, np.float32)
    expected[out_first : out_first + 16] = 0.0
    expected[out_first : out_first + count] = params[first : first + count].astype(np.float32)
    np.testing.assert_array_equal(out, expected)
