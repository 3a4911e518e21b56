"""QuantizedKVCache: the original phase-3 API, its figures, and bad input."""

import numpy as np
import pytest

import kvq
from tests import reference


@pytest.fixture
def kv(rng):
    shape = (8, 40, 64)
    return (
        rng.standard_normal(shape).astype(np.float32),
        rng.standard_normal(shape).astype(np.float32),
    )


def test_original_accuracy_check():
    """The original design's test: [1, 2, 3, 4, 5] back with max error under 1% of its range."""
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
    cache = kvq.QuantizedKVCache.quantize(x, x)
    error = np.abs(cache.dequant_k(0, 5) - x).max()
    assert error < 0.01 * 4.0
    assert error <= (4.0 / 255) / 2 + 1e-6 * 5
    np.testing.assert_array_equal(cache.dequant_v(0, 5), cache.dequant_k(0, 5))


def test_original_compression_check_with_true_figures(rng):
    """1000 elements compress at least 3x; the true ratio counts every scale and min byte."""
    k, v = rng.standard_normal((2, 1000)).astype(np.float32)
    cache = kvq.QuantizedKVCache.quantize(k, v, block_size=32)
    # 32 blocks (31 full + one of 8): codes 1000 B + scales and mins 32 * 4 * 2 B, per tensor
    assert cache.nbytes == 2 * (1000 + 32 * 4 * 2) == 2512
    assert cache.compression_ratio() == pytest.approx(8000 / 2512)  # 3.18x, not 3.56x
    assert cache.compression_ratio() >= 3.0
    half = kvq.QuantizedKVCache.quantize(k, v, block_size=32, scale_dtype="float16")
    assert half.nbytes == 2 * (1000 + 32 * 2 * 2) == 2256
    assert half.compression_ratio() == pytest.approx(8000 / 2256)  # 3.55x, honestly


def test_large_cache_ratios(kv):
    k, v = kv
    assert kvq.QuantizedKVCache.quantize(k, v).compression_ratio() == pytest.approx(3.2)
    half = kvq.QuantizedKVCache.quantize(k, v, scale_dtype="float16")
    assert half.compression_ratio() == pytest.approx(32 / 9)


def test_shape_size_block_size_and_repr(kv):
    k, v = kv
    cache = kvq.QuantizedKVCache.quantize(k, v, block_size=64)
    assert cache.shape == (8, 40, 64)
    assert cache.size == k.size
    assert cache.block_size == 64
    assert cache.scale_dtype == np.float32
    text = repr(cache)
    for part in ("shape=(8, 40, 64)", "block_size=64", "float32", "3.56x", "uint8"):
        assert part in text


def test_ranges_follow_row_major_order(kv):
    k, v = kv
    cache = kvq.QuantizedKVCache.quantize(k, v)
    flat_k, flat_v = k.reshape(-1), v.reshape(-1)
    start, end = 64 * 40 + 17, 64 * 41 + 3  # crosses a row of the last axis
    got_k, got_v = cache.dequant_k(start, end), cache.dequant_v(start, end)
    assert got_k.shape == got_v.shape == (end - start,)
    bound = reference.error_bound(k, cache.k.scales, 32)[start:end]
    assert np.all(np.abs(got_k - flat_k[start:end]) <= bound)
    np.testing.assert_array_equal(got_v, cache.dequant_v()[start:end])
    assert np.abs(got_v - flat_v[start:end]).max() < 0.03


@pytest.mark.parametrize("dtype", [np.float16, np.float64, ">f4", "<f8"])
def test_accepts_other_float_dtypes(rng, dtype):
    x = rng.standard_normal((4, 33)).astype(dtype)
    cache = kvq.QuantizedKVCache.quantize(x, x)
    expected = reference.quantize_blocks(x.astype(np.float32), 32)[0]
    np.testing.assert_array_equal(cache.k.codes, expected)
    assert cache.dequant_k().dtype == np.float32


