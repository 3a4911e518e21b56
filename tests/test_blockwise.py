"""QuantizedBlocks and its kernels against the plain-NumPy reference (tests/reference.py)."""

import numpy as np
import pytest

import kvq
from tests import reference

BLOCK_SIZES = [1, 2, 3, 7, 31, 32, 33, 64, 100, 128]
SIZES = [1, 5, 31, 32, 33, 64, 1000, 4097]


def kv_like(rng, size):
    """Keys with a few large channels, like real K activations."""
    x = rng.standard_normal(size).astype(np.float32)
    x[::17] *= 12.0
    return x


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("size", SIZES)
def test_codes_scales_mins_equal_reference(rng, size, block_size, scale_dtype):
    x = kv_like(rng, size)
    qb = kvq.QuantizedBlocks.quantize(x, block_size, scale_dtype)
    codes, scales, mins = reference.quantize_blocks(x, block_size, scale_dtype)
    np.testing.assert_array_equal(qb.codes, codes)
    np.testing.assert_array_equal(qb.scales.astype(np.float32), scales)
    np.testing.assert_array_equal(qb.mins.astype(np.float32), mins)
    assert qb.scales.dtype == np.dtype(scale_dtype)
    assert qb.n_blocks == -(-size // block_size)


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("block_size", [1, 3, 32, 33])
def test_dequantize_equals_reference_bit_for_bit(rng, block_size, scale_dtype):
    x = kv_like(rng, 1000)
    qb = kvq.QuantizedBlocks.quantize(x, block_size, scale_dtype)
    expected = reference.dequantize_blocks(qb.codes, qb.scales, qb.mins, block_size)
    got = qb.dequantize()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    assert np.all(np.abs(got - x) <= reference.error_bound(x, qb.scales, block_size))


@pytest.mark.parametrize("block_size", [1, 2, 5, 8])
def test_every_range_equals_slice_of_full(rng, block_size):
    x = kv_like(rng, 23)
    qb = kvq.QuantizedBlocks.quantize(x, block_size)
    full = qb.dequantize()
    for start in range(24):
        for end in range(start, 24):
            np.testing.assert_array_equal(qb.dequantize(start, end), full[start:end])


@pytest.mark.parametrize("block_size", [32, 33, 64])
def test_every_range_equals_slice_of_full_simd_sizes(rng, block_size):
    """Block 32 runs the explicit-SIMD path for whole blocks and the generic one for pieces."""
    x = kv_like(rng, 100)
    qb = kvq.QuantizedBlocks.quantize(x, block_size)
    full = qb.dequantize()
    for start in range(101):
        for end in range(start, 101, 3 if start % 7 else 1):
            np.testing.assert_array_equal(qb.dequantize(start, end), full[start:end])


def test_constructor_refuses_parts_that_do_not_fit(rng):
    qb = kvq.QuantizedBlocks.quantize(kv_like(rng, 100), 32)
    parts = {
        "codes": qb.codes,
        "scales": qb.scales,
        "mins": qb.mins,
        "shape": qb.shape,
        "block_size": 32,
    }
    bad = [
        ({"scales": qb.scales[:1]}, "scales must be"),
        ({"mins": qb.mins.astype(np.float16)}, "share a dtype"),
        ({"codes": qb.codes.astype(np.int64)}, "codes must be"),
        ({"codes": np.zeros(200, np.uint8)[::2]}, "codes must be"),
        ({"shape": (10, 11)}, "holds 110 elements"),
        ({"block_size": 0}, "block_size must be >= 1"),
        ({"scales": qb.scales.astype(np.float64)}, "scales must be"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            kvq.QuantizedBlocks(**{**parts, **change})


def test_range_reads_only_its_blocks(rng):
    """Blocks outside the range are never read: poison them (absurd but finite scales and mins:
    hand-built blocks refuse NaN) and the range is unchanged."""
    x = kv_like(rng, 320)
    qb = kvq.QuantizedBlocks.quantize(x, 32)
    expected = qb.dequantize(70, 130)  # blocks 2, 3 and 4
    poisoned = kvq.QuantizedBlocks(
        codes=qb.codes,
        scales=np.where(np.isin(np.arange(10), [2, 3, 4]), qb.scales, 3e37).astype(np.float32),
        mins=np.where(np.isin(np.arange(10), [2, 3, 4]), qb.mins, -3e37).astype(np.float32),
        shape=qb.shape,
        block_size=32,
    )
    np.testing.assert_array_equal(poisoned.dequantize(70, 130), expected)


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_constant_blocks(scale_dtype):
    x = np.repeat(np.array([0.0, -3.5, 1e30, 7.0, 0.25], np.float32), 32)
    if scale_dtype == "float16":
        x = x[x != 1e30]
    qb = kvq.QuantizedBlocks.quantize(x, 32, scale_dtype)
    # float16-representable constants (and any constant with float32 scales) come back exactly
    np.testing.assert_array_equal(qb.dequantize(), x)
    assert np.all(qb.codes == 0)


def test_constant_block_not_on_float16_grid_is_within_bound():
    x = np.full(32, 0.1, np.float32)
    qb = kvq.QuantizedBlocks.quantize(x, 32, "float16")
    assert np.all(np.abs(qb.dequantize() - x) <= reference.error_bound(x, qb.scales, 32))


def test_float16_scales_and_mins_are_exact_float16_values(rng):
    x = kv_like(rng, 4096)
    qb = kvq.QuantizedBlocks.quantize(x, 32, "float16")
    starts = np.arange(0, x.size, 32)
    assert np.all(qb.mins.astype(np.float32) <= np.minimum.reduceat(x, starts))
    top = qb.mins.astype(np.float32) + 255 * qb.scales.astype(np.float32)
    assert np.all(top >= np.maximum.reduceat(x, starts))


def test_subnormal_and_tiny_ranges():
    tiny = np.float32(1e-45) * np.arange(32, dtype=np.float32)  # subnormal ramp
    small = np.float32(1e-38) * np.linspace(-1, 1, 32, dtype=np.float32)
    for x in (tiny, small, np.concatenate([tiny, small])):
        qb = kvq.QuantizedBlocks.quantize(x, 32)
        codes, _, _ = reference.quantize_blocks(x, 32)
        np.testing.assert_array_equal(qb.codes, codes)
        got = qb.dequantize()
        assert np.all(np.isfinite(got))
        assert np.all(np.abs(got - x) <= reference.error_bound(x, qb.scales, 32))


def test_huge_magnitudes_within_range_limit():
    x = np.linspace(-8e37, 8e37, 64, dtype=np.float32)
    qb = kvq.QuantizedBlocks.quantize(x, 32)
    got = qb.dequantize()
    assert np.all(np.isfinite(got))
    assert np.all(np.abs(got.astype(np.float64) - x) <= reference.error_bound(x, qb.scales, 32))


def test_negative_zero_and_mixed_signs():
    x = np.array([-0.0, 0.0, -0.0, 1.0, -1.0], np.float32)
    qb = kvq.QuantizedBlocks.quantize(x, 3)
    np.testing.assert_array_equal(qb.dequantize()[:3], [0.0, 0.0, 0.0])
    codes, _, _ = reference.quantize_blocks(x, 3)
    np.testing.assert_array_equal(qb.codes, codes)


def test_arrays_are_read_only(rng):
    qb = kvq.QuantizedBlocks.quantize(kv_like(rng, 64))
    for a in (qb.codes, qb.scales, qb.mins):
        with pytest.raises(ValueError, match="read-only"):
            a[0] = 0
