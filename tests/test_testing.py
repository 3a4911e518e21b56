"""kvq.testing: the assertions pass on kvq's output and fail, with a useful message, on
deliberately broken data."""

import dataclasses
import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kvq
from kvq.rotation import rotate
from kvq.synthetic import kv_layer
from kvq.testing import assert_attention_close, assert_dequantized_close

SCHEMES = {
    "int8 per-token": {"bits": 8},
    "int4 per-channel": {"bits": 4, "axis": -2},
    "int3 axis 0, groups of 7": {"bits": 3, "group_size": 7, "axis": 0},
    "int2 float16": {"bits": 2, "scale_dtype": "float16"},
    "int4 double_quant": {"bits": 4, "double_quant": True},
    "int8 double_quant per-channel": {"bits": 8, "axis": -2, "double_quant": True},
    "int4 rotated": {"bits": 4, "rotate": True},
    "int3 searched": {"bits": 3, "search": True},
    "q4 keys": {"bits": 4, "axis": -2, "rotate": True, "double_quant": True, "search": True},
}


def with_codes(qt: kvq.QuantizedTensor, codes: np.ndarray) -> kvq.QuantizedTensor:
    return dataclasses.replace(qt, codes=codes)


@pytest.mark.parametrize("name", SCHEMES)
def test_dequantized_close_passes_on_kvq_output(name):
    k, _ = kv_layer(3, 45, 32, seed=1)
    assert_dequantized_close(k, kvq.quantize(k, **SCHEMES[name]))


@pytest.mark.parametrize("axis", [-1, -2])
def test_a_wrong_code_is_named_by_index_value_bound_and_group(axis):
    k, _ = kv_layer(3, 45, 32, seed=2)
    qt = kvq.quantize(k, 8, 32, axis=axis)
    codes = qt.codes.copy()
    # element (1, 7, 5): its code's position in the layout with the grouping axis last
    flat = (1 * 45 + 7) * 32 + 5 if axis == -1 else (1 * 32 + 5) * 45 + 7
    codes[flat] = codes[flat] + 3 if codes[flat] < 128 else codes[flat] - 3
    broken = with_codes(qt, codes)
    value = float(k[1, 7, 5])
    got = float(broken.dequantize()[1, 7, 5])
    group = "x[1, 7, 0:32]" if axis == -1 else "x[1, 0:32, 5]"
    n_groups = 3 * 45 if axis == -1 else 3 * 32 * 2
    pattern = (
        rf"at 1 of 4,320 elements .*\n"
        rf"Worst x\[1, 7, 5\]: value {re.escape(f'{value:.8g}')}, dequantized "
        rf"{re.escape(f'{got:.8g}')}, \|error\| .* > bound .*\n"
        rf"Its group \d+ of {n_groups}, {re.escape(group)}: scale "
    )
    with pytest.raises(AssertionError, match=pattern):
        assert_dequantized_close(k, broken)


def test_bound_is_half_a_step():
    """Just inside scale / 2 passes, just outside fails: the check is tight."""
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    qt = kvq.quantize(x, 4, 32)
    step = float(qt.params.scales[5])  # group 5: row 2, elements 32:64
    near = qt.dequantize()
    near[2, 40] += 0.49 * step
    assert_dequantized_close(near, qt)
    near[2, 40] += 0.02 * step
    with pytest.raises(AssertionError, match=r"Worst x\[2, 40\].*\n.*group 5 of 8, x\[2, 32:64\]"):
        assert_dequantized_close(near, qt)