def test_non_contiguous_input_is_copied_not_refused(rng):
    base = rng.standard_normal((64, 48)).astype(np.float32)
    for view in (base.T, base[:, ::2], base[::-1]):
        cache = kvq.QuantizedKVCache.quantize(view, view)
        codes = reference.quantize_blocks(np.ascontiguousarray(view), 32)[0]
        np.testing.assert_array_equal(cache.k.codes, codes)
        assert cache.shape == view.shape


def test_read_only_input_and_input_unchanged(rng):
    x = rng.standard_normal(100).astype(np.float32)
    before = x.copy()
    x.flags.writeable = False
    cache = kvq.QuantizedKVCache.quantize(x, x)
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(cache.k.codes, reference.quantize_blocks(before, 32)[0])


def test_memory_mapped_and_unaligned_input(tmp_path, rng):
    x = rng.standard_normal(1000).astype(np.float32)
    path = tmp_path / "x.bin"
    x.tofile(path)
    mapped = np.memmap(path, np.float32, mode="r")
    buffer = np.zeros(x.nbytes + 1, np.uint8)
    buffer[1:] = x.view(np.uint8)
    unaligned = np.frombuffer(buffer.data, np.float32, offset=1)
    assert not unaligned.flags.aligned
    expected = reference.quantize_blocks(x, 32)[0]
    for source in (mapped, unaligned):
        np.testing.assert_array_equal(kvq.QuantizedKVCache.quantize(source, x).k.codes, expected)


def test_float16_input_near_its_limit_with_float16_scales():
    x = np.array([65504, -65504, 0, 1, 65000, -3], np.float16)
    cache = kvq.QuantizedKVCache.quantize(x, x, scale_dtype="float16")
    error = np.abs(cache.dequant_k() - x.astype(np.float32))
    assert np.all(error <= reference.error_bound(x, cache.k.scales, 32))


def test_empty_input_gives_empty_cache():
    empty = np.zeros((8, 0, 64), np.float32)
    cache = kvq.QuantizedKVCache.quantize(empty, empty)
    assert cache.shape == (8, 0, 64)
    assert cache.size == 0
    assert cache.nbytes == 0
    assert np.isnan(cache.compression_ratio())
    assert cache.dequant_k(0, 0).shape == (0,)
    with pytest.raises(IndexError):
        cache.dequant_k(0, 1)


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("which", ["k", "v"])
def test_nonfinite_names_tensor_and_first_flat_index(rng, bad, which):
    k = rng.standard_normal((2, 3, 40)).astype(np.float32)
    v = k.copy()
    target = k if which == "k" else v
    target[1, 2, 5] = bad
    target[1, 2, 9] = bad
    with pytest.raises(
        ValueError, match=rf"^{which} has .* flat index 205 \(position \(1, 2, 5\)\)"
    ):
        kvq.QuantizedKVCache.quantize(k, v)


@pytest.mark.parametrize("bits", [0x7FC00001, 0xFFC00000, 0x7F800001, 0xFFBFFFFF])
def test_any_nan_payload_is_caught(bits):
    x = np.zeros(40, np.float32)
    x.view(np.uint32)[33] = bits
    with pytest.raises(ValueError, match=r"k has nan at flat index 33"):
        kvq.QuantizedKVCache.quantize(x, np.zeros(40, np.float32))


def test_float64_beyond_float32_range_is_named(rng):
    x = np.ones(10)
    x[3] = 1e300
    with pytest.raises(ValueError, match=r"k has 1e\+300 at flat index 3 \(beyond the float32"):
        kvq.QuantizedKVCache.quantize(x, x)


def test_range_too_wide_for_float32():
    x = np.zeros(64, np.float32)
    x[40], x[41] = 3e38, -3e38
    with pytest.raises(ValueError, match=r"k: block 1 \(flat elements \[32, 64\)\).*2\*\*127"):
        kvq.QuantizedKVCache.quantize(x, x)


