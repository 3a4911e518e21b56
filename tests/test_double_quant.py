"""double_quant's second-level scales against the format written out in NumPy from the input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvq
from kvq.synthetic import kv_layer
from kvq.tensor import DoubleQuantParams, _unpack
from tests import reference


def as_rows(x: np.ndarray, axis: int) -> np.ndarray:
    """2-D (rows, length) view of x with its grouping axis last, as kvq.quantize groups it."""
    return np.ascontiguousarray(np.moveaxis(x, axis, -1)).reshape(-1, x.shape[axis])


def stored_codes(qt: kvq.QuantizedTensor) -> tuple[np.ndarray, np.ndarray]:
    p = qt.params
    assert isinstance(p, DoubleQuantParams)
    sc = _unpack(p.scale_codes, 6, p.n_groups).astype(np.int64)
    mc = _unpack(p.min_codes, 6, p.n_groups).astype(np.int64)
    return sc, mc


def assert_second_level_equal(qt, rows, group_size: int, bits: int) -> None:
    """``qt``'s 6-bit scale and min codes (exactly) and float16 super-group steps (bit for
    bit) equal the format's definition over ``rows`` (groups along the last axis)."""
    sc, mc, d, dmin = reference.double_quant_params(rows, group_size, 2**bits - 1)
    got_sc, got_mc = stored_codes(qt)
    np.testing.assert_array_equal(got_sc, sc)
    np.testing.assert_array_equal(got_mc, mc)
    np.testing.assert_array_equal(qt.params.super_scales.astype(np.float32), d)
    np.testing.assert_array_equal(qt.params.super_mins.astype(np.float32), dmin)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", [-1, -2])
@pytest.mark.parametrize("group_size", [32, 7])
def test_second_level_codes_and_steps_equal_reference(bits, axis, group_size):
    """The 6-bit scale and min codes (exactly) and the float16 super-group steps (bit for bit)
    equal the format's definition computed in NumPy from the input's groups."""
    k, _ = kv_layer(4, 300, 64, seed=3)
    qt = kvq.quantize(k, bits, group_size, axis, double_quant=True)
    rows = as_rows(k, axis)
    assert_second_level_equal(qt, rows, group_size, bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", [-1, -2])
def test_error_within_the_bound_from_the_input(bits, axis):
    """Every element within half the largest scale the format may store for its group,
    computed from the group's min and max and the super-group's steps (not from the stored
    scale); measured at 0.995-0.999 of that bound, so a coarser step shows."""
    k, _ = kv_layer(4, 300, 64, seed=3)
    qt = kvq.quantize(k, bits, 32, axis, double_quant=True)
    rows = as_rows(k, axis)
    got = as_rows(qt.dequantize(), axis)
    bound = reference.double_quant_error_bound(rows, 32, 2**bits - 1)
    errors = reference.row_groups(np.abs(got.astype(np.float64) - rows), 32)
    worst = np.array([e.max() for e in errors])
    assert np.all(worst <= bound), float((worst / bound).max())


def test_bound_is_the_input_scale_plus_the_steps():
    """Check the reference bound itself on a hand-made case: two groups, 2 bits."""
    x = np.array([[0.0, 1.0, 2.0, 3.0], [-1.0, 0.0, 1.0, 5.0]], np.float32)
    bound = reference.double_quant_error_bound(x, 4, 3)
    # dmin = 1 / 32 (one ulp up); needed = (3 + dmin) / 3 and (6 + dmin) / 3; d = max / 63
    dmin = 1 / 32 * (1 + 2**-10)
    needed = (np.array([3.0, 6.0]) + dmin) / 3
    d = needed.max() / 63 * (1 + 2**-10)
    np.testing.assert_allclose(bound, (needed + d) / 2, rtol=1e-5)


@pytest.mark.parametrize("value", [1e-42, -3e-42, 8e-43])
def test_a_subnormal_group_still_gets_a_scale_step(value):
    """A group whose grid is subnormal wide (one value of 1e-42, its min stored as 0): the
    super-group step (max needed scale / 63) underflows float32, and must round up to the
    smallest float16 rather than to 0, which left the value above its grid (error 1e-42, past
    the README's 2**-140 for subnormal groups). Found by Hypothesis."""
    x = np.array([[value, value, value, value]], np.float32)
    qt = kvq.quantize(x, 8, 4, -1, double_quant=True)
    sc, mc, d, dmin = reference.double_quant_params(x, 4, 255)
    got_sc, got_mc = stored_codes(qt)
    np.testing.assert_array_equal(got_sc, sc)
    np.testing.assert_array_equal(got_mc, mc)
    np.testing.assert_array_equal(qt.params.super_scales.astype(np.float32), d)
    np.testing.assert_array_equal(qt.params.super_mins.astype(np.float32), dmin)
    assert d[0] > 0 and sc[0] > 0
    error = np.abs(qt.dequantize().astype(np.float64) - x)
    assert np.all(error <= d[0] * sc[0] / 2)  # within half the stored scale


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    groups=st.integers(1, 13),  # groups a row: super-groups of 8 end partial or whole
    group_size=st.integers(1, 9),
    bits=st.sampled_from([2, 3, 4, 8]),
    magnitude=st.sampled_from([1e-44, 1e-38, 1e-20, 1e-3, 1.0, 1e3, 3e4]),
    seed=st.integers(0, 2**16),
    shifted=st.booleans(),  # every value of one sign: the mins' codes at one end
)
def test_second_level_codes_equal_reference_at_any_magnitude(
    rows, groups, group_size, bits, magnitude, seed, shifted
):
    """The compiled second level (kernels.second_level_codes) against the definition, on
    subnormal to float16-sized groups, partial last super-groups and one-signed data."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, groups * group_size)) * magnitude
    if shifted:
        x = np.abs(x)
    x = x.astype(np.float32)
    qt = kvq.quantize(x, bits, group_size, -1, double_quant=True)
    assert_second_level_equal(qt, x, group_size, bits)
