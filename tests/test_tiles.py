"""attention's register tiles that read K/V codes directly (``kernels/_tiles.py``), against
NumPy: values accumulated from per-token codes, scores from per-channel key codes, and the
float tiles of the two products. Each tile is also built for register files other than this
CPU's (``fits``: 16-float accumulators per pass, 16 on AVX-512, 4 on AVX2), so that every
pass split runs on any machine."""

import functools

import numpy as np
import pytest
from numba import njit

from kvq.kernels import pack_codes
from kvq.kernels._tiles import (
    ACCUMULATORS,
    _make_scores_codes_tile,
    _make_scores_tile,
    _make_values_codes_tile,
    _make_values_tile,
    _pass_vectors,
    scores_tokens_tile,
    scores_tokens_tile_1,
    scores_tokens_tile_2,
    scores_tokens_tile_3,
)

FITS = sorted({ACCUMULATORS, 16, 4, 1})  # this CPU's split, AVX-512's, AVX2's, one a pass


@functools.cache
def _values_caller(fits: int):
    """njit (rows, codes, ...) -> None calling ``values_codes_tile_<rows>`` built for ``fits``."""
    t1, t2, t3, t4 = (_make_values_codes_tile(n, fits) for n in (1, 2, 3, 4))

    @njit
    def call(rows, codes, token_at, bits, weights, scales, mins, groups, runs, acc, r0, t1_, c0):
        if rows == 1:
            t1(codes, token_at, bits, weights, scales, mins, groups, runs, acc, r0, 0, t1_, c0)
        elif rows == 2:
            t2(codes, token_at, bits, weights, scales, mins, groups, runs, acc, r0, 0, t1_, c0)
        elif rows == 3:
            t3(codes, token_at, bits, weights, scales, mins, groups, runs, acc, r0, 0, t1_, c0)
        else:
            t4(codes, token_at, bits, weights, scales, mins, groups, runs, acc, r0, 0, t1_, c0)

    return call


@functools.cache
def _scores_caller(fits: int):
    """njit (rows, codes, ...) -> None calling ``scores_codes_tile_<rows>`` built for ``fits``."""
    t1, t2, t3, t4 = (_make_scores_codes_tile(n, fits) for n in (1, 2, 3, 4))

    @njit
    def call(rows, codes, base, stride, bits, weights, bias, scores, r0, i0, first, last, add):
        if rows == 1:
            t1(codes, base, stride, bits, weights, bias, scores, r0, i0, first, last, add)
        elif rows == 2:
            t2(codes, base, stride, bits, weights, bias, scores, r0, i0, first, last, add)
        elif rows == 3:
            t3(codes, base, stride, bits, weights, bias, scores, r0, i0, first, last, add)
        else:
            t4(codes, base, stride, bits, weights, bias, scores, r0, i0, first, last, add)

    return call


@functools.cache
def _float_caller(fits: int, rows: int):
    """njit (keys, q, scores, weights, values, acc, r0, i0, width, c0) -> None: the float
    ``scores_tile`` and ``values_tile`` of ``rows`` rows built for ``fits``."""
    scores_tile_ = _make_scores_tile(rows, fits)
    values_tile_ = _make_values_tile(rows, fits)

    @njit
    def call(keys, q, scores, weights, values, acc, r0, i0, width, c0):
        scores_tile_(keys, q, scores, r0, i0)
        values_tile_(weights, values, acc, r0, width, c0)

    return call


@njit
def _token_scores(
    rows, codes, token_at, bits, q, sums, scales, mins, groups, runs, scores, r0, t1
):
    if rows == 1:
        scores_tokens_tile_1(
            codes, token_at, bits, q, sums, scales, mins, groups, runs, scores, r0, t1
        )
    elif rows == 2:
        scores_tokens_tile_2(
            codes, token_at, bits, q, sums, scales, mins, groups, runs, scores, r0, t1
        )
    elif rows == 3:
        scores_tokens_tile_3(
            codes, token_at, bits, q, sums, scales, mins, groups, runs, scores, r0, t1
        )
    else:
        scores_tokens_tile(
            codes, token_at, bits, q, sums, scales, mins, groups, runs, scores, r0, t1
        )


