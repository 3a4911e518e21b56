"""Hypothesis properties of the public API beyond tests/test_properties.py (QuantizedBlocks):
kvq.quantize on every input dtype and layout, rotation, range search, byte accounting, the
streaming KVCache (windows, residual, appends in any split) and kvq.attention.

Bounds are the README's: every element within scale / 2 plus float32 rounding (in L2 norm per
row when rotated); search never makes a group's squared error worse; attention within 1e-5 of
max |reference|.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kvq
from tests import reference
from tests.robustness.api_strategies import (
    BITS,
    LAYOUTS,
    assert_same_state,
    cache_setups,
    element_params,
    expected_nbytes,
    float_arrays,
    group_ids,
    half_scale_bound,
    snapshot,
    unit_values,
    with_layout,
)

FEW = settings(max_examples=50, deadline=None)


pytestmark = pytest.mark.usefixtures("one_numba_thread")


def same_quantized(a: kvq.QuantizedTensor, b: kvq.QuantizedTensor) -> None:
    parts_a, parts_b = a.parts(), b.parts()
    assert parts_a.keys() == parts_b.keys()
    for key in parts_a:
        assert parts_a[key].dtype == parts_b[key].dtype, key
        np.testing.assert_array_equal(parts_a[key], parts_b[key], err_msg=key)


@FEW
@given(
    xm=float_arrays(),
    layout=st.sampled_from(LAYOUTS),
    bits=st.sampled_from(BITS),
    group_size=st.one_of(st.integers(1, 40), st.sampled_from([32, 64, 128])),
    data=st.data(),
)
def test_quantize_any_dtype_and_layout_is_the_float32_result_within_the_bound(
    xm, layout, bits, group_size, data
):
    """float16/32/64, either byte order, strided, Fortran, reversed, read-only, unaligned or
    nested lists: the same codes and parameters as the float32 C-contiguous copy, every
    element within the bound, the input untouched, and the bytes counted exactly."""
    x, magnitude = xm
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1), label="axis")
    x32 = np.ascontiguousarray(x, np.float32)
    small = magnitude <= 1e4
    scale_dtype = data.draw(st.sampled_from(["float32", "float16"] if small else ["float32"]))
    double_quant = small and data.draw(st.booleans(), label="double_quant")
    given_x = with_layout(x, layout)
    before = np.array(given_x, copy=True)
    qt = kvq.quantize(given_x, bits, group_size, axis, scale_dtype, double_quant=double_quant)
    np.testing.assert_array_equal(np.asarray(given_x), before)  # input untouched
    if layout != "list":
        assert qt.dtype == np.asarray(given_x).dtype
    same_quantized(
        qt, kvq.quantize(x32, bits, group_size, axis, scale_dtype, double_quant=double_quant)
    )
    got = qt.dequantize()
    assert got.shape == x.shape and got.dtype == np.float32 and got.flags.c_contiguous
    error = np.abs(got.astype(np.float64) - x32)
    bound = half_scale_bound(x32, qt)
    assert np.all(error <= bound), float((error - bound).max())
    assert qt.nbytes == expected_nbytes(qt)
    assert qt.bits_per_element == 8 * qt.nbytes / x.size


@st.composite
def rotatable(draw):
    """float32 arrays whose last axis is a power of two long, and their magnitude."""
    lead = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=10))
    shape = (*lead, draw(st.sampled_from([1, 2, 4, 8, 16, 32])))
    magnitude = draw(st.sampled_from([1e-30, 1e-6, 1.0, 1e4, 1e30]))
    return (unit_values(draw, shape) * magnitude).astype(np.float32), magnitude


@FEW
@given(
    xm=rotatable(),
    seed=st.integers(0, 2**32),
    bits=st.sampled_from(BITS),
    group_size=st.integers(1, 40),
    data=st.data(),
)
def test_rotated_error_within_the_bound_in_l2_norm_per_row(xm, seed, bits, group_size, data):
    """With rotate=seed the bound holds in the rotated basis, so each row along the last axis
    comes back within the L2 norm of its elements' bounds (plus rotation rounding)."""
    x, magnitude = xm
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1), label="axis")
    double_quant = magnitude <= 1e4 and data.draw(st.booleans(), label="double_quant")
    qt = kvq.quantize(x, bits, group_size, axis, rotate=True, seed=seed, double_quant=double_quant)
    got = qt.dequantize()
    assert got.shape == x.shape and got.dtype == np.float32
    rotated = kvq.rotation.rotate(x, seed)
    bound = half_scale_bound(rotated, qt)  # per element, in the rotated basis
    row_bound = np.sqrt((bound**2).sum(axis=-1))
    norms = np.sqrt((x.astype(np.float64) ** 2).sum(axis=-1))
    error = np.sqrt(((got.astype(np.float64) - x) ** 2).sum(axis=-1))
    assert np.all(error <= row_bound + 1e-5 * norms + 2.0**-120), float((error - row_bound).max())


