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
