"""Invalid input to the public API raises the documented exception and changes nothing.

Each test snapshots the objects involved (a KVCache's observable state and stored arrays, a
MemoryPool's accounting, an ``out=`` array, the input itself) before the bad call and
compares after. A KVCache that refused an append must then behave exactly like a twin that
never saw the bad call.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kvq
from tests.robustness.api_strategies import (
    Setup,
    assert_same_contents,
    assert_same_state,
    cache_setups,
    snapshot,
)

FEW = settings(max_examples=50, deadline=None)
ACCEPTED = "float16, float32 or float64"


pytestmark = pytest.mark.usefixtures("one_numba_thread")


NON_FLOAT_DTYPES = st.one_of(
    hnp.integer_dtypes(),
    hnp.unsigned_integer_dtypes(),
    hnp.boolean_dtypes(),
    hnp.complex_number_dtypes(),
    hnp.datetime64_dtypes(),
    hnp.timedelta64_dtypes(),
    hnp.byte_string_dtypes(max_len=4),
    hnp.unicode_string_dtypes(max_len=4),
    st.just(np.dtype(object)),
    st.just(np.dtype([("a", "<f4")])),
    st.just(np.dtype(np.longdouble)).filter(lambda d: d.itemsize > 8),
)


@FEW
@given(dtype=NON_FLOAT_DTYPES, shape=st.sampled_from([(2, 3, 8), (2, 1, 8)]))
def test_non_float_dtypes_raise_type_error_at_every_entry_point(dtype, shape):
    """integer, bool, complex, datetime, string, object, structured and long-double input:
    TypeError naming the accepted dtypes, from every entry point, and nothing changes."""
    bad = np.zeros(shape, dtype)
    good = np.ones(shape, np.float32)
    with pytest.raises(TypeError, match=ACCEPTED):
        kvq.quantize(bad)
    with pytest.raises(TypeError, match=ACCEPTED):
        kvq.QuantizedBlocks.quantize(bad)
    pool = kvq.MemoryPool(1 << 16)
    before_pool = pool.stats()
    with pytest.raises(TypeError, match=ACCEPTED):
        kvq.QuantizedKVCache.quantize(good, bad, pool=pool)
    with pytest.raises(TypeError, match=ACCEPTED):
        kvq.QuantizedKVCache.quantize(bad, good, pool=pool)
    assert pool.stats() == before_pool
    cache = kvq.KVCache(2, 8, kvq.QuantConfig.kivi(2, group_size=2, residual=1), pool=pool)
    cache.append(good, good)
    before, before_pool = snapshot(cache), pool.stats()
    for k, v in ((bad, good), (good, bad)):
        with pytest.raises(TypeError, match=ACCEPTED):
            cache.append(k, v)
    with pytest.raises(TypeError, match=ACCEPTED):
        kvq.attention(np.zeros((4, 1, 8), dtype), cache)
    assert_same_state(before, snapshot(cache))
    assert pool.stats() == before_pool


BAD_APPENDS = (
    "nan",
    "inf",
    "beyond_float32",
    "heads",
    "head_dim",
    "ndim",
    "no_tokens",
    "k_v_mismatch",
    "capacity",
)


def bad_append(setup: Setup, cache: kvq.KVCache, kind: str, data) -> tuple[tuple, type, str]:
    """(k, v) for a bad append of ``kind``, the exception and a part of its message."""
    heads, dim = setup.heads, setup.head_dim
    tokens = data.draw(st.integers(1, 5), label="tokens")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32), label="seed"))
    k, v = rng.standard_normal((2, heads, tokens, dim)).astype(np.float32)
    which = data.draw(st.sampled_from(["k", "v"]), label="which")
    target = k if which == "k" else v
    at = tuple(data.draw(st.integers(0, n - 1)) for n in target.shape)
    if kind in ("nan", "inf", "beyond_float32"):
        if kind == "beyond_float32":
            target = target.astype(np.float64)
        target[at] = {"nan": np.nan, "inf": -np.inf, "beyond_float32": 1e300}[kind]
        k, v = (target, v) if which == "k" else (k, target)
        position = len(cache) + at[1]
        message = f"{which} has .* at head {at[0]}, token {at[1]} \\(position {position}\\)"
        return (k, v), ValueError, message
    if kind == "heads":
        return (np.zeros((heads + 1, tokens, dim), np.float32), v), ValueError, "k must have"
    if kind == "head_dim":
        return (k, np.zeros((heads, tokens, dim + 1), np.float32)), ValueError, "v must have"
    if kind == "ndim":
        return (k[0], v), ValueError, "k must have shape"
    if kind == "no_tokens":
        return (k[:, :0], v[:, :0]), ValueError, "at least one token"
    if kind == "k_v_mismatch":
        return (k, np.concatenate([v, v], axis=1)), ValueError, "same shape"
    room = setup.capacity - len(cache)
    k, v = rng.standard_normal((2, heads, room + 1, dim)).astype(np.float32)
    return (k, v), kvq.CapacityError, "capacity"


@settings(max_examples=50, deadline=None)
@given(
    setup=cache_setups(max_tokens=50),
    kind=st.sampled_from(BAD_APPENDS),
    pooled=st.booleans(),
    data=st.data(),
)
def test_bad_append_raises_and_leaves_cache_and_pool_as_they_were(setup, kind, pooled, data):
    if kind == "capacity" and setup.capacity is None:
        setup.window = None  # a windowed cache has no capacity
        setup.capacity = setup.total + data.draw(st.integers(0, 3), label="room")
    pool = kvq.MemoryPool(1 << 20) if pooled else None
    cache, twin = setup.build(pool), setup.build()
    done = data.draw(st.integers(0, len(setup.steps)), label="appends before")
    setup.feed(cache, done)
    setup.feed(twin, done)
    (k, v), error, message = bad_append(setup, cache, kind, data)
    k_before, v_before = np.array(k, copy=True), np.array(v, copy=True)
    before = snapshot(cache)
    pool_before = pool.stats() if pool else None
    with pytest.raises(error, match=message):
        cache.append(k, v)
    assert_same_state(before, snapshot(cache))
    assert (pool.stats() if pool else None) == pool_before
    np.testing.assert_array_equal(k, k_before)  # the caller's arrays are untouched
    np.testing.assert_array_equal(v, v_before)
    # and it goes on exactly as a cache that never saw the bad call
    at = sum(setup.steps[:done])
    for step in setup.steps[done:]:
        for c in (cache, twin):
            c.append(setup.k[:, at : at + step], setup.v[:, at : at + step])
        at += step
    assert_same_contents(twin, cache)


def test_value_beyond_float16_scales_is_refused_by_the_append_that_brings_it():
    cache = kvq.KVCache(1, 8, kvq.QuantConfig.kivi(bits=4, group_size=8, residual=2))
    big = np.full((1, 1, 8), 1e5, np.float32)
    ok = np.zeros((1, 1, 8), np.float32)
    with pytest.raises(ValueError, match="65504"):
        cache.append(big, big)  # today: accepted into the residual
    for _ in range(12):  # and valid tokens keep appending
        cache.append(ok, ok)
    assert len(cache) == 12


def test_value_beyond_float16_scales_is_refused_when_quantized_at_once():
    """The documented ValueError where the token is quantized by the same append (per-token
    groups, no residual), with the cache unchanged: the part of the contract that holds."""
    cache = kvq.KVCache(1, 8, kvq.QuantConfig.mlx(bits=4, group_size=8))
    cache.append(np.zeros((1, 1, 8), np.float32), np.zeros((1, 1, 8), np.float32))
    before = snapshot(cache)
    big = np.full((1, 1, 8), 1e5, np.float32)
    with pytest.raises(ValueError, match="65504"):
        cache.append(big, big)
    assert_same_state(before, snapshot(cache))


RANGES = st.tuples(st.integers(-3, 40), st.integers(-3, 40))
OUTS = st.sampled_from(["none", "right", "wrong_dtype", "wrong_size", "read_only", "strided"])


@FEW
@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4),
    block_size=st.integers(1, 9),
    bounds=RANGES,
    out_kind=OUTS,
    seed=st.integers(0, 2**32),
)
def test_dequant_ranges_and_out_raise_or_match_and_never_write_on_error(
    shape, block_size, bounds, out_kind, seed
):
    """dequant_k/v over any [start, end): the slice of the full dequantization into a valid
    ``out``; IndexError for ranges outside [0, size], TypeError/ValueError for a wrong
    ``out``, which is then left exactly as it was."""
    rng = np.random.default_rng(seed)
    k, v = rng.standard_normal((2, *shape)).astype(np.float32)
    cache = kvq.QuantizedKVCache.quantize(k, v, block_size)
    start, end = bounds
    n = max(end - start, 0)
    out = {
        "none": None,
        "right": np.full(n, 7.0, np.float32),
        "wrong_dtype": np.full(n, 7.0, np.float64),
        "wrong_size": np.full(n + 1, 7.0, np.float32),
        "read_only": np.full(n, 7.0, np.float32),
        "strided": np.full(2 * n + 1, 7.0, np.float32)[::2][: n + (n == 0)],
    }[out_kind]
    if out_kind == "read_only":
        out.flags.writeable = False
    out_before = None if out is None else out.copy()
    valid_range = 0 <= start <= end <= k.size
    valid_out = out_kind in ("none", "right") or (out_kind == "strided" and n == 1)
    for read, source in ((cache.dequant_k, cache.k), (cache.dequant_v, cache.v)):
        if not valid_range:
            with pytest.raises(IndexError, match=r"outside \[0, "):
                read(start, end, out)
        elif not valid_out:
            with pytest.raises((TypeError, ValueError), match="out must"):
                read(start, end, out)
        else:
            got = read(start, end, out)
            if out is not None:
                assert got is out
            np.testing.assert_array_equal(got, source.dequantize()[start:end])
            continue
        if out is not None:
            np.testing.assert_array_equal(out, out_before)


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-4, 40),
    st.floats(allow_nan=True),
    st.text(max_size=6),
    st.sampled_from([np.int64(4), np.float32(2.0), np.bool_(True), [8], (8,), {}, object()]),
)


@settings(max_examples=50, deadline=None)
@given(
    field=st.sampled_from(
        ["bits", "group_size", "axis", "scale_dtype", "rotate", "double_quant", "search", "seed"]
    ),
    junk=JUNK,
)
def test_junk_scheme_arguments_raise_type_or_value_error(field, junk):
    """Scheme, QuantConfig, kvq.quantize and KVCache refuse bad arguments with TypeError or
    ValueError (the documented kinds), never another exception, before touching data."""
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 4, 8)
    before = x.copy()
    if junk is None:  # kvq.quantize's keywords take None as "Scheme's default"
        assert kvq.quantize(x, **{field: None}).scheme == kvq.Scheme()
    try:
        scheme = kvq.Scheme(**{field: junk})
    except (TypeError, ValueError):
        if junk is not None:
            with pytest.raises((TypeError, ValueError)):
                kvq.quantize(x, **{field: junk})
        np.testing.assert_array_equal(x, before)
        return
    for name in ("bits", "group_size", "seed"):  # what was accepted is a valid int
        value = getattr(scheme, name)
        assert type(value) is int and value >= 0
    assert type(scheme.rotate) is bool
    try:
        qt = kvq.quantize(x, scheme=scheme)
    except ValueError:  # e.g. an axis out of range for x
        return
    assert qt.dequantize().shape == x.shape


@settings(max_examples=30, deadline=None)
@given(
    args=st.fixed_dictionaries(
        {"num_kv_heads": JUNK, "head_dim": JUNK},
        optional={"capacity": JUNK, "window": JUNK, "config": JUNK},
    )
)
def test_junk_kvcache_arguments_raise_type_or_value_error(args):
    try:
        cache = kvq.KVCache(**args)
    except (TypeError, ValueError):
        return
    assert cache.num_kv_heads >= 1 and cache.head_dim >= 1 and len(cache) == 0