def test_rotated_schemes_are_checked_in_the_rotated_basis():
    k, _ = kv_layer(2, 16, 64, seed=4)
    qt = kvq.quantize(k, 4, 32, rotate=True, seed=3)
    assert_dequantized_close(k, qt)
    codes = qt.codes.copy()
    codes[(1 * 16 + 2) * 64 // 2 + 10] ^= 0xFF  # both 4-bit codes of (x @ R)[1, 2, 20:22]
    with pytest.raises(AssertionError) as caught:
        assert_dequantized_close(k, with_codes(qt, codes))
    message = str(caught.value)
    assert "rotated basis x @ R, R = kvq.rotation.hadamard_rotation(64, 3)" in message
    assert re.search(r"Worst \(x @ R\)\[1, 2, 2[01]\]", message)
    assert "at 2 of 2,048 elements" in message
    # the coordinate it names is the rotated input's
    value = float(re.search(r"value (\S+),", message).group(1))
    index = int(re.search(r"Worst \(x @ R\)\[1, 2, (\d+)\]", message).group(1))
    assert value == pytest.approx(float(rotate(k, 3)[1, 2, index]), rel=1e-7)


def test_search_clips_values_by_design():
    x = np.random.default_rng(5).standard_t(2, (64, 256)).astype(np.float32)
    qt = kvq.quantize(x, 2, 32, search=True)
    plain_error = np.abs(qt.dequantize() - x)
    scales = np.repeat(qt.params.scales.reshape(64, -1), 32, axis=1)
    assert np.any(plain_error > scales)  # some values are clipped: beyond any scale / 2
    assert_dequantized_close(x, qt)  # yet within scale / 2 of their clipped value
    codes = qt.codes.copy()
    codes[100] ^= 0b11  # element 400 = (1, 144), code 0 <-> 3
    with pytest.raises(AssertionError, match=r"Worst x\[1, 144\]"):
        assert_dequantized_close(x, with_codes(qt, codes))


def test_blocks_and_kv_cache():
    k, v = kv_layer(3, 45, 32, seed=6)
    cache = kvq.QuantizedKVCache.quantize(k, v, block_size=48, scale_dtype="float16")
    assert_dequantized_close((k, v), cache)
    assert_dequantized_close(k, cache.k)
    bad = v.copy()
    bad[2, 3, 4] += 1.0
    pattern = (
        r"at 1 of 4,320 elements \(uint8 codes in flat blocks of 48, float16 scales\)\.\n"
        r"Worst v\[2, 3, 4\]: .*\nIts group 62 of 90, flat elements \[2976, 3024\) of v"
    )
    with pytest.raises(AssertionError, match=pattern):
        assert_dequantized_close((k, bad), cache)
    with pytest.raises(AssertionError, match=r"at 4,320 of 4,320 elements .*\nWorst k\["):
        assert_dequantized_close((k + 1, v), cache)


def test_dequantized_close_bad_usage():
    x = np.zeros((4, 64), np.float32)
    qt = kvq.quantize(x, 4)
    with pytest.raises(AssertionError, match=r"x has shape \(64, 4\), qt \(4, 64\)"):
        assert_dequantized_close(x.T, qt)
    with pytest.raises(TypeError, match="QuantizedTensor, QuantizedBlocks or QuantizedKVCache"):
        assert_dequantized_close(x, qt.dequantize())
    cache = kvq.QuantizedKVCache.quantize(x, x)
    with pytest.raises(TypeError, match=r"the \(k, v\) pair"):
        assert_dequantized_close(x, cache)
    nan = x.copy()
    nan[3, 1] = np.nan
    with pytest.raises(AssertionError, match=r"Worst x\[3, 1\]: value nan"):
        assert_dequantized_close(nan, qt)
    with pytest.raises(AssertionError, match="from my test"):
        assert_dequantized_close(nan, qt, err_msg="from my test")


MAGNITUDES = st.sampled_from([1e-42, 1e-30, 1e-6, 1.0, 1e6, 1e30, 8.5e37])


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=20),
        elements=st.floats(-1, 1, width=32),
    ),
    magnitude=MAGNITUDES,
    data=st.data(),
)
def test_dequantized_close_holds_at_any_magnitude(x, magnitude, data):
    x = x * np.float32(magnitude)
    power_of_two = x.shape[-1] & (x.shape[-1] - 1) == 0
    try:
        qt = kvq.quantize(
            x,
            bits=data.draw(st.sampled_from([2, 3, 4, 8])),
            group_size=data.draw(st.integers(1, 40)),
            axis=data.draw(st.integers(-x.ndim, x.ndim - 1)),
            rotate=data.draw(st.booleans()) if power_of_two else False,
            search=data.draw(st.booleans()),
        )
    except ValueError:  # a rotation near float32's limit may widen a group past 2**127
        assume(False)
    assert_dequantized_close(x, qt)


