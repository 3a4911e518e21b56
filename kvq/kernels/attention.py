"""Fused attention over a quantized KV cache: scores and values straight from the codes.

Work is split across threads by (KV head, token split) — flash-decoding — and each task walks
its tokens in blocks: it unpacks the block's codes into small float32 scratch arrays (in L1),
computes scores for every query row of its KV head, updates an online softmax (running max,
sum and weighted value sum) and moves on. No dequantized copy of the cache is built; the
scratch holds one block of one head.

Scale folding: for per-channel keys the group scale multiplies the query (``q * s``) and the
group min adds ``q . m`` once per block, so scores are ``(q * s) . c + q . m``; for per-token
values the scale multiplies the softmax weight (``p * s``) and the min adds ``m * sum(p)`` per
group, so values accumulate straight from the codes. Other layouts (per-token keys,
per-channel values) dequantize the block in scratch.

Stream layout (``layout`` int64[12]): bits, per_channel, group, chunk, first_chunk, chunks,
slots, double_quant, half, n_residual, heads, head_dim. Param arrays: plain params are
``p0`` scales and ``p1`` mins (float32, or float16 bits as uint16 with ``half``); with
double_quant ``p0``/``p1`` are packed 6-bit scale/min codes and ``p2``/``p3`` float16 bits of
the per-8-group steps.
"""

import numpy as np
from numba import njit, prange

from kvq.kernels._floatbits import bits_to_float, half_bits_to_float