def test_values_beyond_float16_scales():
    x = np.zeros(64, np.float32)
    x[50] = 70000.0
    with pytest.raises(ValueError, match=r"block 1 .*flat index 50.*scale_dtype='float32'"):
        kvq.QuantizedKVCache.quantize(x, x, scale_dtype="float16")
    assert kvq.QuantizedKVCache.quantize(x, x).dequant_k()[50] == pytest.approx(70000.0)


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"same shape, got k \(2, 3\) and v \(3, 2\)"):
        kvq.QuantizedKVCache.quantize(np.zeros((2, 3)), np.zeros((3, 2)))


@pytest.mark.parametrize("block_size", [0, -1, -32])
def test_block_size_below_one(block_size):
    with pytest.raises(ValueError, match=rf"block_size must be >= 1, got {block_size}"):
        kvq.QuantizedKVCache.quantize(np.zeros(4), np.zeros(4), block_size=block_size)


@pytest.mark.parametrize("block_size", [1.5, "32", True, None])
def test_block_size_not_an_integer(block_size):
    with pytest.raises(TypeError, match="block_size must be an integer"):
        kvq.QuantizedKVCache.quantize(np.zeros(4), np.zeros(4), block_size=block_size)


def test_numpy_integer_block_size_accepted():
    cache = kvq.QuantizedKVCache.quantize(np.zeros(4), np.zeros(4), block_size=np.int64(2))
    assert cache.block_size == 2 and type(cache.block_size) is int


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_, np.complex64, object])
def test_non_floating_dtype(dtype):
    with pytest.raises(TypeError, match=r"k must hold float16, float32 or float64 values"):
        kvq.QuantizedKVCache.quantize(np.zeros(4, dtype), np.zeros(4, np.float32))


def test_bad_scale_dtype():
    with pytest.raises(ValueError, match="scale_dtype must be 'float32' or 'float16'"):
        kvq.QuantizedKVCache.quantize(np.zeros(4), np.zeros(4), scale_dtype="int8")


@pytest.mark.parametrize(("start", "end"), [(-1, 4), (0, 101), (5, 4), (101, 101)])
def test_range_outside_bounds(kv, start, end):
    k = kv[0].reshape(-1)[:100].copy()
    cache = kvq.QuantizedKVCache.quantize(k, k)
    with pytest.raises(IndexError, match=r"outside \[0, 100\]"):
        cache.dequant_k(start, end)
    with pytest.raises(IndexError):
        cache.dequant_v(start, end)


@pytest.mark.parametrize(("start", "end"), [(0.5, 3), (False, True), (0, np.True_), ("0", 3)])
def test_range_requires_integers(kv, start, end):
    k = kv[0][0, 0]
    cache = kvq.QuantizedKVCache.quantize(k, k)
    with pytest.raises(TypeError, match="integers"):
        cache.dequant_k(start, end)


def test_float16_scales_hold_no_more_memory_than_reported(kv):
    cache = kvq.QuantizedKVCache.quantize(*kv, scale_dtype="float16")
    for blocks in (cache.k, cache.v):
        held = blocks.codes.base.nbytes  # the one allocation behind codes, scales and mins
        assert blocks.nbytes <= held < blocks.nbytes + 64
        assert np.shares_memory(blocks.scales, blocks.codes.base)


def test_negative_zero_constant_block_compares_equal():
    """Documented: a block of -0.0 comes back as +0.0 (min + 0 * code), equal under ==."""
    x = np.full(32, -0.0, np.float32)
    got = kvq.QuantizedKVCache.quantize(x, x).dequant_k()
    np.testing.assert_array_equal(got, x)
    assert not np.signbit(got).any()


def test_cache_is_immutable(kv):
    cache = kvq.QuantizedKVCache.quantize(*kv)
    with pytest.raises(AttributeError):
        cache.k = None
    with pytest.raises(ValueError, match="read-only"):
        cache.k.codes[0] = 1