@FEW
@given(
    xm=float_arrays(dtypes=(np.float32,), max_side=40),
    bits=st.sampled_from(BITS),
    group_size=st.integers(2, 48),
    data=st.data(),
)
def test_search_never_makes_any_group_worse(xm, bits, group_size, data):
    """search=True keeps, per group, the candidate with the lowest squared error, min/max
    included: no group's squared error, a row's shorter last group included, exceeds plain
    min/max's (float rounding aside)."""
    x, magnitude = xm
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1), label="axis")
    scale_dtype = data.draw(
        st.sampled_from(["float32", "float16"] if magnitude <= 1e4 else ["float32"])
    )
    plain = kvq.quantize(x, bits, group_size, axis, scale_dtype)
    searched = kvq.quantize(x, bits, group_size, axis, scale_dtype, search=True)
    plain_sse, searched_sse, _ = group_errors(x, plain, searched)
    scale, _ = element_params(plain)
    ids = group_ids(x.shape, axis, group_size).reshape(-1)
    x64 = x.astype(np.float64).reshape(-1)
    slack = np.bincount(ids, (1e-5 * scale.reshape(-1)) ** 2 + (1e-6 * x64) ** 2)
    worse = searched_sse > plain_sse * (1 + 1e-5) + slack  # short last groups included
    assert not worse.any(), float((searched_sse - plain_sse)[worse].max())


def group_errors(x, plain, searched):
    """(plain SSE, searched SSE, whole) per group; ``whole``: the group is full length."""
    ids = group_ids(x.shape, plain.axis, plain.scheme.group_size).reshape(-1)
    x64 = x.astype(np.float64).reshape(-1)

    def sse(qt):
        return np.bincount(ids, (qt.dequantize().astype(np.float64).reshape(-1) - x64) ** 2)

    counts = np.bincount(ids)
    whole = counts == min(plain.scheme.group_size, x.shape[plain.axis])
    return sse(plain), sse(searched), whole


def test_search_never_makes_a_short_last_group_worse():
    x = np.random.default_rng(1).standard_normal(10).astype(np.float32)  # groups of 6 and 4
    plain = kvq.quantize(x, 3, 6)
    searched = kvq.quantize(x, 3, 6, search=True)
    plain_sse, searched_sse, whole = group_errors(x, plain, searched)
    assert whole.tolist() == [True, False]
    assert searched_sse[1] <= plain_sse[1] * (1 + 1e-5)  # was 0.00468 > 0.00428 (padding)


