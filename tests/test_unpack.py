"""The vector unpack-and-scale intrinsics attention decodes codes with, against NumPy."""

import numpy as np
import pytest
from numba import njit

from kvq.kernels import pack_codes
from kvq.kernels._unpack import (
    CHANNEL_WIDTHS,
    RUN,
    WIDTHS,
    code_at,
    code_at_bit,
    unpack_affine_8,
    unpack_affine_32,
    unpack_affine_bytes_32,
)


@njit
def _unpack(row, index, bits, scale, lowest, out, at):
    unpack_affine_32(row, index, bits, scale, lowest, out, at)


@pytest.mark.parametrize("bits", WIDTHS)
def test_every_run_of_a_stream_decodes_to_numpy(bits):
    """unpack_affine_32 (the width a run-time argument, switched on inside the IR, as attention
    calls it) decodes every run of a stream to NumPy's values, for each width."""
    runs = 7
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, RUN * runs).astype(np.uint8)
    codes[:RUN] = 2**bits - 1  # the top code in every lane of the first run
    packed = np.zeros(RUN * runs * bits // 8, np.uint8)
    pack_codes(codes, bits, packed)
    scale, lowest = np.float32(0.37), np.float32(-2.5)
    for run in range(runs):
        out = np.full(RUN + 9, -7.0, np.float32)
        _unpack(packed, run * RUN, bits, scale, lowest, out, 5)
        expected = codes[run * RUN : (run + 1) * RUN].astype(np.float64) * scale + lowest
        # one fused multiply-add per lane: within half an ulp of the exact value
        np.testing.assert_allclose(out[5 : 5 + RUN], expected, rtol=2**-24, atol=0)
        assert (out[:5] == -7.0).all() and (out[5 + RUN :] == -7.0).all(), "wrote outside"


@njit
def _unpack_8(row, index, bits, scale, lowest, out, at):
    unpack_affine_8(row, index, bits, scale, lowest, out, at)


@pytest.mark.parametrize("bits", WIDTHS)
def test_every_run_of_8_decodes_to_numpy(bits):
    """unpack_affine_8 (a super-group of second-level codes at a time) decodes every run of
    8 codes of a stream to NumPy's values and writes nothing else."""
    rng = np.random.default_rng(bits + 1)
    codes = rng.integers(0, 2**bits, 8 * 5).astype(np.uint8)
    codes[:8] = 2**bits - 1
    packed = np.zeros(codes.size * bits // 8, np.uint8)
    pack_codes(codes, bits, packed)
    scale, lowest = np.float32(0.37), np.float32(-2.5)
    for run in range(5):
        out = np.full(8 + 6, -7.0, np.float32)
        _unpack_8(packed, run * 8, bits, scale, lowest, out, 3)
        expected = codes[run * 8 : (run + 1) * 8].astype(np.float64) * scale + lowest
        np.testing.assert_allclose(out[3:11], expected, rtol=2**-24, atol=0)
        assert (out[:3] == -7.0).all() and (out[11:] == -7.0).all(), "wrote outside"


def test_last_run_of_a_row_decodes_from_a_view_ending_there():
    """The 4-bit run ending the row decodes right from a view that ends exactly there (its
    load is the run's 16 bytes: the LLVM vector type fixes the width)."""
    codes = np.arange(64, dtype=np.uint8) % 16
    packed = np.zeros(32, np.uint8)
    pack_codes(codes, 4, packed)
    out = np.empty(RUN, np.float32)
    _unpack(packed[16:], 0, 4, np.float32(1), np.float32(0), out, 0)
    np.testing.assert_array_equal(out, codes[32:])


def test_code_at_reads_the_last_code_of_a_row_without_reading_past_it():
    """code_at (branch-free: it always reads the next byte, clamped to the row) returns every
    code of a row whose last code ends in its last byte, from a view that ends there."""
    for bits in (2, 3, 4, 6, 8):
        codes = (np.arange(40) % 2**bits).astype(np.uint8)
        packed = np.zeros(40 * bits // 8, np.uint8)
        pack_codes(codes, bits, packed)
        got = [int(_code_at(packed, i, bits)) for i in range(40)]
        assert got == codes.tolist(), bits


@njit
def _code_at(row, index, bits):
    return code_at(row, index, bits)


@njit
def _unpack_bytes(row, byte, bits, scale, lowest, out, at):
    unpack_affine_bytes_32(row, byte, bits, scale, lowest, out, at)


@njit
def _code_at_bit(row, bit, bits):
    return code_at_bit(row, bit, bits)


@pytest.mark.parametrize("bits", CHANNEL_WIDTHS)
def test_channels_of_mixed_widths_decode_to_numpy(bits):
    """unpack_affine_bytes_32 reads a channel's 32 codes from the byte its run starts on (the
    runs before it of other widths), for every width a channel takes; code_at_bit reads each
    code alone from its bit; nothing else is written."""
    rng = np.random.default_rng(bits + 3)
    before = rng.integers(0, 256, 7).astype(np.uint8)  # 7 bytes of other channels' runs
    codes = rng.integers(0, 2**bits, RUN).astype(np.uint8)
    codes[:3] = 2**bits - 1
    packed = np.zeros(RUN * bits // 8, np.uint8)
    pack_codes(codes, bits, packed)
    row = np.concatenate([before, packed, before]).astype(np.uint8)
    out = np.full(RUN + 4, -7.0, np.float32)
    scale, lowest = np.float32(0.37), np.float32(-2.5)
    _unpack_bytes(row, 7, bits, scale, lowest, out, 2)
    expected = codes.astype(np.float64) * scale + lowest
    np.testing.assert_allclose(out[2 : 2 + RUN], expected, rtol=2**-24, atol=0)
    assert (out[:2] == -7.0).all() and (out[2 + RUN :] == -7.0).all(), "wrote outside"
    got = [int(_code_at_bit(row, 56 + i * bits, bits)) for i in range(RUN)]
    assert got == codes.tolist()
