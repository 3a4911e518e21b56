"""Fused attention over a quantized KV cache: scores and values straight from the codes.

Work is split across threads by token range (flash-decoding): each task walks its blocks of
tokens and, within a block, every KV head in turn, so the codes (a chunk's slot row holds
all heads) stream through the caches once, whole lines and pages at a time. Per block and
head it unpacks the codes into small float32 scratch arrays in L1 (32 codes at a time as one
vector operation: ``_unpack.py``), computes scores for every query row of that head (the 8
query heads of a GPT-OSS KV head share the scratch), updates an online softmax (running
max, sum and weighted value sum) and moves on. No dequantized copy of the cache is built;
the scratch holds one block of one head. Per-token keys, per-channel values and ragged
tails go through a slower token-at-a-time decoder, compiled once and not inlined.

Not done, by arithmetic rather than measurement: folding the group scales into the query
and the softmax weights instead of dequantizing would save only the multiply-add per element
(the code-to-float conversion stays), and with 8 query rows sharing each decoded block that
is about 1/9 of the block's arithmetic. Unpacking as vectors and streaming the codes in
order took single-thread time at 32K from 19 to 12-13 ms.

Stream layout (``layout`` int64[12]): bits, per_channel, group, chunk, first_chunk, chunks,
slots, double_quant, half, n_residual, heads, head_dim. Param arrays: plain params are
``p0`` scales and ``p1`` mins (float32, or float16 bits as uint16 with ``half``); with
double_quant ``p0``/``p1`` are packed 6-bit scale/min codes and ``p2``/``p3`` float16 bits of
the per-8-group steps.
"""

import numpy as np
from numba import njit, prange

from kvq._format import MIN_OFFSET, SUB_BITS, SUB_LEVELS, SUPER_GROUPS
from kvq.kernels._floatbits import bits_to_float, half_bits_to_float
from kvq.kernels._tiles import scores_tile, values_tile
from kvq.kernels._unpack import (
    RUN,
    unpack_affine_32_2,
    unpack_affine_32_3,
    unpack_affine_32_4,
    unpack_affine_32_6,
    unpack_affine_32_8,
)

_BITS, _PER_CHANNEL, _GROUP, _CHUNK, _FIRST, _CHUNKS, _SLOTS, _DQ, _HALF, _RES, _HEADS, _DIM = (
    range(12)
)
_NEG_INF = np.float32(-np.inf)


_LOG2E = np.float32(1.4426950408889634)
_LN2 = np.float32(0.6931471805599453)


@njit(inline="always", fastmath={"contract"})
def _exp(x):
    """exp(x) for float32 x <= 0 in plain arithmetic (vectorizes; no SVML here): 2**n times a
    degree-6 series on [-ln2/2, ln2/2]; relative error ~2e-7 for x > -20, 0 below -87."""
    if x < np.float32(-87.0):
        return np.float32(0.0)
    t = x * _LOG2E
    n = np.floor(t + np.float32(0.5))
    y = (t - n) * _LN2
    p = y * np.float32(1.0 / 720.0) + np.float32(1.0 / 120.0)
    p = p * y + np.float32(1.0 / 24.0)
    p = p * y + np.float32(1.0 / 6.0)
    p = p * y + np.float32(0.5)
    p = p * y + np.float32(1.0)
    p = p * y + np.float32(1.0)
    return p * bits_to_float(np.int32((np.int32(n) + 127) << 23))


@njit(inline="always")
def _code(row, index, bits):
    """Code ``index`` of a little-endian bit stream ``row`` (uint8)."""
    bit = index * bits
    byte = bit >> 3
    shift = bit & 7
    value = np.int64(row[byte])
    if shift + bits > 8:
        value |= np.int64(row[byte + 1]) << 8
    return (value >> shift) & ((1 << bits) - 1)