# --- attention ------------------------------------------------------------------------------


def attention_pair():
    cache = kvq.KVCache(2, 64, kvq.QuantConfig.q4())
    cache.append(*kv_layer(2, 100, 64, seed=7))
    q = np.random.default_rng(8).standard_normal((8, 3, 64)).astype(np.float32)
    out = kvq.attention(q, cache, causal=False)
    ref = kvq.attention_reference(q, cache.keys(), cache.values(), causal=False)
    return out, ref


def test_attention_close_passes_on_kvq_attention():
    out, ref = attention_pair()
    assert_attention_close(out, ref, rtol=1e-5)
    assert_attention_close(ref, ref, rtol=0)


def test_attention_close_names_the_worst_row():
    out, ref = attention_pair()
    bad = out.copy()
    bad[5, 2, 17] += 0.05
    bad[1, 0, 3] += 0.001
    pattern = (
        r"in 2 of 24 rows\.\nWorst row \[5, 2\] \(head 5, query 2\): \|\|out - ref\|\| = "
        r"0\.0[45]\d*, \|\|ref\|\| = .*; largest difference at channel 17: "
    )
    with pytest.raises(AssertionError, match=pattern):
        assert_attention_close(bad, ref, rtol=1e-5)


def test_attention_close_is_per_row():
    """One small row's error is not averaged away by the other rows."""
    _, ref = attention_pair()
    ref = ref.copy()
    ref[3, 1] *= 1e-3
    small = ref.copy()
    small[3, 1] *= 1 + 1e-3  # 1e-3 relative error in that row only
    overall = np.linalg.norm(small - ref) / np.linalg.norm(ref)
    assert overall < 1e-5  # an overall check would pass
    with pytest.raises(AssertionError, match=r"Worst row \[3, 1\] .* relative 0\.001"):
        assert_attention_close(small, ref, rtol=1e-5)


def test_attention_close_edge_cases():
    ref = np.zeros((2, 1, 4))
    assert_attention_close(np.zeros((2, 1, 4)), ref, rtol=1e-5)  # zero rows match exactly
    with pytest.raises(AssertionError, match=r"in 2 of 2 rows\.\nWorst row \[0, 0\]"):
        assert_attention_close(np.full((2, 1, 4), 1e-9), ref, rtol=1e-5)
    assert_attention_close(np.full((2, 1, 4), 1e-9), ref, rtol=1e-5, atol=1e-8)
    nan = np.ones((2, 1, 4))
    nan[0, 0, 2] = np.nan
    with pytest.raises(AssertionError, match=r"Worst row \[0, 0\] .* channel 2: out nan"):
        assert_attention_close(nan, np.ones((2, 1, 4)), rtol=1e-5)
    with pytest.raises(AssertionError, match=r"different shapes: out \(2, 1, 4\), ref \(2, 4\)"):
        assert_attention_close(ref, np.zeros((2, 4)), rtol=1e-5)
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0, got -1"):
        assert_attention_close(ref, ref, rtol=-1)
    with pytest.raises(AssertionError, match=r"Worst row \[0\]: (.*\n)*extra context$"):
        assert_attention_close(np.eye(2), np.ones((2, 2)), rtol=0.1, err_msg="extra context")


@pytest.mark.parametrize("rtol", ["1e-5", True, None])
def test_attention_close_refuses_a_tolerance_that_is_not_a_number(rtol):
    ref = np.ones((2, 1, 4))
    with pytest.raises(TypeError, match="rtol must be a real number"):
        assert_attention_close(ref, ref, rtol=rtol)
