"""double_quant's second level: per super-group float16 steps, per group 6-bit codes.

One compiled pass over the groups in place of about a hundred small NumPy calls, which
dominated the append of a decode token (a per-token value chunk of 1-8 tokens quantizes a
few dozen groups at a time). Every operation is float32 in the order of the definition in
``tests/reference.py``, so the codes and steps are bit for bit NumPy's.
"""

import numpy as np
from numba import njit

from kvq._format import MIN_OFFSET, SUB_LEVELS, SUPER_GROUPS
from kvq.kernels._floatbits import float16_round_up

_FLOAT16_MAX = np.float32(65504.0)
_FLOAT16_TINY = np.float32(2.0**-24)  # the smallest positive float16
_INF = np.float32(np.inf)


@njit(inline="always")
def _step_up(value):
    """Smallest float16-representable float32 >= value (inf beyond float16's range)."""
    if value > _FLOAT16_MAX:
        return _INF
    return float16_round_up(value)


@njit(cache=True)
def second_level_codes(scales, mins, levels, needed, d, dmin, sc, mc):
    """Second-level quantization of per-group ``scales`` and ``mins`` (float32 (n,)) whose
    grids have ``levels`` (float32 (n,), or (1,) for every group): per super-group of
    SUPER_GROUPS groups, ``dmin`` = max |min| / MIN_OFFSET and ``d`` = max needed scale /
    SUB_LEVELS, both rounded up to float16 (a positive quotient that underflows float32 takes
    the smallest float16); per group, the min code floor(min / dmin), clipped, and the scale
    code ceil(needed / d), clipped, where needed = (top - dmin * min code) / levels keeps the
    grid's top. Writes needed float32 (n,), d, dmin float32 (supers,) and sc, mc int64 (n,)
    (mc offset by MIN_OFFSET). Returns 1 when a step is not finite (nothing else then holds),
    else 0."""
    n = scales.shape[0]
    n_super = (n + SUPER_GROUPS - 1) // SUPER_GROUPS
    every = levels.shape[0] == 1
    offset = np.float32(MIN_OFFSET)
    top_code = np.float32(MIN_OFFSET - 1)
    sub = np.float32(SUB_LEVELS)
    zero = np.float32(0.0)
    for s in range(n_super):
        first = s * SUPER_GROUPS
        last = min(n, first + SUPER_GROUPS)
        widest_min = zero
        for g in range(first, last):
            widest_min = max(widest_min, abs(mins[g]))
        step_min = _step_up(widest_min / offset)
        # a partial last super-group counts its missing groups as 0 (NumPy pads with zeros)
        widest = zero if last - first < SUPER_GROUPS else -_INF
        for g in range(first, last):
            grid = levels[0] if every else levels[g]
            top = mins[g] + grid * scales[g]
            code = zero
            if step_min > 0:
                code = np.float32(np.floor(mins[g] / step_min))
            code = min(max(code, -offset), top_code)
            mc[g] = np.int64(code) + MIN_OFFSET
            needed[g] = (top - step_min * code) / grid
            widest = max(widest, needed[g])
        step = _step_up(widest / sub)
        if step == 0 and widest > 0:
            step = _FLOAT16_TINY
        if not (np.isfinite(step) and np.isfinite(step_min)):
            return 1
        d[s] = step
        dmin[s] = step_min
        for g in range(first, last):
            code = zero
            if step > 0:
                code = np.float32(np.ceil(needed[g] / step))
            sc[g] = np.int64(min(max(code, zero), sub))
    return 0
