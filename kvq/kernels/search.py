"""Per-group range search: choose each group's (min, scale) to minimise squared error.

Plain min/max puts the extreme values exactly on the grid; with few levels, clipping a little
of the range and fitting the grid to the bulk of the values lowers the total squared error
(as llama.cpp's k-quants and HQQ do). Per group this kernel tries min/max, then refines by
least squares (given codes, the best affine map is a linear regression), over a few range
shrink factors, and keeps whichever candidate has the lowest squared error, min/max included,
so the search never makes a group worse.
"""

import numpy as np
from numba import njit, prange

from kvq._format import MIN_OFFSET, SUB_LEVELS
from kvq.kernels._floatbits import float16_round_down, float16_round_up

_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
_REFINE_STEPS = 2

# the sums of squared errors and the least-squares sums may be reordered: LLVM then runs
# them as vector code (a group's sums differ from the sequential ones by float64 rounding)
_SUMS = {"reassoc"}


@njit(inline="always")
def _round_params(scale, lowest, half):
    """Scale and min as they will be stored (float16-representable with half)."""
    if half:
        return float16_round_up(scale), float16_round_down(lowest)
    return np.float32(scale), np.float32(lowest)


@njit(inline="always")
def _squared_error(block, count, scale, lowest, levels):
    inverse = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
    total = 0.0
    for i in range(count):
        level = min(max(np.rint((block[i] - lowest) * inverse), np.float32(0.0)), levels)
        error = block[i] - (lowest + scale * level)
        total += error * error
    return total


@njit(inline="always")
def _least_squares(block, count, scale, lowest, levels):
    """Affine fit (scale, min) of the block to its codes under the given grid."""
    inverse = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
    sum_q = 0.0
    sum_qq = 0.0
    sum_x = 0.0
    sum_qx = 0.0
    for i in range(count):
        q = float(min(max(np.rint((block[i] - lowest) * inverse), np.float32(0.0)), levels))
        x = float(block[i])
        sum_q += q
        sum_qq += q * q
        sum_x += x
        sum_qx += q * x
    denominator = count * sum_qq - sum_q * sum_q
    if denominator <= 0:
        return scale, lowest
    fitted_scale = (count * sum_qx - sum_q * sum_x) / denominator
    if fitted_scale <= 0:
        return scale, lowest
    return np.float32(fitted_scale), np.float32((sum_x - fitted_scale * sum_q) / count)


@njit(parallel=True, cache=True, fastmath=_SUMS)
def search_blocks(x, block_size, row_blocks, last_count, levels, half, lows, highs, scales, mins):
    """scales, mins <- the lowest-squared-error candidates per block (see module doc).

    x: float32[n_blocks * block_size], rows of ``row_blocks`` blocks whose last block holds
    only ``last_count`` real values (the rest is padding, left out of every error); lows,
    highs: the blocks' float32 extremes; out: scales, mins float32[n_blocks]
    (float16-representable with ``half``).
    """
    for b in prange(scales.shape[0]):
        count = last_count if (b + 1) % row_blocks == 0 else block_size
        block = x[b * block_size : b * block_size + count]
        lowest, highest = lows[b], highs[b]
        if half:
            lowest = float16_round_down(lowest)
            best_scale = float16_round_up((highest - lowest) / levels)
        else:
            best_scale = (highest - lowest) / levels
        best_min = lowest
        if best_scale == 0:
            scales[b], mins[b] = best_scale, best_min
            continue
        best_error = _squared_error(block, count, best_scale, best_min, levels)
        centre = 0.5 * (lows[b] + highs[b])
        span = highs[b] - lows[b]
        for shrink in _SHRINKS:
            scale = np.float32(span * shrink / levels)
            lowest = np.float32(centre - 0.5 * span * shrink)
            for _ in range(_REFINE_STEPS + 1):
                scale, lowest = _round_params(scale, lowest, half)
                if scale <= 0:
                    break
                error = _squared_error(block, count, scale, lowest, levels)
                if error < best_error:
                    best_error, best_scale, best_min = error, scale, lowest
                scale, lowest = _least_squares(block, count, scale, lowest, levels)
        scales[b], mins[b] = best_scale, best_min


@njit(parallel=True, cache=True, fastmath=_SUMS)
def refine_subcodes(
    x, block_size, row_blocks, last_count, levels, step_scale, step_min, scale_codes, min_codes
):
    """Second-level codes that minimise each block's squared error.

    A block's scale is ``step_scale[b] * scale_codes[b]`` and its min
    ``step_min[b] * (min_codes[b] - 32)``; nearest rounding of a searched (scale, min) can
    shrink the grid and clip, so each block tries its codes +-1 (scale 1..63, min 0..63) and
    keeps the best. x: float32[n_blocks * block_size] in rows of ``row_blocks`` blocks, the
    last holding ``last_count`` real values; codes: int64[n_blocks], updated.
    """
    for b in prange(scale_codes.shape[0]):
        count = last_count if (b + 1) % row_blocks == 0 else block_size
        block = x[b * block_size : b * block_size + count]
        best_sc, best_mc = scale_codes[b], min_codes[b]
        best_sc_new, best_mc_new = best_sc, best_mc
        best_error = np.inf
        for sc in range(max(best_sc - 1, 0), min(best_sc + 1, SUB_LEVELS) + 1):
            for mc in range(max(best_mc - 1, 0), min(best_mc + 1, SUB_LEVELS) + 1):
                scale = np.float32(step_scale[b] * sc)
                lowest = np.float32(step_min[b] * (mc - MIN_OFFSET))
                error = _squared_error(block, count, scale, lowest, levels)
                if error < best_error:
                    best_error, best_sc_new, best_mc_new = error, sc, mc
        scale_codes[b], min_codes[b] = best_sc_new, best_mc_new