def _packed(codes: np.ndarray, bits: int) -> np.ndarray:
    packed = np.zeros(codes.size * bits // 8, np.uint8)
    pack_codes(codes.reshape(-1), bits, packed)
    return packed


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("fits", FITS)
def test_values_from_codes_equal_numpy(bits, rows, group, fits):
    """acc[r, c0:c0+64] += sum_t w[r, t] (min + scale * code) over tokens whose codes sit at
    scattered offsets, each token's groups with their own params (both tiles of dim 128)."""
    rng = np.random.default_rng(bits * 10 + rows)
    dim, tokens, r0 = 128, 37, 1
    groups = dim // group
    codes = rng.integers(0, 2**bits, (tokens + 3, dim)).astype(np.uint8)
    order = rng.permutation(tokens + 3)[:tokens]  # token t's codes are row order[t]
    token_at = (order * dim).astype(np.int64)
    weights = rng.random((r0 + rows + 1, tokens)).astype(np.float32)
    scales = rng.uniform(0.01, 0.5, tokens * groups).astype(np.float32)
    mins = rng.uniform(-4.0, 1.0, tokens * groups).astype(np.float32)
    acc = rng.standard_normal((r0 + rows + 1, dim)).astype(np.float32)
    before = acc.copy()
    values = (
        mins.reshape(tokens, groups, 1).astype(np.float64)
        + scales.reshape(tokens, groups, 1) * codes[order].reshape(tokens, groups, group)
    ).reshape(tokens, dim)
    expected = before.astype(np.float64)
    expected[r0 : r0 + rows] += weights[r0 : r0 + rows].astype(np.float64) @ values
    packed = _packed(codes, bits)
    for c0 in (0, 64):
        _values_caller(fits)(
            rows, packed, token_at, bits, weights, scales, mins, groups, group // 32, acc, r0,
            tokens, c0,
        )  # fmt: skip
    np.testing.assert_allclose(acc, expected, rtol=1e-5, atol=1e-5)
    assert (acc[:r0] == before[:r0]).all() and (acc[r0 + rows :] == before[r0 + rows :]).all()


@pytest.mark.parametrize("bits", [8, 6, 5, 4, 3, 2, 1])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("fits", FITS)
def test_scores_from_codes_equal_numpy(bits, rows, fits):
    """scores[r, i0:i0+32] = bias[r] + sum_d w[r, d] (code - 2 ** (bits - 1)) for channel runs
    of 32 codes ``stride`` apart, written (not added) into the tile only; then the same
    channels in two calls, the second adding to the first's scores (a head of two widths)."""
    rng = np.random.default_rng(bits * 10 + rows + 5)
    dim, stride, at, r0, i0, split = 64, 40, 8, 1, 32, 24
    codes = rng.integers(0, 2**bits, at + dim * stride).astype(np.uint8)
    weights = rng.standard_normal((r0 + rows + 1, dim)).astype(np.float32)
    bias = rng.standard_normal(r0 + rows + 1).astype(np.float32)
    scores = np.full((r0 + rows + 1, 96), -9.0, np.float32)
    channels = np.stack([codes[at + d * stride : at + d * stride + 32] for d in range(dim)])
    centred = channels.astype(np.float64) - 2 ** (bits - 1)
    expected = bias[r0 : r0 + rows, None] + weights[r0 : r0 + rows].astype(np.float64) @ centred
    packed = _packed(codes, bits)
    call = _scores_caller(fits)
    call(rows, packed, at * bits // 8, stride, bits, weights, bias, scores, r0, i0, 0, dim, 0)
    np.testing.assert_allclose(
        scores[r0 : r0 + rows, i0 : i0 + 32], expected, rtol=1e-5, atol=1e-4
    )
    scores[r0 : r0 + rows, i0 : i0 + 32] = 7.0  # overwritten by the first of two calls
    second = (at + split * stride) * bits // 8
    call(rows, packed, at * bits // 8, stride, bits, weights, bias, scores, r0, i0, 0, split, 0)
    call(rows, packed, second, stride, bits, weights, bias, scores, r0, i0, split, dim, 1)
    # float32 sums in another order: within a few ulps of the sum of the terms' magnitudes
    magnitude = np.abs(weights[r0 : r0 + rows]).astype(np.float64) @ np.abs(centred)
    bound = 1e-6 * (magnitude + np.abs(bias[r0 : r0 + rows, None]))
    assert (np.abs(scores[r0 : r0 + rows, i0 : i0 + 32] - expected) <= bound).all()
    untouched = np.ones(scores.shape, bool)
    untouched[r0 : r0 + rows, i0 : i0 + 32] = False
    assert (scores[untouched] == -9.0).all(), "wrote outside the tile"


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("group", [32, 64])
def test_scores_from_token_codes_equal_numpy(bits, rows, group):
    """scores[r, t] = q[r] . (min + scale * code) for per-token key codes at scattered
    offsets, each token's groups with their own params; nothing else is written."""
    rng = np.random.default_rng(bits * 10 + rows + 9)
    dim, tokens, r0 = 128, 21, 1
    groups = dim // group
    codes = rng.integers(0, 2**bits, (tokens + 2, dim)).astype(np.uint8)
    order = rng.permutation(tokens + 2)[:tokens]
    token_at = (order * dim).astype(np.int64)
    q = rng.standard_normal((r0 + rows + 1, dim)).astype(np.float32)
    sums = q.reshape(r0 + rows + 1, dim // 32, 32).sum(axis=2).astype(np.float32)
    scales = rng.uniform(0.01, 0.5, tokens * groups).astype(np.float32)
    mins = rng.uniform(-4.0, 1.0, tokens * groups).astype(np.float32)
    scores = np.full((r0 + rows + 1, tokens + 5), -9.0, np.float32)
    keys = (
        mins.reshape(tokens, groups, 1).astype(np.float64)
        + scales.reshape(tokens, groups, 1) * codes[order].reshape(tokens, groups, group)
    ).reshape(tokens, dim)
    expected = q[r0 : r0 + rows].astype(np.float64) @ keys.T
    _token_scores(
        rows, _packed(codes, bits), token_at, bits, q, sums, scales, mins, groups, group // 32,
        scores, r0, tokens,
    )  # fmt: skip
    np.testing.assert_allclose(scores[r0 : r0 + rows, :tokens], expected, rtol=1e-5, atol=1e-4)
    untouched = np.ones(scores.shape, bool)
    untouched[r0 : r0 + rows, :tokens] = False
    assert (scores[untouched] == -9.0).all(), "wrote outside the tile"


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("fits", FITS)
def test_float_tiles_equal_numpy(rows, fits):
    """scores[r, i0:i0+32] = q[r] @ keys[:, i0:i0+32] (written) and acc[r, c0:c0+64] +=
    w[r, :width] @ values[:width, c0:c0+64] (added), each in the tile only."""
    rng = np.random.default_rng(rows * 7 + fits)
    dim, r0, i0, width, c0 = 64, 1, 32, 23, 64
    keys = rng.standard_normal((dim, 96)).astype(np.float32)
    q = rng.standard_normal((r0 + rows + 1, dim)).astype(np.float32)
    scores = np.full((r0 + rows + 1, 96), -9.0, np.float32)
    weights = rng.random((r0 + rows + 1, 40)).astype(np.float32)
    values = rng.standard_normal((40, 160)).astype(np.float32)
    acc = rng.standard_normal((r0 + rows + 1, 160)).astype(np.float32)
    before = acc.copy()
    _float_caller(fits, rows)(keys, q, scores, weights, values, acc, r0, i0, width, c0)
    rows_ = slice(r0, r0 + rows)
    expected = q[rows_].astype(np.float64) @ keys[:, i0 : i0 + 32]
    np.testing.assert_allclose(scores[rows_, i0 : i0 + 32], expected, rtol=1e-5, atol=1e-4)
    untouched = np.ones(scores.shape, bool)
    untouched[rows_, i0 : i0 + 32] = False
    assert (scores[untouched] == -9.0).all(), "scores_tile wrote outside the tile"
    added = weights[rows_, :width].astype(np.float64) @ values[:width, c0 : c0 + 64]
    np.testing.assert_allclose(
        acc[rows_, c0 : c0 + 64], before[rows_, c0 : c0 + 64] + added, rtol=1e-5, atol=1e-4
    )
    untouched = np.ones(acc.shape, bool)
    untouched[rows_, c0 : c0 + 64] = False
    assert (acc[untouched] == before[untouched]).all(), "values_tile wrote outside the tile"


def test_the_register_file_follows_numbas_target(monkeypatch):
    """AVX-512 (32 registers of 16 floats) only when the CPU Numba compiles for has it:
    NUMBA_CPU_FEATURES when set, a named CPU without features counts as narrow."""
    from numba.core import config

    from kvq.kernels import _tiles

    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+avx512f,+fma")
    assert _tiles._wide_registers()
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,-avx512f,+fma")
    assert not _tiles._wide_registers()
    monkeypatch.setattr(config, "CPU_FEATURES", None)
    monkeypatch.setattr(config, "CPU_NAME", "generic")
    assert not _tiles._wide_registers()
    assert _pass_vectors(4, 16) == 4 and _pass_vectors(4, 4) == 1
    assert _pass_vectors(3, 4) == 1 and _pass_vectors(2, 4) == 2 and _pass_vectors(1, 4) == 4