@settings(max_examples=50, deadline=None)
@given(setup=cache_setups())
def test_kvcache_holds_each_chunk_as_quantize_would_and_residual_exactly(setup):
    """Appending in any split, with any window and residual: len, held and positions follow
    the README's arithmetic, each held chunk reads back exactly as kvq.quantize of those
    tokens would give, and residual tokens come back as given (to rotation rounding)."""
    cache = setup.build()
    setup.feed(cache)
    total, window = setup.total, setup.window
    stats = cache.stats()
    assert len(cache) == total == stats["appended"]
    chunks = {"k": stats["k_chunk_tokens"], "v": stats["v_chunk_tokens"]}
    held = cache.held
    if window is None:
        assert held == total
    else:
        # README: "between W and W + chunk - 1"; a residual longer than the window also
        # stays whole (float32 tokens are dropped only once quantized into a chunk)
        most = max(window, setup.config.residual) + max(chunks.values()) - 1
        assert min(total, window) <= held <= most
    np.testing.assert_array_equal(cache.positions, np.arange(total - held, total))
    config = setup.config
    for name, scheme, source, read in (
        ("k", config.k, setup.k, cache.keys),
        ("v", config.v, setup.v, cache.values),
    ):
        quantized, residual = stats[f"{name}_quantized"], stats[f"{name}_residual"]
        assert residual <= config.residual + chunks[name] - 1
        first = total - quantized - residual  # the stream's first held position
        assert first <= total - held and first % chunks[name] == 0
        expected = np.empty((setup.heads, quantized + residual, setup.head_dim), np.float32)
        sinks = min(config.sink_tokens, total) if first == 0 else 0  # held exactly
        stand_in = reference.sink_stand_in(source, config.sink_tokens, chunks[name])
        for at in range(0, quantized, chunks[name]):
            tokens = stand_in[:, first + at : first + at + chunks[name]]
            qt = kvq.quantize(tokens, scheme=scheme)
            expected[:, at : at + chunks[name]] = qt.dequantize()
            if not scheme.rotate and not scheme.search:
                assert np.all(
                    np.abs(qt.dequantize().astype(np.float64) - tokens)
                    <= half_scale_bound(tokens, qt)
                )
        expected[:, quantized:] = source[:, total - residual :]
        got = read()
        lo = total - held  # the first position read
        if sinks > lo:  # sink tokens come back as given (to rotation rounding)
            exact = source[:, lo:sinks]
            atol = 1e-5 * max(float(np.abs(exact).max()), 1e-30)
            np.testing.assert_allclose(got[:, : sinks - lo], exact, rtol=0, atol=atol)
            expected[:, lo:sinks] = got[:, : sinks - lo]  # checked; the rest below
        assert got.shape == (setup.heads, held, setup.head_dim) and got.dtype == np.float32
        expected = expected[:, quantized + residual - held :]  # the cache shows the last held
        codes_read = max(held - residual, 0)  # tokens of those that were quantized
        np.testing.assert_array_equal(got[:, :codes_read], expected[:, :codes_read])
        tail, want = got[:, codes_read:], expected[:, codes_read:]
        if not scheme.rotate:
            np.testing.assert_array_equal(tail, want)
        else:  # the residual waits rotated: unrotating rounds
            atol = 1e-5 * max(float(np.abs(want).max(initial=0)), 1e-30)
            np.testing.assert_allclose(tail, want, rtol=0, atol=atol)
        # and any sub-range is the same slice
        start = total // 3 % (held + 1)
        np.testing.assert_array_equal(read(start, held), got[:, start:])


@settings(max_examples=40, deadline=None)
@given(
    # keys of at most ~10 keep logits within ~100: float32 logits carry an absolute rounding
    # of about 3e-8 of the largest, which alone passes 1e-5 of the output past ~300
    setup=cache_setups(max_tokens=60, allow_capacity=False, magnitudes=(1e-3, 1.0, 10.0)),
    group=st.integers(1, 3),
    causal=st.booleans(),
    with_sinks=st.booleans(),
    data=st.data(),
)
def test_attention_matches_the_reference_on_what_the_cache_holds(
    setup, group, causal, with_sinks, data
):
    cache = setup.build()
    setup.feed(cache)
    held = cache.held
    most = held if setup.window is None else max(1, held - setup.window + 1)
    t_q = data.draw(st.integers(1, min(most, 4)), label="t_q")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32), label="seed"))
    heads = setup.heads * group
    q = rng.standard_normal((heads, t_q, setup.head_dim)).astype(np.float32)
    sinks = rng.standard_normal(heads) if with_sinks else None
    before = snapshot(cache)
    out = kvq.attention(q, cache, sinks=sinks, causal=causal)
    assert_same_state(before, snapshot(cache))
    keys, values = cache.keys(), cache.values()
    ref = kvq.attention_reference(q, keys, values, sinks=sinks, causal=causal, window=setup.window)
    assert out.shape == (heads, t_q, setup.head_dim) and out.dtype == np.float32
    scale = max(np.abs(ref).max(), np.abs(values).max() * 1e-3, 1e-30)
    assert np.abs(out - ref).max() <= 1e-5 * scale, float(np.abs(out - ref).max() / scale)
