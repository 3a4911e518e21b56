"""Property tests: bounds and identities that must hold on any finite input."""

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kvq
from tests import reference

# Magnitudes from subnormal to 8.5e37, so that any block's max - min stays within 2**127.
MAGNITUDES = st.sampled_from([1e-42, 1e-30, 1e-6, 1.0, 1e6, 1e30, 8.5e37])


@st.composite
def tensors(draw, max_size=300):
    """float32 arrays of 0-3 dims with runs of repeated values (constant blocks) mixed in."""
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=max_size // 20))
    scale = draw(MAGNITUDES)
    elements = st.floats(-1.0, 1.0, width=32)
    x = draw(hnp.arrays(np.float32, shape, elements=elements)) * np.float32(scale)
    if x.size and draw(st.booleans()):  # a constant run
        lo = draw(st.integers(0, x.size - 1))
        hi = draw(st.integers(lo, x.size))
        x.reshape(-1)[lo:hi] = x.reshape(-1)[lo]
    return x


block_sizes = st.one_of(st.integers(1, 40), st.sampled_from([32, 64, 128]))


@settings(max_examples=300, deadline=None)
@given(x=tensors(), block_size=block_sizes, scale_dtype=st.sampled_from(["float32", "float16"]))
def test_error_within_half_scale_and_codes_exact(x, block_size, scale_dtype):
    # float16 scales refuse values beyond 65504 (tested in test_cache)
    assume(not (scale_dtype == "float16" and x.size and np.abs(x).max() > 65504))
    qb = kvq.QuantizedBlocks.quantize(x, block_size, scale_dtype)
    codes, scales, mins = reference.quantize_blocks(x, block_size, scale_dtype)
    np.testing.assert_array_equal(qb.codes, codes)
    np.testing.assert_array_equal(qb.scales.astype(np.float32), scales)
    np.testing.assert_array_equal(qb.mins.astype(np.float32), mins)
    got = qb.dequantize()
    flat = x.reshape(-1)
    bound = reference.error_bound(x, qb.scales, block_size)
    error = np.abs(got.astype(np.float64) - flat.astype(np.float64))
    assert np.all(error <= bound), (error - bound).max()
    assert qb.shape == x.shape


@settings(max_examples=200, deadline=None)
@given(x=tensors(max_size=120), block_size=block_sizes, data=st.data())
def test_any_range_is_slice_of_full(x, block_size, data):
    qb = kvq.QuantizedBlocks.quantize(x, block_size)
    start = data.draw(st.integers(0, x.size))
    end = data.draw(st.integers(start, x.size))
    np.testing.assert_array_equal(qb.dequantize(start, end), qb.dequantize()[start:end])


@settings(max_examples=100, deadline=None)
@given(x=tensors(), block_size=block_sizes)
def test_constant_blocks_come_back_exactly(x, block_size):
    flat = x.reshape(-1)
    qb = kvq.QuantizedBlocks.quantize(x, block_size)
    got = qb.dequantize()
    for b in range(qb.n_blocks):
        block = flat[b * block_size : (b + 1) * block_size]
        if block.size and np.all(block == block[0]):
            np.testing.assert_array_equal(got[b * block_size : (b + 1) * block_size], block)