_BITS, _PER_CHANNEL, _GROUP, _CHUNK, _FIRST, _CHUNKS, _SLOTS, _DQ, _HALF, _RES, _HEADS, _DIM = (
    range(12)
)
_SUPER = 8
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
    else:
        for i in range(count):
            out[i] = np.float32(_code(row, start + i, bits))


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
        sc = _code(p0[slot], group, 6)
        mc = _code(p1[slot], group, 6) - 32
        d = _f16_at(p2[slot], group // _SUPER)
        dmin = _f16_at(p3[slot], group // _SUPER)
        return np.float32(d * np.float32(sc)), np.float32(dmin * np.float32(mc))
    if layout[_HALF]:
        return _f16_at(p0[slot], group), _f16_at(p1[slot], group)
    return _f32_at(p0[slot], group), _f32_at(p1[slot], group)


@njit(inline="always")
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
            for d in range(g * group, min(dim, (g + 1) * group)):
                scales_out[d] = s
                mins_out[d] = m
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


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def attention_blocks(
    queries,
    row_first,
    row_last,
    first_position,
    end_position,
    block,
    splits,
    k_layout,
    k_codes,
    k_p0,
    k_p1,
    k_p2,
    k_p3,
    k_residual,
    v_layout,
    v_codes,
    v_p0,
    v_p1,
    v_p2,
    v_p3,
    v_residual,
    part_max,
    part_sum,
    part_acc,
):
    """Partial softmax attention per (KV head, split) task.

    queries: float32 (kv_heads, rows, head_dim), already scaled (and rotated); row_first,
    row_last: int64 (rows,) visible absolute positions per query row (inclusive); tokens held:
    [first_position, end_position). Out per task t = head * splits + split: part_max,
    part_sum float32 (tasks, rows); part_acc float32 (tasks, rows, head_dim).
    """
    kv_heads, rows, dim = queries.shape
    held = end_position - first_position
    n_blocks = (held + block - 1) // block
    per_split = (n_blocks + splits - 1) // splits
    k_chunk = k_layout[_CHUNK]
    v_chunk = v_layout[_CHUNK]
    v_bits = v_layout[_BITS]
    v_group = min(v_layout[_GROUP], dim) if not v_layout[_PER_CHANNEL] else dim
    min_groups = (dim + v_group - 1) // v_group
    fast_keys = k_layout[_PER_CHANNEL] and block % k_chunk == 0 and first_position % k_chunk == 0
    for task in prange(kv_heads * splits):
        head = task // splits
        split = task % splits
        q = queries[head]
        run_max = np.full(rows, _NEG_INF, np.float32)
        run_sum = np.zeros(rows, np.float32)
        acc = np.zeros((rows, dim), np.float32)
        min_acc = np.zeros((rows, min_groups), np.float32)  # sum of p * min per value group
        np.empty((dim, block), np.float32)  # channel-major block of keys
        scores = np.empty((rows, block), np.float32)
        codes = np.empty(dim, np.float32)
        scales = np.empty(dim, np.float32)
        mins = np.empty(dim, np.float32)
        value = np.empty(dim, np.float32)
        folded = np.empty((rows, dim), np.float32)
        bias = np.empty(rows, np.float32)
        run = np.empty(k_chunk, np.float32)
        for b in range(split * per_split, min(n_blocks, (split + 1) * per_split)):
            start = first_position + b * block
            stop = min(start + block, end_position)
            width = stop - start
            for r in range(rows):
                for t in range(width):
                    scores[r, t] = 0.0
            # --- scores ---
            t = 0
            while t < width:
                position = start + t
                index = position // k_chunk
                if fast_keys and index < k_layout[_CHUNKS]:
                    # a whole per-channel chunk: fold scales into the queries
                    slot = index % k_layout[_SLOTS]
                    token_group = min(k_layout[_GROUP], k_chunk)
                    groups = k_chunk // token_group
                    for g in range(groups):
                        for r in range(rows):
                            bias[r] = 0.0
                        for d in range(dim):
                            s, m = _params(
                                k_layout,
                                slot,
                                (head * dim + d) * groups + g,
                                k_p0,
                                k_p1,
                                k_p2,
                                k_p3,
                            )
                            for r in range(rows):
                                folded[r, d] = q[r, d] * s
                                bias[r] += q[r, d] * m
                        for d in range(dim):
                            _unpack_run(
                                k_codes[slot],
                                (head * dim + d) * k_chunk + g * token_group,
                                token_group,
                                k_layout[_BITS],
                                run,
                            )
                            for r in range(rows):
                                f = folded[r, d]
                                target = scores[r, t + g * token_group : t + (g + 1) * token_group]
                                for i in range(token_group):
                                    target[i] += f * run[i]
                        for r in range(rows):
                            target = scores[r, t + g * token_group : t + (g + 1) * token_group]
                            for i in range(token_group):
                                target[i] += bias[r]
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
                        position,
                        codes,
                        scales,
                        mins,
                        value,
                        True,
                    )
                    for r in range(rows):
                        total = np.float32(0.0)
                        for d in range(dim):
                            total += q[r, d] * value[d]
                        scores[r, t] = total
                    t += 1
            # --- mask, online softmax ---
            for r in range(rows):
                lo = max(row_first[r] - start, 0)
                hi = min(row_last[r] - start + 1, width)
                block_max = _NEG_INF
                for i in range(width):
                    if i < lo or i >= hi:
                        scores[r, i] = _NEG_INF
                    elif scores[r, i] > block_max:
                        block_max = scores[r, i]
                if block_max == _NEG_INF:
                    for i in range(width):
                        scores[r, i] = 0.0
                    continue
                new_max = max(run_max[r], block_max)
                correction = _exp(run_max[r] - new_max) if run_max[r] > _NEG_INF else 0.0
                run_sum[r] *= correction
                for d in range(dim):
                    acc[r, d] *= correction
                for g in range(min_groups):
                    min_acc[r, g] *= correction
                total = np.float32(0.0)
                row = scores[r, :width]
                for i in range(width):
                    p = _exp(row[i] - new_max)
                    row[i] = p
                    total += p
                run_sum[r] += total
                run_max[r] = new_max
            # --- values ---
            for t in range(width):
                position = start + t
                index = position // v_chunk
                if index >= v_layout[_CHUNKS] or v_layout[_PER_CHANNEL]:
                    _decode_token_major(
                        v_layout,
                        v_codes,
                        v_p0,
                        v_p1,
                        v_p2,
                        v_p3,
                        v_residual,
                        head,
                        position,
                        codes,
                        scales,
                        mins,
                        value,
                        True,
                    )
                    for r in range(rows):
                        p = scores[r, t]
                        if p != 0.0:
                            target = acc[r]
                            for d in range(dim):
                                target[d] += p * value[d]
                    continue
                # per-token codes: the scale joins the weight, the min a per-group sum
                slot = index % v_layout[_SLOTS]
                inner = position - index * v_chunk
                _unpack_run(v_codes[slot], (head * v_chunk + inner) * dim, dim, v_bits, codes)
                base = (head * v_chunk + inner) * min_groups
                for g in range(min_groups):
                    s, m = _params(v_layout, slot, base + g, v_p0, v_p1, v_p2, v_p3)
                    lo = g * v_group
                    hi = min(dim, lo + v_group)
                    group_codes = codes[lo:hi]
                    for r in range(rows):
                        p = scores[r, t]
                        weight = p * s
                        target = acc[r, lo:hi]
                        for d in range(hi - lo):
                            target[d] += weight * group_codes[d]
                        min_acc[r, g] += p * m
        for r in range(rows):
            part_max[task, r] = run_max[r]
            part_sum[task, r] = run_sum[r]
            for d in range(dim):
                part_acc[task, r, d] = acc[r, d] + min_acc[r, d // v_group]
