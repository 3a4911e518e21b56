"""kvq.quantize: bit widths, groups, axes, rotation, second-level scales, range search."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kvq
from kvq import kernels
from kvq.rotation import hadamard_rotation
from kvq.scheme import SUPER_GROUPS
from kvq.synthetic import kv_layer
from kvq.tensor import DoubleQuantParams
from kvq.testing import assert_dequantized_close
from tests import reference

BITS = [2, 3, 4, 8]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", [-1, -2, 0])
@pytest.mark.parametrize("group_size", [1, 7, 32, 64])
@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_codes_and_params_equal_reference(bits, axis, group_size, scale_dtype):
    k, _ = kv_layer(3, 45, 32, seed=bits)
    qt = kvq.quantize(k, bits, group_size, axis, scale_dtype)
    codes, scales, mins = reference.quantize_groups(k, bits, group_size, axis, scale_dtype)
    np.testing.assert_array_equal(qt.codes, codes)
    stored_scales, stored_mins = qt.params.to_float32()
    np.testing.assert_array_equal(stored_scales, scales)
    np.testing.assert_array_equal(stored_mins, mins)
    assert qt.params.scales.dtype == np.dtype(scale_dtype)
    got = qt.dequantize()
    assert got.shape == k.shape and got.dtype == np.float32
    assert_dequantized_close(k, qt)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", [-1, -2])
def test_double_quant_keeps_the_half_scale_bound(bits, axis):
    k, _ = kv_layer(4, 300, 64, seed=3)
    qt = kvq.quantize(k, bits, 32, axis, double_quant=True)
    assert isinstance(qt.params, DoubleQuantParams)
    assert_dequantized_close(k, qt)


def test_search_never_worse_than_min_max_per_group():
    rng = np.random.default_rng(5)
    x = rng.standard_t(4, (64, 256)).astype(np.float32)
    for bits in (2, 3, 4):
        plain = kvq.quantize(x, bits, 32)
        searched = kvq.quantize(x, bits, 32, search=True)
        assert_dequantized_close(x, plain)
        assert_dequantized_close(x, searched)  # scale / 2 within its grid, clipped outside
        plain_err = ((plain.dequantize() - x) ** 2).reshape(-1, 32).sum(axis=1)
        searched_err = ((searched.dequantize() - x) ** 2).reshape(-1, 32).sum(axis=1)
        assert np.all(searched_err <= plain_err * (1 + 1e-5) + 1e-12)
        assert searched_err.sum() < 0.95 * plain_err.sum()  # and it helps overall


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 31, 100, 1001])
def test_packing_round_trip_and_layout(bits, n):
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(0, 2**bits, n, dtype=np.uint8)
    packed = np.empty(-(-n * bits // 8), np.uint8)
    if n:
        kernels.pack_codes(codes, bits, packed)
    np.testing.assert_array_equal(packed, reference.pack_bits(codes, bits))
    back = np.empty(n, np.uint8)
    if n:
        kernels.unpack_codes(packed, bits, back)
    np.testing.assert_array_equal(back, codes)


def test_packing_layout_by_hand():
    codes = np.array([1, 2, 3, 0, 3, 2, 1, 0], np.uint8)
    packed = np.empty(2, np.uint8)
    kernels.pack_codes(codes, 2, packed)
    assert packed.tolist() == [0b00111001, 0b00011011]  # first code in the low bits
    nibbles = np.empty(1, np.uint8)
    kernels.pack_codes(np.array([0x3, 0xA], np.uint8), 4, nibbles)
    assert nibbles.tolist() == [0xA3]


def test_rotation_is_orthogonal_and_attention_invariant():
    for d in (1, 2, 32, 64, 128):
        r = hadamard_rotation(d, 7).astype(np.float64)
        np.testing.assert_allclose(r @ r.T, np.eye(d), atol=1e-6)
    assert not np.array_equal(hadamard_rotation(64, 1), hadamard_rotation(64, 2))
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 4, 50, 64)).astype(np.float32)
    r = hadamard_rotation(64, 3)
    ref = kvq_attention(q, k, v)
    rotated = kvq_attention(q @ r, k @ r, v @ r) @ r.T
    np.testing.assert_allclose(rotated, ref, rtol=1e-4, atol=1e-5)


def kvq_attention(q, k, v):
    scores = q.astype(np.float64) @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (weights / weights.sum(axis=-1, keepdims=True)) @ v


def test_rotate_round_trip_and_error_norm():
    k, _ = kv_layer(2, 64, 64, seed=1)
    qt = kvq.quantize(k, 4, 32, rotate=True)
    assert_dequantized_close(k, qt)  # per coordinate in the rotated basis
    got = qt.dequantize()
    rotated = k @ hadamard_rotation(64, 0)
    rotated_qt = kvq.quantize(rotated, 4, 32)
    # orthogonal: the error's norm is the rotated-basis error's norm
    np.testing.assert_allclose(
        np.linalg.norm(got - k), np.linalg.norm(rotated_qt.dequantize() - rotated), rtol=1e-4
    )
    assert np.linalg.norm(got - k) < np.linalg.norm(kvq.quantize(k, 4, 32).dequantize() - k)


@pytest.mark.parametrize(
    ("kwargs", "shape", "expected"),
    [
        ({"bits": 8}, (4, 64), 8 + 64 / 32),
        ({"bits": 4, "scale_dtype": "float16"}, (4, 64), 4 + 32 / 32),
        ({"bits": 4, "group_size": 64, "scale_dtype": "float16"}, (4, 64), 4.5),
        ({"bits": 3}, (4, 64), 3 + 64 / 32),
        ({"bits": 2, "scale_dtype": "float16"}, (3, 64), 2 + 1),
        ({"bits": 4, "double_quant": True}, (4, 512), 4 + 12 / 32 + 32 / 256),
        ({"bits": 3, "group_size": 32}, (1, 40), (40 * 3 + 2 * 64) / 40),  # short last group
    ],
)
def test_bits_per_element_by_hand(kwargs, shape, expected):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    qt = kvq.quantize(x, **kwargs)
    assert qt.bits_per_element == pytest.approx(expected)
    assert qt.nbytes * 8 == pytest.approx(expected * x.size)


def test_nominal_bits_per_element_of_schemes_and_presets():
    assert kvq.Scheme(4, 32, double_quant=True).nominal_bits_per_element == 4.5
    assert kvq.Scheme(8, 32).nominal_bits_per_element == 10
    assert kvq.QuantConfig.kivi(bits=2).nominal_bits_per_element == 3.0
    # keys 8.5 / 4.5, values in groups of 64 at 8.25 / 4.25 (sink tokens are not nominal)
    assert kvq.QuantConfig.q8().nominal_bits_per_element == 8.375
    assert kvq.QuantConfig().nominal_bits_per_element == 8.375  # the default is q8
    assert kvq.QuantConfig.q4().nominal_bits_per_element == 4.375
    assert kvq.QuantConfig.mlx(4, 64).nominal_bits_per_element == 4.5
    assert kvq.QuantConfig.original().nominal_bits_per_element == 10
    assert SUPER_GROUPS == 8


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"bits": 5}, ValueError, r"bits must be one of \(2, 3, 4, 8\), got 5"),
        ({"bits": 2.0}, TypeError, "bits must be an integer"),
        ({"group_size": 0}, ValueError, "group_size must be >= 1, got 0"),
        ({"group_size": True}, TypeError, "group_size must be an integer"),
        ({"axis": 3}, ValueError, "axis 3 is out of range for x with 3 dims"),
        ({"axis": -4}, ValueError, "axis -4 is out of range"),
        ({"axis": 1.0}, TypeError, "axis must be an integer"),
        ({"scale_dtype": "int8"}, ValueError, "scale_dtype must be"),
        ({"rotate": -1}, ValueError, "rotate must be >= 0"),
        ({"double_quant": 1}, TypeError, "double_quant must be True or False"),
        ({"search": "yes"}, TypeError, "search must be True or False"),
    ],
)
def test_invalid_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        kvq.quantize(np.zeros((2, 3, 64), np.float32), **kwargs)


def test_rotation_needs_power_of_two_last_axis_and_finite_values():
    with pytest.raises(ValueError, match="power of two long, got 48"):
        kvq.quantize(np.zeros((2, 48), np.float32), rotate=True)
    x = np.zeros((2, 64), np.float32)
    x[1, 5] = np.nan
    with pytest.raises(ValueError, match=r"flat index 69 \(position \(1, 5\)\)"):
        kvq.quantize(x, rotate=True)


@pytest.mark.parametrize("kwargs", [{}, {"double_quant": True}, {"search": True}])
def test_nonfinite_input_names_position(kwargs):
    x = np.zeros((3, 40), np.float32)
    x[2, 7] = -np.inf
    with pytest.raises(ValueError, match=r"x has -inf at flat index 87 \(position \(2, 7\)\)"):
        kvq.quantize(x, 4, **kwargs)


def test_empty_and_zero_dim():
    qt = kvq.quantize(np.zeros((0, 64), np.float32), 4)
    assert qt.dequantize().shape == (0, 64) and qt.nbytes == 0
    with pytest.raises(ValueError, match="at least one dimension"):
        kvq.quantize(np.float32(3.0))


def test_scheme_and_repr():
    scheme = kvq.Scheme(4, 32, axis=-2, double_quant=True)
    x = np.random.default_rng(1).standard_normal((2, 64, 32)).astype(np.float32)
    qt = scheme.quantize(x)
    assert qt.scheme == scheme
    assert "int4 g32 axis-2 dq" in repr(qt)
    assert qt.dtype == np.float32 and qt.shape == x.shape
    np.testing.assert_array_equal(qt.codes, kvq.quantize(x, scheme=scheme).codes)


@settings(max_examples=150, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40),
        elements=st.floats(-1e4, 1e4, width=32),
    ),
    bits=st.sampled_from(BITS),
    group_size=st.integers(1, 70),
    data=st.data(),
)
def test_bound_holds_on_any_input(x, bits, group_size, data):
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    double_quant = data.draw(st.booleans())
    scale_dtype = data.draw(st.sampled_from(["float32", "float16"]))
    qt = kvq.quantize(x, bits, group_size, axis, scale_dtype, double_quant=double_quant)
    assert_dequantized_close(x, qt)