def test_dequant_into_out(kv):
    cache = kvq.QuantizedKVCache.quantize(*kv)
    out = np.full(100, -1.0, np.float32)
    got = cache.dequant_k(10, 110, out=out)
    assert got is out
    np.testing.assert_array_equal(out, cache.dequant_k()[10:110])
    shaped = np.empty((10, 10), np.float32)
    assert cache.dequant_v(0, 100, out=shaped) is shaped
    np.testing.assert_array_equal(shaped.reshape(-1), cache.dequant_v(0, 100))


@pytest.mark.parametrize(
    ("out", "error"),
    [
        (np.empty(99, np.float32), ValueError),
        (np.empty(100, np.float64), TypeError),
        (np.empty(200, np.float32)[::2], ValueError),
        ([0.0] * 100, TypeError),
    ],
)
def test_dequant_bad_out_is_refused_and_untouched(kv, out, error):
    cache = kvq.QuantizedKVCache.quantize(*kv)
    before = np.array(out, copy=True)
    with pytest.raises(error, match="out must"):
        cache.dequant_k(0, 100, out=out)
    np.testing.assert_array_equal(np.asarray(out), before)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
@pytest.mark.parametrize("make", [np.asmatrix, lambda a: a.reshape(4, 25)])
def test_dequant_into_matrix_or_2d_out_stays_inside_it(kv, make):
    cache = kvq.QuantizedKVCache.quantize(*kv)
    big = np.zeros(1000, np.float32)
    out = make(big[:100].reshape(1, 100)) if make is np.asmatrix else make(big[:100])
    cache.dequant_k(0, 100, out=out)
    np.testing.assert_array_equal(np.asarray(out).reshape(-1), cache.dequant_k(0, 100))
    assert not big[100:].any()  # nothing written past out


def test_dequant_read_only_out_is_refused(kv):
    cache = kvq.QuantizedKVCache.quantize(*kv)
    out = np.zeros(100, np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        cache.dequant_k(0, 100, out=out)


# --- kvq.Array and MemoryPool --------------------------------------------------------------


def test_accepts_kvq_arrays(kv):
    k, v = kv
    cache = kvq.QuantizedKVCache.quantize(kvq.Array.from_numpy(k), kvq.Array.from_numpy(v))
    np.testing.assert_array_equal(cache.k.codes, kvq.QuantizedKVCache.quantize(k, v).k.codes)
    assert cache.shape == k.shape


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_pool_storage_and_release(kv, scale_dtype):
    import gc

    k, v = kv
    pool = kvq.MemoryPool(1 << 20)
    cache = kvq.QuantizedKVCache.quantize(k, v, pool=pool, scale_dtype=scale_dtype)
    plain = kvq.QuantizedKVCache.quantize(k, v, scale_dtype=scale_dtype)
    stats = pool.stats()
    assert stats["live"] == 2
    assert stats["in_use"] >= plain.nbytes
    base = pool._buffer
    for a in (cache.k.codes, cache.k.scales, cache.v.mins):
        assert np.shares_memory(a, base)
    np.testing.assert_array_equal(cache.dequant_k(), plain.dequant_k())
    np.testing.assert_array_equal(cache.v.scales, plain.v.scales)
    assert cache.nbytes == plain.nbytes
    del cache
    gc.collect()
    assert pool.stats()["live"] == 0 and pool.stats()["in_use"] == 0


def test_pool_left_as_it_was_when_quantize_fails(kv):
    k, v = kv
    pool = kvq.MemoryPool(1 << 20)
    before = pool.stats()
    bad = v.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="v has nan"):
        kvq.QuantizedKVCache.quantize(k, bad, pool=pool)
    after = pool.stats()
    assert (after["in_use"], after["live"]) == (before["in_use"], before["live"])


def test_pool_exhausted(kv):
    pool = kvq.MemoryPool(4096)
    with pytest.raises(kvq.PoolExhausted, match="cannot fit"):
        kvq.QuantizedKVCache.quantize(*kv, pool=pool)
    assert pool.stats()["live"] == 0
