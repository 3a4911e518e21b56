"""Plain-NumPy references for kvq's kernels: slow, obviously correct, same float32 arithmetic.

Each reference performs the kernel's operations in the same order on float32 values, so codes
must match exactly and dequantized values bit for bit.
"""

import numpy as np

LEVELS = np.float32(255.0)
SMALLEST_INVERTIBLE_SCALE = np.float32(2.0**-124)


def float16_round_down(v: np.ndarray) -> np.ndarray:
    """Largest float16-representable float32 <= v, by NumPy's float16 and nextafter."""
    h = np.asarray(v, np.float32).astype(np.float16)
    above = h.astype(np.float32) > v
    h[above] = np.nextafter(h[above], np.float16(-np.inf))
    return h.astype(np.float32)


def float16_round_up(v: np.ndarray) -> np.ndarray:
    """Smallest float16-representable float32 >= v."""
    h = np.asarray(v, np.float32).astype(np.float16)
    below = h.astype(np.float32) < v
    h[below] = np.nextafter(h[below], np.float16(np.inf))
    return h.astype(np.float32)


def quantize_blocks(x, block_size: int, scale_dtype="float32", levels=LEVELS):
    """-> codes uint8[n], scales float32[n_blocks], mins float32[n_blocks], block by block."""
    levels = np.float32(levels)
    flat = np.asarray(x, np.float32).reshape(-1)
    n_blocks = -(-flat.size // block_size)
    codes = np.zeros(flat.size, np.uint8)
    scales = np.zeros(n_blocks, np.float32)
    mins = np.zeros(n_blocks, np.float32)
    for b in range(n_blocks):
        block = flat[b * block_size : (b + 1) * block_size]
        lowest, highest = block.min(), block.max()
        if np.dtype(scale_dtype) == np.float16:
            lowest = float16_round_down(np.array([lowest]))[0]
            scale = float16_round_up(np.array([(highest - lowest) / levels]))[0]
        else:
            scale = (highest - lowest) / levels
        assert scale.dtype == np.float32
        if scale == 0:
            levels_of_block = np.zeros(block.size, np.float32)
        elif scale >= SMALLEST_INVERTIBLE_SCALE:
            levels_of_block = np.rint((block - lowest) * (np.float32(1.0) / scale))
        else:
            levels_of_block = np.rint((block - lowest) / scale)
        codes[b * block_size : (b + 1) * block_size] = np.minimum(levels_of_block, levels).astype(
            np.uint8
        )
        scales[b], mins[b] = scale, lowest
    return codes, scales, mins


def dequantize_blocks(codes, scales, mins, block_size: int) -> np.ndarray:
    """float32[n]: mins[b] + scales[b] * codes, element by element."""
    block_of = np.arange(codes.size) // block_size
    scales = np.asarray(scales, np.float32)[block_of]
    mins = np.asarray(mins, np.float32)[block_of]
    return mins + scales * codes.astype(np.float32)


def error_bound(x, scales, block_size: int) -> np.ndarray:
    """Per-element bound on |x - x_hat|: scale / 2 plus float32 rounding.

    Rounding: 1e-6 of the block's largest magnitude (the kernel's few float32 operations), and
    an absolute 2**-140 for blocks of subnormal numbers, where float32 spacing is absolute.
    """
    flat = np.asarray(x, np.float32).reshape(-1)
    starts = np.arange(0, flat.size, block_size)
    largest = np.maximum.reduceat(np.abs(flat), starts)
    block_of = np.arange(flat.size) // block_size
    scales = np.asarray(scales, np.float32).astype(np.float64)
    return scales[block_of] / 2 + 1e-6 * largest[block_of].astype(np.float64) + 2.0**-140


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Little-endian bit stream of ``codes``, one Python int at a time (slow, obvious)."""
    stream = 0
    for i, code in enumerate(codes.tolist()):
        stream |= int(code) << (bits * i)
    n_bytes = -(-codes.size * bits // 8)
    return np.frombuffer(stream.to_bytes(n_bytes, "little"), np.uint8).copy()


def quantize_groups(x, bits: int, group_size: int, axis: int, scale_dtype="float32"):
    """Reference for kvq.quantize (min/max, no rotation): packed codes, scales, mins.

    Groups run along ``axis`` (moved last); a row's short last group is its own group.
    """
    moved = np.moveaxis(np.asarray(x, np.float32), axis, -1)
    length = moved.shape[-1]
    rows = moved.reshape(-1, length)
    levels = np.float32(2**bits - 1)
    all_codes, all_scales, all_mins = [], [], []
    for row in rows:
        codes, scales, mins = quantize_blocks(row, group_size, scale_dtype, levels)
        all_codes.append(codes)
        all_scales.append(scales)
        all_mins.append(mins)
    codes = np.concatenate(all_codes) if all_codes else np.zeros(0, np.uint8)
    scales = np.concatenate(all_scales) if all_scales else np.zeros(0, np.float32)
    mins = np.concatenate(all_mins) if all_mins else np.zeros(0, np.float32)
    return pack_bits(codes, bits) if bits < 8 else codes, scales, mins


def quantize_channels(x, channel_bits, group_size: int, scale_dtype="float32"):
    """Reference for kvq.quantize with ``Scheme.channel_bits`` (min/max, groups along axis
    -2): row r of x with axis -2 moved last has width ``channel_bits`` (broadcast over the
    leading axes) and its codes packed on bytes of its own. Returns (packed codes, scales,
    mins, widths per row)."""
    moved = np.moveaxis(np.asarray(x, np.float32), -2, -1)
    length = moved.shape[-1]
    rows = moved.reshape(-1, length)
    widths = np.broadcast_to(np.asarray(channel_bits), moved.shape[:-1]).reshape(-1)
    packed, all_scales, all_mins = [], [], []
    for row, width in zip(rows, widths, strict=True):
        levels = np.float32(2 ** int(width) - 1)
        codes, scales, mins = quantize_blocks(row, group_size, scale_dtype, levels)
        packed.append(pack_bits(codes, int(width)))
        all_scales.append(scales)
        all_mins.append(mins)
    return np.concatenate(packed), np.concatenate(all_scales), np.concatenate(all_mins), widths


# --- range search (kvq/kernels/search.py) -------------------------------------------------------

#: The range shrink factors kvq's search is documented to try around each group's centre.
SEARCH_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
#: A denser grid of shrinks and centre offsets (fractions of the span) for the brute force.
DENSE_SHRINKS = tuple(np.linspace(0.3, 1.0, 36))
DENSE_SHIFTS = tuple(np.linspace(-0.3, 0.3, 13))


def grid_sse(values: np.ndarray, scale: float, lowest: float, levels: float) -> float:
    """Squared error (float64) of ``values`` on the grid ``lowest + scale * [0, levels]``:
    each value takes its nearest code, clipped to the grid's ends."""
    v = np.asarray(values, np.float64)
    if scale > 0:
        q = np.clip(np.rint((v - lowest) / scale), 0, levels)
    else:
        q = np.zeros_like(v)
    return float(((v - (lowest + scale * q)) ** 2).sum())


def _stored(scale: float, lowest: float, half: bool) -> tuple[float, float]:
    """(scale, min) as stored: float16 with ``half`` (scale rounded up, min down)."""
    if half:
        s = float(float16_round_up(np.array([scale], np.float32))[0])
        m = float(float16_round_down(np.array([lowest], np.float32))[0])
        return s, m
    return float(np.float32(scale)), float(np.float32(lowest))


def _affine_fit(values: np.ndarray, scale: float, lowest: float, levels: float):
    """Least-squares (scale, min) of ``values`` given their codes on the current grid, or
    None when the fit is degenerate (all codes equal, or a non-positive slope)."""
    v = np.asarray(values, np.float64)
    q = np.clip(np.rint((v - lowest) / scale), 0, levels)
    if np.ptp(q) == 0:
        return None
    slope, intercept = np.polyfit(q, v, 1)
    return (float(slope), float(intercept)) if slope > 0 else None


def search_group(
    values: np.ndarray,
    levels: float,
    half: bool = False,
    shrinks=SEARCH_SHRINKS,
    shifts=(0.0,),
    refine_steps: int = 2,
) -> float:
    """Brute-force least-squares range fit of one group: the lowest squared error over
    min/max and, for every shrink and centre shift, the range ``shrink * span`` around
    ``centre + shift * span`` refined ``refine_steps`` times by an affine least-squares fit
    of the values to their codes. Every candidate is rounded as it would be stored.

    values: the group's real values (no padding); returns the best squared error (float64).
    """
    v = np.asarray(values, np.float32)
    lo, hi = float(v.min()), float(v.max())
    if half:
        low = float(float16_round_down(np.array([lo], np.float32))[0])
        best = grid_sse(v, *_stored((hi - low) / levels, low, True), levels)
    else:
        best = grid_sse(v, (hi - lo) / levels, lo, levels)
    span, centre = hi - lo, 0.5 * (lo + hi)
    if span == 0:
        return best
    for shrink in shrinks:
        for shift in shifts:
            scale = span * shrink / levels
            lowest = centre + shift * span - 0.5 * span * shrink
            for _ in range(refine_steps + 1):
                scale, lowest = _stored(scale, lowest, half)
                if scale <= 0:
                    break
                best = min(best, grid_sse(v, scale, lowest, levels))
                fit = _affine_fit(v, scale, lowest, levels)
                if fit is None:
                    break
                scale, lowest = fit
    return best


def row_groups(x: np.ndarray, group_size: int) -> list[np.ndarray]:
    """The real values of each group of a 2-D (rows, length) array, row by row (a row's
    short last group is its own, shorter group)."""
    return [
        row[start : start + group_size]
        for row in np.asarray(x, np.float32)
        for start in range(0, row.size, group_size)
    ]


# --- second-level scales (double_quant, kvq/tensor.py) -------------------------------------------

#: Groups per float16 super-group step, and the 6-bit code range of scale and min codes.
DQ_SUPER_GROUPS = 8
DQ_SCALE_CODE_MAX = 63
DQ_MIN_CODE_OFFSET = 32


def double_quant_params(x: np.ndarray, group_size: int, levels: float):
    """Second-level quantized scales and mins of a 2-D (rows, length) array's min/max
    groups, written out from the format's definition, one super-group at a time.

    Per group g: min m_g, scale s_g = (max - min) / levels and top t_g = m_g + levels * s_g
    (float32, so t_g is the max to rounding). Per super-group
    of 8 groups: ``dmin`` = max |m_g| / 32 rounded up to float16; min code
    ``mc_g = clip(floor(m_g / dmin), -32, 31)``; the scale the group needs so that its grid
    still reaches its max, ``n_g = (t_g - dmin * mc_g) / levels``; ``d`` = max n_g / 63
    rounded up to float16 (the smallest positive float16 when n_g > 0 and the quotient
    underflows); scale code ``sc_g = clip(ceil(n_g / d), 0, 63)``.

    ``levels``: one number, or one per group (groups of per-channel widths).

    Returns (sc int64[groups], mc + 32 int64[groups], d float32[supers], dmin float32[supers]).
    """
    groups = row_groups(x, group_size)
    every = np.broadcast_to(np.asarray(levels, np.float32), (len(groups),))
    lows = np.array([g.min() for g in groups], np.float32)
    highs = np.array([g.max() for g in groups], np.float32)
    sc = np.zeros(lows.size, np.int64)
    mc = np.zeros(lows.size, np.int64)
    n_super = -(-lows.size // DQ_SUPER_GROUPS)
    d_all = np.zeros(n_super, np.float32)
    dmin_all = np.zeros(n_super, np.float32)
    for s in range(n_super):
        part = slice(s * DQ_SUPER_GROUPS, (s + 1) * DQ_SUPER_GROUPS)
        m = lows[part]
        grid = every[part]
        # the top of the group's first-level grid, min + levels * scale, in float32
        top = m + grid * ((highs[part] - m) / grid)
        dmin = float16_round_up(np.array([np.abs(m).max() / DQ_MIN_CODE_OFFSET], np.float32))[0]
        codes_m = np.floor(m / dmin) if dmin > 0 else np.zeros(m.size)
        codes_m = np.clip(codes_m, -DQ_MIN_CODE_OFFSET, DQ_MIN_CODE_OFFSET - 1)
        needed = (top - dmin * codes_m.astype(np.float32)) / grid
        d = float16_round_up(np.array([needed.max() / DQ_SCALE_CODE_MAX], np.float32))[0]
        if d == 0 and needed.max() > 0:  # the quotient underflowed float32: round it up
            d = np.float32(np.finfo(np.float16).smallest_subnormal)
        codes_s = np.ceil(needed / d) if d > 0 else np.zeros(m.size)
        sc[part] = np.clip(codes_s, 0, DQ_SCALE_CODE_MAX)
        mc[part] = codes_m.astype(np.int64) + DQ_MIN_CODE_OFFSET
        d_all[s], dmin_all[s] = d, dmin
    return sc, mc, d_all, dmin_all


def double_quant_error_bound(x: np.ndarray, group_size: int, levels: float) -> np.ndarray:
    """Per-group bound on |x - x_hat| for min/max double_quant, from the INPUT alone.

    The stored min lies at most ``dmin`` below the group's min (floor), and the stored scale
    at most ``d`` above the needed scale (ceil), so the stored scale is at most
    ``(max - min + dmin) / levels + d`` and every value is within half of that, plus float32
    rounding (1e-6 of the group's largest magnitude and grid end). d and dmin are the super-group
    steps computed here from the input's groups (float64 of the format's definition).
    """
    groups = row_groups(x, group_size)
    levels = np.broadcast_to(np.asarray(levels, np.float64), (len(groups),))  # or per group
    lows = np.array([g.min() for g in groups], np.float64)
    highs = np.array([g.max() for g in groups], np.float64)
    owner = np.arange(lows.size) // DQ_SUPER_GROUPS
    dmin = (
        np.array([np.abs(lows[owner == s]).max() for s in range(owner.max() + 1)])
        / DQ_MIN_CODE_OFFSET
    )
    dmin = dmin * (1 + 2.0**-10)  # float16 rounding up: at most one ulp (2**-10 relative)
    needed = (highs - lows + dmin[owner]) / levels
    d = np.array([needed[owner == s].max() for s in range(owner.max() + 1)]) / DQ_SCALE_CODE_MAX
    d = d * (1 + 2.0**-10)
    largest = np.maximum(np.abs(lows), np.abs(highs)) + dmin[owner] + levels * d[owner]
    # (levels: per group, as ``needed`` above)
    return (needed + d[owner]) / 2 + 1e-6 * largest


# --- the windowed KVCache ring (kvq/kvcache.py) ------------------------------------------------


def held_positions(appends, chunk: int, residual: int, window: int | None) -> np.ndarray:
    """Absolute positions a KVCache stream holds after ``appends`` (token counts), token by
    token: a token waits in the float32 residual; whenever ``residual + chunk`` tokens wait,
    the oldest ``chunk`` of them become a quantized chunk; with a window, a quantized chunk is
    dropped once every one of its tokens is older than the last ``window`` tokens."""
    chunks: list[list[int]] = []  # quantized chunks, oldest first, as their positions
    waiting: list[int] = []
    appended = 0
    for count in appends:
        for _ in range(count):
            waiting.append(appended)
            appended += 1
            if len(waiting) >= residual + chunk:
                chunks.append(waiting[:chunk])
                waiting = waiting[chunk:]
        if window is not None:
            while chunks and max(chunks[0]) < appended - window:
                chunks.pop(0)
    held = [p for c in chunks for p in c] + waiting
    return np.array(held, np.int64)


def sink_stand_in(x: np.ndarray, sinks: int, chunk: int) -> np.ndarray:
    """(heads, tokens, dim) ``x`` as a cache with ``sinks`` sink tokens quantizes it: each
    sink position holds the first non-sink token of its ``chunk``-token chunk, or zeros
    when the whole chunk is sinks (or no later token exists)."""
    out = x.copy()
    for position in range(min(sinks, x.shape[1])):
        end = (position // chunk + 1) * chunk  # the chunk's end
        out[:, position] = x[:, sinks] if sinks < min(end, x.shape[1]) else 0.0
    return out


def rope_reference(x: np.ndarray, first: int, inverse_frequencies, inverse: bool = False):
    """float64 (heads, t, d): RoPE's "rotate half" on x (heads, t, d) at positions first ..
    first + t - 1, as complex numbers: channel j + i * channel j + d/2 times
    exp(+-i * position * inverse_frequencies[j])."""
    half = x.shape[-1] // 2
    z = x[..., :half].astype(np.float64) + 1j * x[..., half:].astype(np.float64)
    positions = np.arange(first, first + x.shape[1], dtype=np.float64)
    angles = positions[:, None] * np.asarray(inverse_frequencies, np.float64)[None, :]
    z = z * np.exp((-1j if inverse else 1j) * angles)[None]
    return np.concatenate([z.real, z.imag], axis=-1)