@njit(inline="always")
def _unpack_run(row, start, count, bits, out):
    """out[:count] = float32 codes ``start .. start + count`` of bit stream ``row``."""
    if bits == 8:
        run = row[start : start + count]
        for i in range(count):
            out[i] = np.float32(run[i])
    elif bits == 4 and start % 2 == 0 and count % 2 == 0:
        run = row[start // 2 : (start + count) // 2]
        for i in range(count // 2):
            b = np.int32(run[i])
            out[2 * i] = np.float32(b & 15)
            out[2 * i + 1] = np.float32(b >> 4)
    elif bits == 2 and start % 4 == 0 and count % 4 == 0:
        run = row[start // 4 : (start + count) // 4]
        for i in range(count // 4):
            b = np.int32(run[i])
            out[4 * i] = np.float32(b & 3)
            out[4 * i + 1] = np.float32((b >> 2) & 3)
            out[4 * i + 2] = np.float32((b >> 4) & 3)
            out[4 * i + 3] = np.float32(b >> 6)
    elif bits == 6 and start % 4 == 0 and count % 4 == 0:  # second-level codes
        run = row[start // 4 * 3 : (start + count) // 4 * 3]
        for i in range(count // 4):
            word = (
                np.int32(run[3 * i])
                | (np.int32(run[3 * i + 1]) << 8)
                | (np.int32(run[3 * i + 2]) << 16)
            )
            out[4 * i] = np.float32(word & 63)
            out[4 * i + 1] = np.float32((word >> 6) & 63)
            out[4 * i + 2] = np.float32((word >> 12) & 63)
            out[4 * i + 3] = np.float32(word >> 18)
    else:
        for i in range(count):
            out[i] = np.float32(_code(row, start + i, bits))


@njit(inline="always")
def _affine_run(row, index, bits, scale, lowest, out, at):
    """out[at:at + 32] = lowest + scale * codes index .. index + 31 of bit stream ``row``, one
    vector operation; bits in (2, 3, 4, 8) (any other width reads as 3), ``index * bits`` a
    multiple of 8. No scalar fallback here: one stops LLVM optimizing the callers' loops."""
    if bits == 8:
        unpack_affine_32_8(row, index, scale, lowest, out, at)
    elif bits == 4:
        unpack_affine_32_4(row, index, scale, lowest, out, at)
    elif bits == 2:
        unpack_affine_32_2(row, index, scale, lowest, out, at)
    else:
        unpack_affine_32_3(row, index, scale, lowest, out, at)


@njit(inline="always")
def _f16_at(row, index):
    """float32 of the little-endian float16 at element ``index`` of byte row ``row``."""
    return half_bits_to_float(np.int32(row[2 * index]) | (np.int32(row[2 * index + 1]) << 8))


@njit(inline="always")
def _f32_at(row, index):
    """The little-endian float32 at element ``index`` of byte row ``row``."""
    at = 4 * index
    bits = (
        np.int32(row[at])
        | (np.int32(row[at + 1]) << 8)
        | (np.int32(row[at + 2]) << 16)
        | (np.int32(row[at + 3]) << 24)
    )
    return bits_to_float(np.int32(bits))


@njit(inline="always")
def _params(layout, slot, group, p0, p1, p2, p3):
    """(scale, min) float32 of ``group`` in chunk ``slot`` of a stream (params as bytes)."""
    if layout[_DQ]:
        sc = _code(p0[slot], group, SUB_BITS)
        mc = _code(p1[slot], group, SUB_BITS) - MIN_OFFSET
        d = _f16_at(p2[slot], group // SUPER_GROUPS)
        dmin = _f16_at(p3[slot], group // SUPER_GROUPS)
        return np.float32(d * np.float32(sc)), np.float32(dmin * np.float32(mc))
    if layout[_HALF]:
        return _f16_at(p0[slot], group), _f16_at(p1[slot], group)
    return _f32_at(p0[slot], group), _f32_at(p1[slot], group)


@njit(cache=True)  # slow paths only: compiled once, not inlined (halves compile time)
def _decode_token_major(
    layout,
    codes,
    p0,
    p1,
    p2,
    p3,
    residual,
    head,
    position,
    codes_out,
    scales_out,
    mins_out,
    values_out,
    dequantize,
):
    """One token of one head: float32 codes (or values) along head_dim.

    Per-token streams give codes plus per-dim scale/min (``scales_out``/``mins_out`` per
    head_dim element); residual tokens give exact values. Returns 0 for codes, 1 for values.
    """
    chunk = layout[_CHUNK]
    dim = layout[_DIM]
    index = position // chunk
    if index >= layout[_CHUNKS]:
        offset = position - layout[_CHUNKS] * chunk
        for d in range(dim):
            values_out[d] = residual[head, offset, d]
        return 1
    slot = index % layout[_SLOTS]
    inner = position - index * chunk
    bits = layout[_BITS]
    group = min(layout[_GROUP], dim)
    if not layout[_PER_CHANNEL]:
        groups_per_token = (dim + group - 1) // group
        _unpack_run(codes[slot], (head * chunk + inner) * dim, dim, bits, codes_out)
        base = (head * chunk + inner) * groups_per_token
        for g in range(groups_per_token):
            s, m = _params(layout, slot, base + g, p0, p1, p2, p3)
            lo = g * group
            hi = min(dim, lo + group)
            if dequantize:  # straight to values: no per-element scale arrays
                for d in range(lo, hi):
                    values_out[d] = m + s * codes_out[d]
            else:
                for d in range(lo, hi):
                    scales_out[d] = s
                    mins_out[d] = m
        return 1 if dequantize else 0
    else:
        token_group = min(layout[_GROUP], chunk)
        groups_per_channel = chunk // token_group
        for d in range(dim):
            run = (head * dim + d) * chunk
            codes_out[d] = np.float32(_code(codes[slot], run + inner, bits))
            s, m = _params(
                layout,
                slot,
                (head * dim + d) * groups_per_channel + inner // token_group,
                p0,
                p1,
                p2,
                p3,
            )
            scales_out[d] = s
            mins_out[d] = m
    if dequantize:
        for d in range(dim):
            values_out[d] = mins_out[d] + scales_out[d] * codes_out[d]
        return 1
    return 0


@njit(inline="always")
def _dequantize_chunk_keys(
    layout, codes, p0, p1, p2, p3, head, index, offset, keys, scratch, channel_scales, channel_mins
):
    """keys[d, offset:offset + chunk] = dequantized per-channel chunk ``index`` of ``head``."""
    chunk = layout[_CHUNK]
    dim = layout[_DIM]
    slot = index % layout[_SLOTS]
    token_group = min(layout[_GROUP], chunk)
    per_channel = chunk // token_group
    code_row = codes[slot]
    bits = layout[_BITS]
    if layout[_DQ] and per_channel == 1 and dim % SUPER_GROUPS == 0:
        # all of the head's channel params at once: 6-bit codes unpacked as runs
        base = head * dim
        if dim % RUN == 0:  # the 6-bit codes as float vectors
            for at in range(0, dim, RUN):
                unpack_affine_32_6(p0[slot], base + at, 1.0, 0.0, channel_scales, at)
                unpack_affine_32_6(p1[slot], base + at, 1.0, 0.0, channel_mins, at)
        else:
            _unpack_run(p0[slot], base, dim, SUB_BITS, channel_scales)
            _unpack_run(p1[slot], base, dim, SUB_BITS, channel_mins)
        for first in range(0, dim, SUPER_GROUPS):
            step = _f16_at(p2[slot], (base + first) // SUPER_GROUPS)
            step_min = _f16_at(p3[slot], (base + first) // SUPER_GROUPS)
            for j in range(first, first + SUPER_GROUPS):
                channel_scales[j] = step * channel_scales[j]
                channel_mins[j] = step_min * (channel_mins[j] - np.float32(MIN_OFFSET))
        if chunk == RUN and bits in (2, 3, 4, 8):
            for d in range(dim):
                _affine_run(
                    code_row,
                    (head * dim + d) * chunk,
                    bits,
                    channel_scales[d],
                    channel_mins[d],
                    keys[d],
                    offset,
                )
            return
        for d in range(dim):
            _unpack_run(code_row, (head * dim + d) * chunk, chunk, bits, scratch)
            s, m = channel_scales[d], channel_mins[d]
            target = keys[d, offset : offset + chunk]
            for i in range(chunk):
                target[i] = m + s * scratch[i]
        return
    if token_group == RUN and bits in (2, 3, 4, 8):
        for d in range(dim):
            for g in range(per_channel):
                s, m = _params(layout, slot, (head * dim + d) * per_channel + g, p0, p1, p2, p3)
                _affine_run(
                    code_row,
                    (head * dim + d) * chunk + g * RUN,
                    bits,
                    s,
                    m,
                    keys[d],
                    offset + g * RUN,
                )
        return
    for d in range(dim):
        _unpack_run(code_row, (head * dim + d) * chunk, chunk, bits, scratch)
        for g in range(per_channel):
            s, m = _params(layout, slot, (head * dim + d) * per_channel + g, p0, p1, p2, p3)
            lo = g * token_group
            target = keys[d, offset + lo : offset + lo + token_group]
            source = scratch[lo : lo + token_group]
            for i in range(token_group):
                target[i] = m + s * source[i]


@njit(inline="always")
def _dequantize_token_values(layout, codes, p0, p1, p2, p3, head, first, count, values):
    """values[t] = dequantized per-token values of positions first .. first + count - 1, all
    quantized, for a stream of one-token chunks (slots advance without divisions)."""
    dim = layout[_DIM]
    slots = layout[_SLOTS]
    bits = layout[_BITS]
    group = min(layout[_GROUP], dim)
    groups = (dim + group - 1) // group
    half = dim // 2
    slot = first % slots
    fast_params = layout[_DQ] != 0 and groups == 2 and dim == 2 * group
    if fast_params and group == RUN and bits in (2, 3, 4, 8):  # GPT-OSS q8/q4: vector unpacking
        pair = head * 2
        bit = pair * SUB_BITS
        byte, shift = bit >> 3, bit & 7
        for t in range(count):
            sc_row, mc_row = p0[slot], p1[slot]
            sc_pair = (np.int32(sc_row[byte]) | (np.int32(sc_row[byte + 1]) << 8)) >> shift
            mc_pair = (np.int32(mc_row[byte]) | (np.int32(mc_row[byte + 1]) << 8)) >> shift
            step = _f16_at(p2[slot], pair // SUPER_GROUPS)
            step_min = _f16_at(p3[slot], pair // SUPER_GROUPS)
            row = values[t]
            for g in range(2):
                s = step * np.float32((sc_pair >> (SUB_BITS * g)) & SUB_LEVELS)
                m = step_min * np.float32(((mc_pair >> (SUB_BITS * g)) & SUB_LEVELS) - MIN_OFFSET)
                _affine_run(codes[slot], head * dim + g * RUN, bits, s, m, row, g * RUN)
            slot += 1
            if slot == slots:
                slot = 0
        return
    for t in range(count):
        row = values[t]
        _unpack_run(codes[slot], head * dim, dim, bits, row)
        if fast_params:  # both groups' 6-bit codes in one 16-bit read, one shared step
            pair = head * 2
            bit = pair * SUB_BITS
            sc_row, mc_row = p0[slot], p1[slot]
            byte, shift = bit >> 3, bit & 7
            sc_pair = (np.int32(sc_row[byte]) | (np.int32(sc_row[byte + 1]) << 8)) >> shift
            mc_pair = (np.int32(mc_row[byte]) | (np.int32(mc_row[byte + 1]) << 8)) >> shift
            step = _f16_at(p2[slot], pair // SUPER_GROUPS)
            step_min = _f16_at(p3[slot], pair // SUPER_GROUPS)
            for g in range(2):
                s = step * np.float32((sc_pair >> (SUB_BITS * g)) & SUB_LEVELS)
                m = step_min * np.float32(((mc_pair >> (SUB_BITS * g)) & SUB_LEVELS) - MIN_OFFSET)
                part = row[g * half : (g + 1) * half]
                for d in range(half):
                    part[d] = m + s * part[d]
            slot += 1
            if slot == slots:
                slot = 0
            continue
        for g in range(groups):
            s, m = _params(layout, slot, head * groups + g, p0, p1, p2, p3)
            lo = g * group
            hi = min(dim, lo + group)
            part = row[lo:hi]
            for d in range(hi - lo):
                part[d] = m + s * part[d]
        slot += 1
        if slot == slots:
            slot = 0


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def attention_blocks(
    queries, row_first, row_last, origin, first_held, end_position, block, splits, head_groups,
    k_layout, k_codes, k_p0, k_p1, k_p2, k_p3, k_residual,
    v_layout, v_codes, v_p0, v_p1, v_p2, v_p3, v_residual,
    part_max, part_sum, part_acc,
):  # fmt: skip
    """Partial softmax attention per (split, KV head): ``splits * head_groups`` parallel
    tasks, each a contiguous range of blocks walked through its group of KV heads (all heads
    when ``head_groups`` is 1; more groups keep threads busy when there are few blocks).

    queries: float32 (kv_heads, rows, head_dim), already scaled (and rotated); row_first,
    row_last: int64 (rows,) visible absolute positions per query row (inclusive). Blocks of
    ``block`` tokens start at ``origin`` and run to ``end_position``. Out per partial
    t = head * splits + split: part_max, part_sum float32 (kv_heads * splits, rows); part_acc
    float32 (kv_heads * splits, rows, head_dim).

    Each block is dequantized into L1 scratch once per KV head and shared by all its query
    rows (grouped-query attention: 8 rows for GPT-OSS), then scores and values are two small
    matrix products with register-tiled inner loops.
    """
    kv_heads, rows, dim = queries.shape
    n_blocks = (end_position - origin + block - 1) // block
    per_split = (n_blocks + splits - 1) // splits
    k_chunk = k_layout[_CHUNK]
    chunk_keys = k_layout[_PER_CHANNEL] != 0 and block % k_chunk == 0 and origin % k_chunk == 0
    heads_per_task = (kv_heads + head_groups - 1) // head_groups
    for task in prange(splits * head_groups):
        split = task // head_groups
        first_head = (task % head_groups) * heads_per_task
        last_head = min(kv_heads, first_head + heads_per_task)
        all_max = np.full((kv_heads, rows), _NEG_INF, np.float32)
        all_sum = np.zeros((kv_heads, rows), np.float32)
        all_acc = np.zeros((kv_heads, rows, dim), np.float32)
        keys = np.empty((dim, block), np.float32)  # channel-major
        values = np.empty((block, dim), np.float32)  # token-major
        scores = np.empty((rows, block), np.float32)
        scratch = np.empty(max(k_chunk, dim), np.float32)
        channel_scales = np.empty(dim, np.float32)
        channel_mins = np.empty(dim, np.float32)
        codes = np.empty(dim, np.float32)
        scales = np.empty(dim, np.float32)
        mins = np.empty(dim, np.float32)
        value = np.empty(dim, np.float32)
        for b in range(split * per_split, min(n_blocks, (split + 1) * per_split)):
            start = origin + b * block
            width = min(block, end_position - start)
            # every head of the block in turn: a slot row holds all heads, so the block's
            # codes stream through the cache once, whole lines and pages at a time
            for head in range(first_head, last_head):
                q = queries[head]
                run_max = all_max[head]
                run_sum = all_sum[head]
                acc = all_acc[head]
                # positions before first_held were dropped by a window: their slots may hold
                # anything, so they are zeroed, never decoded (their weights are 0, but 0 * NaN
                # is not)
                dropped = min(width, max(0, first_held - start))
                for t in range(dropped):
                    for d in range(dim):
                        keys[d, t] = 0.0
                    values[t, :] = 0.0
                # --- keys of the block, dequantized into scratch ---
                t = dropped
                while t < width:
                    index = (start + t) // k_chunk
                    aligned = (start + t) % k_chunk == 0
                    if (
                        chunk_keys
                        and aligned
                        and index < k_layout[_CHUNKS]
                        and t + k_chunk <= width
                    ):
                        _dequantize_chunk_keys(
                            k_layout,
                            k_codes,
                            k_p0,
                            k_p1,
                            k_p2,
                            k_p3,
                            head,
                            index,
                            t,
                            keys,
                            scratch,
                            channel_scales,
                            channel_mins,
                        )
                        t += k_chunk
                    else:
                        _decode_token_major(
                            k_layout,
                            k_codes,
                            k_p0,
                            k_p1,
                            k_p2,
                            k_p3,
                            k_residual,
                            head,
                            start + t,
                            codes,
                            scales,
                            mins,
                            value,
                            True,
                        )
                        for d in range(dim):
                            keys[d, t] = value[d]
                        t += 1
                # --- scores = q . keys: register tiles of 4 rows x 32 tokens, then the rest ---
                tiled = rows - rows % 4 if width % 32 == 0 else 0
                for r0 in range(0, tiled, 4):
                    for i0 in range(0, width, 32):
                        scores_tile(keys, q, scores, r0, i0)
                for r in range(tiled, rows):
                    row = scores[r]
                    for i in range(width):
                        row[i] = 0.0
                    for d in range(dim):
                        key_row = keys[d]
                        f = q[r, d]
                        for i in range(width):
                            row[i] += f * key_row[i]
                # --- mask, online softmax: scores become weights p ---
                for r in range(rows):
                    lo = max(row_first[r] - start, 0)
                    hi = min(row_last[r] - start + 1, width)
                    row = scores[r]
                    block_max = _NEG_INF
                    if lo == 0 and hi == width:  # nothing masked (decode): a plain max
                        for i in range(width):
                            block_max = max(block_max, row[i])
                    else:
                        for i in range(width):
                            if i < lo or i >= hi:
                                row[i] = _NEG_INF
                            elif row[i] > block_max:
                                block_max = row[i]
                    if block_max == _NEG_INF:
                        for i in range(width):
                            row[i] = 0.0
                        continue
                    new_max = max(run_max[r], block_max)
                    correction = _exp(run_max[r] - new_max) if run_max[r] > _NEG_INF else 0.0
                    run_sum[r] *= correction
                    acc_row = acc[r]
                    for d in range(dim):
                        acc_row[d] *= correction
                    total = np.float32(0.0)
                    for i in range(width):
                        p = _exp(row[i] - new_max)
                        row[i] = p
                        total += p
                    run_sum[r] += total
                    run_max[r] = new_max
                # --- values of the block, dequantized into scratch ---
                quantized_v = dropped
                if v_layout[_CHUNK] == 1 and v_layout[_PER_CHANNEL] == 0:
                    quantized_v = max(dropped, min(width, v_layout[_CHUNKS] - start))
                    if quantized_v > dropped:
                        _dequantize_token_values(
                            v_layout,
                            v_codes,
                            v_p0,
                            v_p1,
                            v_p2,
                            v_p3,
                            head,
                            start + dropped,
                            quantized_v - dropped,
                            values[dropped:],
                        )
                for t in range(quantized_v, width):
                    _decode_token_major(
                        v_layout,
                        v_codes,
                        v_p0,
                        v_p1,
                        v_p2,
                        v_p3,
                        v_residual,
                        head,
                        start + t,
                        codes,
                        scales,
                        mins,
                        values[t],
                        True,
                    )
                # --- acc += p . values: register tiles of 4 rows x 64 columns, then the rest ---
                tiled = rows - rows % 4 if dim == 64 else 0
                for r0 in range(0, tiled, 4):
                    values_tile(scores, values, acc, r0, width)
                for r in range(tiled, rows):
                    acc_row = acc[r]
                    for t in range(width):
                        p = scores[r, t]
                        value_row = values[t]
                        for d in range(dim):
                            acc_row[d] += p * value_row[d]
        for head in range(first_head, last_head):
            partial = head * splits + split
            for r in range(rows):
                part_max[partial, r] = all_max[head, r]
                part_sum[partial, r] = all_sum[head, r]
                for d in range(dim):
                    part_acc[partial, r, d] = all_acc[head, r, d]
