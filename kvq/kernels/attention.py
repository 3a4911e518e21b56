"""Fused attention over a quantized KV cache: scores and values straight from the codes.

Work is split across threads by token range (flash-decoding): each task walks its blocks of
tokens and, within a block, every KV head in turn, so the codes (a chunk's slot row holds
all heads) stream through the caches once, whole lines and pages at a time. Per block and
head it unpacks the codes into small float32 scratch arrays in L1 (32 codes at a time as one
vector operation: ``_unpack.py``), computes scores for every query row of that head (the
GQA group's rows share the decoded block), updates an online softmax (running max, sum and
weighted value sum) and moves on. No dequantized copy of the cache is built; the scratch
holds one block of one head. The two products run as register tiles (``_tiles.py``) of 4
query rows, and of 1-3 rows for the rest of a group (GQA 1, 3, 7 ...). After the parallel
loop the partial softmaxes of the token ranges are merged (with the sinks) in float64.

With at most 4 query rows per KV head (GQA 1-4 at decode) each decoded element feeds only
1-4 multiply-adds, so storing it to scratch and reading it back would cost more than the
products: there the register tiles read the codes themselves (``values_codes_tile``,
``scores_codes_tile``, ``scores_tokens_tile`` in ``_tiles.py``), for blocks whose tokens are
all quantized. A group's scale is folded into the weights (q times the per-channel scales, or
the softmax weight times a token's scale) and its centre (min plus scale times 2**(bits-1),
the codes taken centred) is summed apart. Otherwise per-channel keys decode a chunk a channel
at a time; per-token keys and values decode a token at a time, 32 codes per vector operation
when head_dim and the group are multiples of 32 (keys are then transposed into the
channel-major scratch). Per-channel values decode whole chunks to that scratch as keys do and
are transposed to token-major. Residual tokens and other shapes go through a
slower token-at-a-time decoder, compiled once and not inlined. Keys held before RoPE
(``rope_cos``/``rope_sin`` tables in the key view) are always decoded to the channel-major
scratch and turned there by their positions' angles (``_turn_keys``), then scored by the
plain tiles: a per-token rotation cannot be folded into q.

Keys of per-channel widths (``Scheme.channel_bits``) are held with each head's channels
widest first (the queries arrive in that order), so a head's channels form a few runs of one
width: the key tile takes one run at a time, adding to the scores, and the scratch decoder
reads each channel's 32 codes from the byte its run starts on (``channel_at``).

Compile time: Numba's passes cost more than linearly in the size of the function they see,
so the kernel is compiled in parts that are not inlined into each other: the parallel loop
and merge (``attention_blocks``), one task's walk over its blocks (``_attend_task``), the
per-token row decoder (``_token_rows``) and the token-at-a-time one; code that both K and V
use is called from one site. That took the first call from about 180 s to 110-130 s. A call
costs a few contended reference counts (the streams' arrays are shared by the threads), so
helpers run once per 32 tokens or per block and head stay inlined (measured: 4-15% slower
out of line).

A stream arrives as a :class:`StreamView` (built by ``TensorStream.kernel_view()``): the
scheme's integers and the store's arrays by name. Param arrays: plain params are ``p0``
scales and ``p1`` mins (float32, or float16 bits with ``half``), as bytes; with double_quant
``p0``/``p1`` are packed 6-bit scale/min codes and ``p2``/``p3`` float16 bits of the
per-8-group steps.
"""

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from kvq._format import MIN_OFFSET, SUB_BITS, SUPER_GROUPS
from kvq.kernels._floatbits import bits_to_float, half_bits_to_float
from kvq.kernels._simd import widen_floats, widen_halves
from kvq.kernels._tiles import (
    ACCUMULATORS,
    scores_codes_tile,
    scores_codes_tile_1,
    scores_codes_tile_2,
    scores_codes_tile_3,
    scores_tile,
    scores_tile_1,
    scores_tile_2,
    scores_tile_3,
    scores_tokens_tile,
    scores_tokens_tile_1,
    scores_tokens_tile_2,
    scores_tokens_tile_3,
    transpose_16,
    turn_keys_16,
    values_codes_tile,
    values_codes_tile_1,
    values_codes_tile_2,
    values_codes_tile_3,
    values_tile,
    values_tile_1,
    values_tile_2,
    values_tile_3,
)
from kvq.kernels._unpack import (
    RUN,
    code_at,
    code_at_bit,
    unpack_affine_8,
    unpack_affine_32,
    unpack_affine_bytes_32,
    unpack_run,
)
from kvq.kernels.sink_tokens import merge_sink_tokens


class StreamView(NamedTuple):
    """One K or V stream as the kernel reads it (``TensorStream.kernel_view()``)."""

    bits: int  # 2, 3, 4 or 8 bits per code
    per_channel: bool  # groups run across tokens (axis -2) rather than along head_dim
    group: int  # the scheme's group_size
    chunk: int  # tokens quantized together (one slot row)
    chunks: int  # chunks quantized so far: positions below chunks * chunk are codes
    slots: int  # rows of the store (a ring when windowed)
    double_quant: bool  # p0/p1 are 6-bit codes under the float16 steps p2/p3
    half: bool  # plain params are float16
    codes: np.ndarray  # uint8 (slots, code bytes of a chunk)
    p0: np.ndarray  # uint8 (slots, bytes): scales, or scale codes
    p1: np.ndarray  # mins, or min codes
    p2: np.ndarray  # float16 scale steps (double_quant), else a dummy
    p3: np.ndarray  # float16 min steps (double_quant), else a dummy
    residual: np.ndarray  # float32 (heads, residual tokens, head_dim), after the chunks
    # keys held before RoPE: float32 (head_dim / 2, positions) cos and sin of each position's
    # angles, which turn decoded keys back; (0, 0) for a stream without RoPE
    rope_cos: np.ndarray
    rope_sin: np.ndarray
    # per-channel widths (Scheme.channel_bits), each head's channels widest first; empty for
    # a stream of one width: int64 (heads * head_dim) widths, the byte of a slot row where
    # each channel's codes start, and (heads, runs) the end channel of each run of one width
    channel_bits: np.ndarray
    channel_at: np.ndarray
    channel_runs: np.ndarray
    # int64 (heads * head_dim): the model's channel held at j of head h is channel_order[h *
    # head_dim + j] (queries are gathered so, outputs of such values scattered back)
    channel_order: np.ndarray


_NEG_INF = np.float32(-np.inf)

# AVX-512's register file (a compile-time constant of the kernel: Numba freezes globals)
_WIDE = ACCUMULATORS >= 16

# the kernel's float flags, for the helpers it calls out of line too
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


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


class _Flat(NamedTuple):
    """A StreamView's arrays as flat 1-D views with their row lengths (in their own units):
    hot loops index them without slicing, since every Numba slice is an atomic incref and
    decref (measured with perf: a quarter of the time when rows were sliced per token)."""

    codes: np.ndarray
    p0: np.ndarray
    p1: np.ndarray
    p2: np.ndarray
    p3: np.ndarray
    codes_row: int  # codes per slot row
    param_row: int  # params of p0/p1 per slot row (6-bit codes, float16 or float32 values)
    step_row: int  # float16 steps of p2/p3 per slot row


@njit(inline="always")
def _flat(view):
    """The :class:`_Flat` of a StreamView."""
    if view.double_quant:
        param_row = view.p0.shape[1] * 8 // SUB_BITS
    elif view.half:
        param_row = view.p0.shape[1] // 2
    else:
        param_row = view.p0.shape[1] // 4
    return _Flat(
        view.codes.reshape(view.codes.size),
        view.p0.reshape(view.p0.size),
        view.p1.reshape(view.p1.size),
        view.p2.reshape(view.p2.size),
        view.p3.reshape(view.p3.size),
        view.codes.shape[1] * 8 // view.bits,
        param_row,
        view.p2.shape[1] // 2,
    )


@njit(inline="always")
def _params(view, flat, slot, group):
    """(scale, min) float32 of ``group`` in chunk ``slot`` of a stream (params as bytes)."""
    if view.double_quant:
        at = slot * flat.param_row + group
        sc = code_at(flat.p0, at, SUB_BITS)
        mc = code_at(flat.p1, at, SUB_BITS) - MIN_OFFSET
        step_at = slot * flat.step_row + group // SUPER_GROUPS
        d = _f16_at(flat.p2, step_at)
        dmin = _f16_at(flat.p3, step_at)
        return np.float32(d * np.float32(sc)), np.float32(dmin * np.float32(mc))
    at = slot * flat.param_row + group
    if view.half:
        return _f16_at(flat.p0, at), _f16_at(flat.p1, at)
    return _f32_at(flat.p0, at), _f32_at(flat.p1, at)


@njit(cache=True)  # slow paths only: compiled once, not inlined (halves compile time)
def _decode_token_major(
    view, flat, head, position, dim, codes_out, scales_out, mins_out, values_out
):
    """values_out[:dim] = one token of one head, dequantized (or copied from the residual)."""
    chunk = view.chunk
    index = position // chunk
    if index >= view.chunks:
        offset = position - view.chunks * chunk
        for d in range(dim):
            values_out[d] = view.residual[head, offset, d]
        return
    slot = index % view.slots
    inner = position - index * chunk
    bits = view.bits
    group = min(view.group, dim)
    row_at = slot * flat.codes_row
    if not view.per_channel:
        groups_per_token = (dim + group - 1) // group
        unpack_run(flat.codes, row_at + (head * chunk + inner) * dim, dim, bits, codes_out)
        base = (head * chunk + inner) * groups_per_token
        for g in range(groups_per_token):
            s, m = _params(view, flat, slot, base + g)
            lo = g * group
            hi = min(dim, lo + group)
            for d in range(lo, hi):
                values_out[d] = m + s * codes_out[d]
        return
    token_group = min(view.group, chunk)
    groups_per_channel = chunk // token_group
    mixed = view.channel_bits.shape[0] > 0
    row_byte = slot * view.codes.shape[1]
    for d in range(dim):
        if mixed:  # each channel's own width, from its own byte
            width = view.channel_bits[head * dim + d]
            bit = 8 * (row_byte + view.channel_at[head * dim + d]) + inner * width
            codes_out[d] = np.float32(code_at_bit(flat.codes, bit, width))
        else:
            run = (head * dim + d) * chunk
            codes_out[d] = np.float32(code_at(flat.codes, row_at + run + inner, bits))
        s, m = _params(
            view, flat, slot, (head * dim + d) * groups_per_channel + inner // token_group
        )
        scales_out[d] = s
        mins_out[d] = m
    for d in range(dim):
        values_out[d] = mins_out[d] + scales_out[d] * codes_out[d]


@njit(inline="always")
def _vector_tokens(view, dim):
    """Whether per-token rows of ``view`` decode 32 codes per vector operation: whole groups
    of multiples of 32 (a ragged last group, e.g. 64 + 32 of head_dim 96, is scalar)."""
    group = min(view.group, dim)
    return (
        not view.per_channel
        and dim % RUN == 0
        and group % RUN == 0
        and dim % group == 0
        and (view.bits == 2 or view.bits == 3 or view.bits == 4 or view.bits == 8)
    )


@njit(inline="always")  # per block and head: a call costs ~10% at GQA 1
def _token_params(view, flat, head, first, count, groups, scales, mins, staged):
    """scales[t * groups + g], mins[...] = the float32 scale and min of group g of per-token
    position first + t of ``head`` (t < count; all quantized and held): each slot's run of
    params at once, 6-bit codes a super-group (8) per vector operation. staged: float32
    (2 * SUPER_GROUPS) scratch."""
    chunk = view.chunk
    index = first // chunk
    inner = first - index * chunk
    slot = index % view.slots
    done = 0
    while done < count:
        n = min(chunk - inner, count - done)
        lo = (head * chunk + inner) * groups  # the run's first param in its slot row
        hi = lo + n * groups
        out_at = done * groups - lo  # param p of the row goes to out_at + p
        row_at = slot * flat.param_row
        if view.double_quant:  # rows hold whole super-groups: each read stays in its row
            for sg in range(lo // SUPER_GROUPS, (hi - 1) // SUPER_GROUPS + 1):
                step_at = slot * flat.step_row + sg
                step = _f16_at(flat.p2, step_at)
                step_min = _f16_at(flat.p3, step_at)
                base = sg * SUPER_GROUPS
                unpack_affine_8(flat.p0, row_at + base, SUB_BITS, step, 0.0, staged, 0)
                unpack_affine_8(
                    flat.p1, row_at + base, SUB_BITS, step_min,
                    np.float32(-MIN_OFFSET) * step_min, staged, SUPER_GROUPS,
                )  # fmt: skip
                for p in range(max(lo, base), min(hi, base + SUPER_GROUPS)):
                    scales[out_at + p] = staged[p - base]
                    mins[out_at + p] = staged[SUPER_GROUPS + p - base]
        else:  # 16 a vector operation (``scales`` and ``mins`` have 16 to spare)
            for i in range(0, hi - lo, 16):
                lanes = min(16, hi - lo - i)
                if view.half:
                    widen_halves(flat.p0, row_at + lo + i, scales, done * groups + i, lanes)
                    widen_halves(flat.p1, row_at + lo + i, mins, done * groups + i, lanes)
                else:
                    widen_floats(flat.p0, row_at + lo + i, scales, done * groups + i, lanes)
                    widen_floats(flat.p1, row_at + lo + i, mins, done * groups + i, lanes)
        done += n
        inner = 0
        slot += 1
        if slot == view.slots:
            slot = 0


@njit(inline="always")
def _block_params(view, flat, first, count, lo, hi, scales, mins):
    """Params lo .. hi - 1 of the slot rows of per-token positions first .. first + count - 1
    (one token a row, every head's params side by side: ``view.chunk == 1``; all quantized
    and held), float32: param p of token t to scales[t * stride + p - base], mins[...].
    Returns (stride, base). Second-level rows decode whole super-groups of 6-bit codes, 8 a
    vector operation (base: lo rounded down to one); float16/float32 rows 16 (``scales`` and
    ``mins`` have 16 to spare). Staged once a block for all its heads: per head and token
    (a head holds 1-4 params), the staging cost Llama-2's q8 a third of its time."""
    base, top = lo, hi
    if view.double_quant:
        base = lo // SUPER_GROUPS * SUPER_GROUPS
        top = (hi + SUPER_GROUPS - 1) // SUPER_GROUPS * SUPER_GROUPS
    stride = top - base
    slot = first % view.slots
    for t in range(count):
        row_at = slot * flat.param_row
        out_at = t * stride - base
        if view.double_quant:
            for sg in range(base // SUPER_GROUPS, top // SUPER_GROUPS):
                step_at = slot * flat.step_row + sg
                step = _f16_at(flat.p2, step_at)
                step_min = _f16_at(flat.p3, step_at)
                at = sg * SUPER_GROUPS
                unpack_affine_8(flat.p0, row_at + at, SUB_BITS, step, 0.0, scales, out_at + at)
                unpack_affine_8(
                    flat.p1, row_at + at, SUB_BITS, step_min,
                    np.float32(-MIN_OFFSET) * step_min, mins, out_at + at,
                )  # fmt: skip
        else:
            for i in range(base, top, 16):
                lanes = min(16, top - i)
                if view.half:
                    widen_halves(flat.p0, row_at + i, scales, out_at + i, lanes)
                    widen_halves(flat.p1, row_at + i, mins, out_at + i, lanes)
                else:
                    widen_floats(flat.p0, row_at + i, scales, out_at + i, lanes)
                    widen_floats(flat.p1, row_at + i, mins, out_at + i, lanes)
        slot += 1
        if slot == view.slots:
            slot = 0
    return stride, base


@njit(cache=True, fastmath=_FASTMATH)  # per block: compiled once, not inlined
def _token_rows(
    view, flat, vector, head, first, count, dim, out, out_flat, at, scales, mins, staged
):
    """out[at + t, :dim] = per-token codes of positions first .. first + count - 1 (all
    quantized and held) dequantized; ``vector``: :func:`_vector_tokens` of the view;
    ``out_flat``: ``out`` as a flat view; scales, mins: float32 (count * groups) scratch for
    the vector path's params (and 16 to spare), staged: (2 * SUPER_GROUPS)."""
    chunk = view.chunk
    slots = view.slots
    bits = view.bits
    group = min(view.group, dim)
    groups = (dim + group - 1) // group
    runs_per_group = group // RUN  # vector: group is a multiple of RUN
    index = first // chunk
    inner = first - index * chunk
    slot = index % slots
    if vector:
        _token_params(view, flat, head, first, count, groups, scales, mins, staged)
    for t in range(count):
        base = head * chunk + inner
        codes_at = slot * flat.codes_row + base * dim
        out_at = (at + t) * dim
        if vector:
            for g in range(groups):
                s = scales[t * groups + g]
                m = mins[t * groups + g]
                for j in range(g * runs_per_group, (g + 1) * runs_per_group):
                    unpack_affine_32(
                        flat.codes, codes_at + j * RUN, bits, s, m, out_flat, out_at + j * RUN
                    )
        else:
            row = out[at + t]
            unpack_run(flat.codes, codes_at, dim, bits, row)
            for g in range(groups):
                s, m = _params(view, flat, slot, base * groups + g)
                lo = g * group
                for d in range(lo, min(dim, lo + group)):
                    row[d] = m + s * row[d]
        inner += 1
        if inner == chunk:
            inner = 0
            slot += 1
            if slot == slots:
                slot = 0


@njit(inline="always")  # per 32 tokens: a call would cost 15% at GQA 1
def _channel_params(view, flat, head, index, dim, channel_scales, channel_mins):
    """channel_scales[d], channel_mins[d] = the scale and min of channel d of ``head`` in
    per-channel chunk ``index`` whose tokens form one group (chunk == group); with
    double_quant and dim a multiple of 8, the 6-bit codes are unpacked as runs."""
    slot = index % view.slots
    base = head * dim
    if view.double_quant and dim % SUPER_GROUPS == 0:
        param_at = slot * flat.param_row + base
        if dim % RUN == 0:  # the 6-bit codes as float vectors
            for at in range(0, dim, RUN):
                unpack_affine_32(flat.p0, param_at + at, SUB_BITS, 1.0, 0.0, channel_scales, at)
                unpack_affine_32(flat.p1, param_at + at, SUB_BITS, 1.0, 0.0, channel_mins, at)
        else:
            unpack_run(flat.p0, param_at, dim, SUB_BITS, channel_scales)
            unpack_run(flat.p1, param_at, dim, SUB_BITS, channel_mins)
        for first in range(0, dim, SUPER_GROUPS):
            step_at = slot * flat.step_row + (base + first) // SUPER_GROUPS
            step = _f16_at(flat.p2, step_at)
            step_min = _f16_at(flat.p3, step_at)
            for j in range(first, first + SUPER_GROUPS):
                channel_scales[j] = step * channel_scales[j]
                channel_mins[j] = step_min * (channel_mins[j] - np.float32(MIN_OFFSET))
        return
    at = slot * flat.param_row + base
    if view.double_quant:
        for d in range(dim):
            s, m = _params(view, flat, slot, base + d)
            channel_scales[d] = s
            channel_mins[d] = m
    else:  # 16 a vector operation (the arrays have 16 to spare)
        for i in range(0, dim, 16):
            lanes = min(16, dim - i)
            if view.half:
                widen_halves(flat.p0, at + i, channel_scales, i, lanes)
                widen_halves(flat.p1, at + i, channel_mins, i, lanes)
            else:
                widen_floats(flat.p0, at + i, channel_scales, i, lanes)
                widen_floats(flat.p1, at + i, channel_mins, i, lanes)


@njit(inline="always")
def _dequantize_chunk_keys(
    view, flat, head, index, offset, dim, keys, keys_flat, scratch, channel_scales, channel_mins
):
    """keys[d, offset:offset + chunk] = dequantized per-channel chunk ``index`` of ``head``
    (``keys_flat``: ``keys`` as a flat view)."""
    chunk = view.chunk
    block = keys.shape[1]
    slot = index % view.slots
    token_group = min(view.group, chunk)
    per_channel = chunk // token_group
    row_at = slot * flat.codes_row
    bits = view.bits
    if view.channel_bits.shape[0] > 0:  # per-channel widths: each channel from its own byte
        whole = chunk % RUN == 0 and per_channel == 1
        if whole:
            _channel_params(view, flat, head, index, dim, channel_scales, channel_mins)
        row_byte = slot * view.codes.shape[1]
        for d in range(dim):
            width = view.channel_bits[head * dim + d]
            byte = row_byte + view.channel_at[head * dim + d]
            if whole:
                for i in range(0, chunk, RUN):
                    unpack_affine_bytes_32(
                        flat.codes, byte + i * width // 8, width, channel_scales[d],
                        channel_mins[d], keys_flat, d * block + offset + i,
                    )  # fmt: skip
            else:
                for i in range(chunk):
                    s, m = _params(
                        view, flat, slot, (head * dim + d) * per_channel + i // token_group
                    )
                    code = code_at_bit(flat.codes, 8 * byte + i * width, width)
                    keys[d, offset + i] = m + s * np.float32(code)
        return
    if view.double_quant and per_channel == 1 and dim % SUPER_GROUPS == 0:
        _channel_params(view, flat, head, index, dim, channel_scales, channel_mins)
        if chunk == RUN and bits in (2, 3, 4, 8):
            for d in range(dim):
                unpack_affine_32(
                    flat.codes,
                    row_at + (head * dim + d) * chunk,
                    bits,
                    channel_scales[d],
                    channel_mins[d],
                    keys_flat,
                    d * block + offset,
                )
            return
        for d in range(dim):
            unpack_run(flat.codes, row_at + (head * dim + d) * chunk, chunk, bits, scratch)
            s, m = channel_scales[d], channel_mins[d]
            target = keys[d, offset : offset + chunk]
            for i in range(chunk):
                target[i] = m + s * scratch[i]
        return
    if token_group == RUN and bits in (2, 3, 4, 8):
        for d in range(dim):
            for g in range(per_channel):
                s, m = _params(view, flat, slot, (head * dim + d) * per_channel + g)
                unpack_affine_32(
                    flat.codes,
                    row_at + (head * dim + d) * chunk + g * RUN,
                    bits,
                    s,
                    m,
                    keys_flat,
                    d * block + offset + g * RUN,
                )
        return
    for d in range(dim):
        unpack_run(flat.codes, row_at + (head * dim + d) * chunk, chunk, bits, scratch)
        for g in range(per_channel):
            s, m = _params(view, flat, slot, (head * dim + d) * per_channel + g)
            lo = g * token_group
            target = keys[d, offset + lo : offset + lo + token_group]
            source = scratch[lo : lo + token_group]
            for i in range(token_group):
                target[i] = m + s * source[i]


@njit(cache=True)  # per-channel values only: compiled once, not inlined (+110 s of compile)
def _chunk_values(
    view, flat, head, index, t, dim, channels, channels_flat, values, scratch, channel_scales,
    channel_mins,
):  # fmt: skip
    """values[t:t + chunk] = per-channel value chunk ``index`` of ``head``, token-major: decoded
    channel-major into ``channels`` (dim, block) by the keys' chunk decoder, then transposed."""
    _dequantize_chunk_keys(
        view, flat, head, index, t, dim, channels, channels_flat, scratch, channel_scales,
        channel_mins,
    )  # fmt: skip
    v_chunk = view.chunk
    for i0 in range(t, t + v_chunk, 16):  # 16 x 16 register transposes
        for d0 in range(0, dim, 16):
            transpose_16(channels, values, d0, i0)


@njit(inline="always")
def _touch(view, flat, first, count):
    """Sum of one byte in 64 of the slot rows, codes and params, that hold positions first ..
    first + count - 1 (the quantized ones): many independent loads in flight bring a block's
    rows into cache before its heads are walked one at a time. Without them a per-token
    stream (a slot row per token, all heads side by side) is read a head's slice per row,
    one row after the other: perf put 70% of Llama-2's time on those loads."""
    lo = first // view.chunk
    hi = min(view.chunks, (first + count - 1) // view.chunk + 1)
    if hi <= lo:
        return 0
    slot = lo % view.slots
    rows = min(hi - lo, view.slots)  # a window's block may span more chunks than the ring
    ahead = min(rows, view.slots - slot)  # rows before the ring wraps, then from row 0
    behind = rows - ahead
    total = _touch_rows(flat.codes, view.codes.shape[1], slot, ahead, behind)
    total += _touch_rows(flat.p0, view.p0.shape[1], slot, ahead, behind)
    total += _touch_rows(flat.p1, view.p1.shape[1], slot, ahead, behind)
    if view.double_quant:
        total += _touch_rows(flat.p2, view.p2.shape[1], slot, ahead, behind)
        total += _touch_rows(flat.p3, view.p3.shape[1], slot, ahead, behind)
    return total


@njit(inline="always")
def _touch_rows(flat, row_bytes, slot, ahead, behind):
    """Sum of one byte in 64 (and the last) of rows slot .. slot + ahead - 1 and 0 .. behind
    - 1 of a flat byte array of ``row_bytes`` a row (rows are contiguous: each cache line
    read once, however short the rows)."""
    total = 0
    for start, length in ((slot * row_bytes, ahead * row_bytes), (0, behind * row_bytes)):
        if length > 0:
            for at in range(start, start + length, 64):
                total += flat[at]
            total += flat[start + length - 1]
    return total


@njit(inline="always")
def _turn_keys(keys, cos, sin, start, width):
    """RoPE on the channel-major block keys[:, :width] of positions start ..: channel j and
    j + head_dim / 2 turn by the angle whose cos and sin are cos[j, p], sin[j, p]."""
    half = keys.shape[0] // 2
    vectors = width - width % 16
    for j in range(half):
        for i in range(0, vectors, 16):
            turn_keys_16(keys, cos, sin, j, start, i)
        for i in range(vectors, width):
            c = cos[j, start + i]
            s = sin[j, start + i]
            a = keys[j, i]
            b = keys[j + half, i]
            keys[j, i] = a * c - b * s
            keys[j + half, i] = b * c + a * s


@njit(inline="always")
def _scores(keys, q, scores, rows, width):
    """scores[r, :width] = q[r] @ keys[:, :width] for every row: register tiles of 4 rows (and
    one of the 1-3 rows left) over 32 tokens; the last width % 32 tokens take one more tile
    where the scratch has the columns, else plain loops."""
    dim = q.shape[1]
    tiled_width = width - width % 32
    if tiled_width < width and tiled_width + 32 <= min(keys.shape[1], scores.shape[1]):
        # the last tokens as one more tile (a loop per row and channel over 1-31 tokens cost
        # a Llama-3 decode call 10 us); the scores past ``width`` are never read
        tiled_width += 32
    rest = rows % 4
    for r0 in range(0, rows - rest, 4):
        for i0 in range(0, tiled_width, 32):
            scores_tile(keys, q, scores, r0, i0)
    r0 = rows - rest
    if rest == 3:
        for i0 in range(0, tiled_width, 32):
            scores_tile_3(keys, q, scores, r0, i0)
    elif rest == 2:
        for i0 in range(0, tiled_width, 32):
            scores_tile_2(keys, q, scores, r0, i0)
    elif rest == 1:
        for i0 in range(0, tiled_width, 32):
            scores_tile_1(keys, q, scores, r0, i0)
    if tiled_width < width:
        for r in range(rows):
            row = scores[r]
            for i in range(tiled_width, width):
                row[i] = 0.0
            for d in range(dim):
                key_row = keys[d]
                f = q[r, d]
                for i in range(tiled_width, width):
                    row[i] += f * key_row[i]


@njit(inline="always")
def _scores_codes(codes, base, stride, bits, weights, bias, scores, rows, i0, first, last, add):
    """scores[r, i0:i0 + 32] for every row from 32 tokens of per-channel key codes of
    channels first .. last - 1 (channel d from code (d - first) * stride after byte
    ``base``), scales folded into ``weights`` and mins into ``bias`` (``add``: added to what
    the scores hold instead)."""
    rest = rows % 4
    for r0 in range(0, rows - rest, 4):
        scores_codes_tile(
            codes, base, stride, bits, weights, bias, scores, r0, i0, first, last, add
        )
    r0 = rows - rest
    if rest == 3:
        scores_codes_tile_3(
            codes, base, stride, bits, weights, bias, scores, r0, i0, first, last, add
        )
    elif rest == 2:
        scores_codes_tile_2(
            codes, base, stride, bits, weights, bias, scores, r0, i0, first, last, add
        )
    elif rest == 1:
        scores_codes_tile_1(
            codes, base, stride, bits, weights, bias, scores, r0, i0, first, last, add
        )


@njit(inline="always")
def _scores_tokens(view, flat, token_at, q, run_sums, scales, mins, stride, scores, rows, width):
    """scores[r, :width] = q[r] . keys read from their per-token codes (positions token_at,
    params scales/mins as :func:`_block_params` leaves them, ``stride`` a token; run_sums:
    q summed over each 32-channel run): tiles of 4 rows (and one of the 1-3 left)."""
    dim = q.shape[1]
    group = min(view.group, dim)
    runs = group // RUN
    bits = view.bits
    codes = flat.codes
    rest = rows % 4
    for r0 in range(0, rows - rest, 4):
        scores_tokens_tile(
            codes, token_at, bits, q, run_sums, scales, mins, stride, runs, scores, r0, width
        )
    r0 = rows - rest
    if rest == 3:
        scores_tokens_tile_3(
            codes, token_at, bits, q, run_sums, scales, mins, stride, runs, scores, r0, width
        )
    elif rest == 2:
        scores_tokens_tile_2(
            codes, token_at, bits, q, run_sums, scales, mins, stride, runs, scores, r0, width
        )
    elif rest == 1:
        scores_tokens_tile_1(
            codes, token_at, bits, q, run_sums, scales, mins, stride, runs, scores, r0, width
        )


@njit(inline="always")
def _scores_rows(residual, head, q, scores, rows, lo, hi, offset):
    """scores[r, i] = q[r] . residual[head, i - offset] for tokens lo <= i < hi (float32
    token-major keys: one contiguous dot product each)."""
    dim = q.shape[1]
    for i in range(lo, hi):
        key = residual[head, i - offset]
        for r in range(rows):
            total = np.float32(0.0)
            for d in range(dim):
                total += q[r, d] * key[d]
            scores[r, i] = total


@njit(inline="always")
def _accumulate_rows(residual, head, scores, acc, rows, lo, hi, offset):
    """acc[r] += scores[r, i] * residual[head, i - offset] for tokens lo <= i < hi (float32
    token-major values)."""
    dim = acc.shape[1]
    for i in range(lo, hi):
        value_row = residual[head, i - offset]
        for r in range(rows):
            p = scores[r, i]
            acc_row = acc[r]
            for d in range(dim):
                acc_row[d] += p * value_row[d]


@njit(inline="always")
def _accumulate(scores, values, acc, rows, width):
    """acc[r] += scores[r, :width] @ values[:width] for every row: tiles of 4 rows (and one
    of the 1-3 left) by 64 columns when head_dim is a multiple of 64, else plain loops."""
    dim = acc.shape[1]
    if dim % 64 == 0:
        rest = rows % 4
        for c0 in range(0, dim, 64):
            for r0 in range(0, rows - rest, 4):
                values_tile(scores, values, acc, r0, width, c0)
            r0 = rows - rest
            if rest == 3:
                values_tile_3(scores, values, acc, r0, width, c0)
            elif rest == 2:
                values_tile_2(scores, values, acc, r0, width, c0)
            elif rest == 1:
                values_tile_1(scores, values, acc, r0, width, c0)
        return
    for r in range(rows):
        acc_row = acc[r]
        for t in range(width):
            p = scores[r, t]
            value_row = values[t]
            for d in range(dim):
                acc_row[d] += p * value_row[d]


@njit(inline="always")  # per block and head: a call costs ~10% at GQA 1
def _token_offsets(view, flat, head, first, count, dim, token_at):
    """token_at[t] = index in ``flat.codes`` of the first code of per-token position
    first + t of ``head`` (t < count; all quantized and held)."""
    chunk = view.chunk
    index = first // chunk
    inner = first - index * chunk
    slot = index % view.slots
    for t in range(count):
        token_at[t] = slot * flat.codes_row + (head * chunk + inner) * dim
        inner += 1
        if inner == chunk:
            inner = 0
            slot += 1
            if slot == view.slots:
                slot = 0


@njit(inline="always")
def _accumulate_codes(view, flat, token_at, scores, scales, mins, stride, acc, rows, width):
    """acc[r] += scores[r, :width] @ values, the values read from their per-token codes
    (positions token_at, params scales/mins as :func:`_block_params` leaves them, ``stride``
    a token): tiles of 4 rows (and one of the 1-3 left) by 64 columns that decode the codes
    in registers."""
    dim = acc.shape[1]
    group = min(view.group, dim)
    runs = group // RUN
    bits = view.bits
    codes = flat.codes
    rest = rows % 4
    for c0 in range(0, dim, 64):
        for r0 in range(0, rows - rest, 4):
            values_codes_tile(
                codes, token_at, bits, scores, scales, mins, stride, runs, acc, r0, 0, width, c0
            )
        r0 = rows - rest
        if rest == 3:
            values_codes_tile_3(
                codes, token_at, bits, scores, scales, mins, stride, runs, acc, r0, 0, width, c0
            )
        elif rest == 2:
            values_codes_tile_2(
                codes, token_at, bits, scores, scales, mins, stride, runs, acc, r0, 0, width, c0
            )
        elif rest == 1:
            values_codes_tile_1(
                codes, token_at, bits, scores, scales, mins, stride, runs, acc, r0, 0, width, c0
            )


@njit(inline="always")
def _merge_row(part_max, part_sum, part_acc, sinks, t_q, splits, out, head, r, weights):
    """out[head, r] = the softmax of the splits' partials of one row, with its sink, in
    float64 (zeros for a row that sees nothing)."""
    dim = out.shape[2]
    top = sinks[head, r // t_q]
    for split in range(splits):
        top = max(top, np.float64(part_max[head * splits + split, r]))
    if top == -np.inf:
        for d in range(dim):
            out[head, r, d] = 0.0
        return
    total = 0.0
    if sinks[head, r // t_q] > -np.inf:
        total = np.exp(sinks[head, r // t_q] - top)
    for split in range(splits):
        m = np.float64(part_max[head * splits + split, r])
        w = np.exp(m - top) if m > -np.inf else 0.0
        weights[split] = w
        total += w * np.float64(part_sum[head * splits + split, r])
    scale = 1.0 / total if total > 0 else 1.0
    if splits == 1:  # one loop over the row (a loop over one split per value was 4x slower)
        weight = weights[0] * scale
        acc_row = part_acc[head, r]
        out_row = out[head, r]
        for d in range(dim):
            out_row[d] = np.float32(np.float64(acc_row[d]) * weight)
        return
    for d in range(dim):
        a = 0.0
        for split in range(splits):
            a += weights[split] * np.float64(part_acc[head * splits + split, r, d])
        out[head, r, d] = np.float32(a * scale)


_MERGE_PARALLEL = 1 << 16  # merge work (rows x splits x head_dim) worth a parallel loop


@njit(cache=True, fastmath=_FASTMATH)
def _attend_task(
    task, queries, first_held, end_position, origin, block, splits, head_groups, k, v,
    row_first, row_last, part_max, part_sum, part_acc,
):  # fmt: skip
    """Task ``task`` of :func:`attention_blocks`: its range of blocks through its group of KV
    heads, written to the partials. Compiled apart from the parallel loop (called from it,
    not inlined): Numba's parfor passes then see a loop of one call instead of the whole
    body (with the other parts, the first compile went from about 180 s to 110-130 s)."""
    kv_heads, rows, dim = queries.shape
    n_blocks = (end_position - origin + block - 1) // block
    per_split = (n_blocks + splits - 1) // splits
    k_chunk = k.chunk
    chunk_keys = k.per_channel and block % k_chunk == 0 and origin % k_chunk == 0
    # per-channel values: whole chunks decoded as keys are, then transposed to token-major
    v_chunk = v.chunk
    chunk_values = (
        v.per_channel
        and block % v_chunk == 0
        and origin % v_chunk == 0
        and v_chunk % 16 == 0
        and dim % 16 == 0
    )
    # keys held before RoPE are decoded to scratch and turned back there (never fused)
    rope = k.rope_cos.shape[0] > 0
    # per-channel chunks of one token group, few rows: scores straight from the key codes
    k_fused = chunk_keys and k_chunk == RUN and k.group >= RUN and rows <= 4 and not rope
    # per-token keys: scores from the codes (one lane sum per token)
    k_tokens = rows <= 4 and not rope
    k_vector = _vector_tokens(k, dim)
    v_vector = _vector_tokens(v, dim)
    # values accumulated from their codes; with more than 4 rows the tiles decode each code
    # once per 4 rows, which for 3-bit codes (the costliest decode: they straddle bytes) is
    # slower than one decode to scratch (GPT-OSS's 8 rows, q3: 0.92x; q2, q4, q8: 0.99-1.10x
    # with AVX-512). With AVX2 (16 registers: the tiles take their columns in passes) 8 rows
    # run faster from scratch for every width (GPT-OSS q4, one thread: 985 -> 766 ns a token).
    # Beyond 8 rows (prefill chunks: a GQA group times t_q) scratch wins with AVX-512 too: the
    # tiles would decode each code rows / 4 times (SmolLM2, t_q 128 over 4K, q4: 13.8 ms)
    v_fused = v_vector and dim % 64 == 0 and (rows <= 4 or (v.bits != 3 and _WIDE and rows <= 8))
    k_flat = _flat(k)
    v_flat = _flat(v)
    # keys of per-channel widths: each channel's centre, 2 ** (its width - 1)
    mixed_k = k.channel_bits.shape[0] > 0
    centres = np.empty((kv_heads, dim), np.float32)
    for head in range(kv_heads):
        for d in range(dim):
            width_bits = k.channel_bits[head * dim + d] if mixed_k else k.bits
            centres[head, d] = np.float32(1 << (width_bits - 1))
    heads_per_task = (kv_heads + head_groups - 1) // head_groups
    split = task // head_groups
    first_head = (task % head_groups) * heads_per_task
    last_head = min(kv_heads, first_head + heads_per_task)
    all_max = np.full((kv_heads, rows), _NEG_INF, np.float32)
    all_sum = np.zeros((kv_heads, rows), np.float32)
    all_acc = np.zeros((kv_heads, rows, dim), np.float32)
    keys = np.empty((dim, block), np.float32)  # channel-major
    keys_tok = np.empty((block, dim), np.float32)  # token-major (per-token keys)
    values = np.empty((block, dim), np.float32)  # token-major
    keys_flat = keys.reshape(dim * block)
    keys_tok_flat = keys_tok.reshape(block * dim)
    values_flat = values.reshape(block * dim)
    scores = np.empty((rows, block), np.float32)
    scratch = np.empty(max(k_chunk, v_chunk, dim), np.float32)
    # params are widened 16 a store: every params scratch has 16 floats to spare
    channel_scales = np.empty(dim + 16, np.float32)
    channel_mins = np.empty(dim + 16, np.float32)
    codes = np.empty(dim, np.float32)
    scales = np.empty(dim, np.float32)
    mins = np.empty(dim, np.float32)
    value = np.empty(dim, np.float32)
    group_scales = np.empty(block * max(1, dim // RUN) + 16, np.float32)  # per-token params
    group_mins = np.empty(block * max(1, dim // RUN) + 16, np.float32)
    # the params and code offsets of the blocks' per-token codes the tiles read: K 0, V 1;
    # one token a slot row, every head of the task's (rounded out to super-groups)
    k_groups = 1 if k.per_channel else -(-dim // max(1, min(k.group, dim)))
    v_groups = 1 if v.per_channel else -(-dim // max(1, min(v.group, dim)))
    per_token = heads_per_task * max(k_groups, v_groups) + 2 * SUPER_GROUPS
    token_scales = np.empty((2, block * per_token + 16), np.float32)
    token_mins = np.empty((2, block * per_token + 16), np.float32)
    param_stride = np.zeros(2, np.int64)  # params a token in token_scales[side]
    param_at = np.zeros(2, np.int64)  # the head's first param there
    param_base = np.zeros(2, np.int64)  # the first param of the row staged
    staged_block = np.full(2, -1, np.int64)  # the block whose params are staged
    staged = np.empty(2 * SUPER_GROUPS, np.float32)
    token_at = np.empty((2, block), np.int64)
    folded = np.empty((rows, dim), np.float32)  # q times the channel scales of a chunk
    bias = np.empty(rows, np.float32)  # q . the channel mins of a chunk
    run_sums = np.empty((rows, max(1, dim // RUN)), np.float32)  # q summed per 32 channels
    last_block = min(n_blocks, (split + 1) * per_split)
    touched = 0
    for b in range(split * per_split, last_block):
        start = origin + b * block
        width = min(block, end_position - start)
        # every head of the block in turn: a slot row holds all heads, so the block's
        # codes stream through the cache once, whole lines and pages at a time
        if last_head - first_head > 1:
            touched += _touch(k, k_flat, start, width) + _touch(v, v_flat, start, width)
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
            # --- keys of the block: scores from their codes, or dequantized into scratch ---
            t = dropped
            k_residual = k.chunks * k_chunk - start  # block offset of the float32 tail
            fused_k = k_fused and dropped == 0
            if fused_k:
                t = width  # nothing left for the scratch path
                halves = centres[head]  # the tile takes codes centred
                # a decode step's last block: its whole chunks from their codes, the keys
                # waiting for their group (float32, token-major) one dot product each
                _scores_rows(
                    k.residual, head, q, scores, rows, max(0, k_residual), width, k_residual
                )
                for i0 in range(0, min(width, k_residual), RUN):
                    index = (start + i0) // k_chunk
                    _channel_params(k, k_flat, head, index, dim, channel_scales, channel_mins)
                    for r in range(rows):
                        offset = np.float32(0.0)
                        for d in range(dim):
                            folded[r, d] = q[r, d] * channel_scales[d]
                            offset += q[r, d] * (channel_mins[d] + channel_scales[d] * halves[d])
                        bias[r] = offset
                    row_byte = (index % k.slots) * k.codes.shape[1]
                    # one run of the head's channels for one width, else a run per width
                    for run in range(max(1, k.channel_runs.shape[1])):
                        first, last = 0, dim
                        width_bits, base = k.bits, row_byte + head * dim * k_chunk * k.bits // 8
                        if mixed_k:
                            first = 0 if run == 0 else k.channel_runs[head, run - 1]
                            last = k.channel_runs[head, run]
                            if last <= first:
                                break
                            width_bits = k.channel_bits[head * dim + first]
                            base = row_byte + k.channel_at[head * dim + first]
                        _scores_codes(
                            k_flat.codes, base, k_chunk, width_bits, folded, bias, scores, rows,
                            i0, first, last, run,
                        )  # fmt: skip
            # per-token codes the tiles read (every token of the block quantized, few rows):
            # their params and offsets, K's and V's from one call site (each inlined copy
            # costs seconds of compile time)
            k_codes = k_vector and k_tokens and t == 0 and width <= k_residual
            # values: the block's quantized tokens from their codes, the rest (a decode step's
            # values waiting for their chunk) from the float32 residual
            v_residual = v.chunks * v.chunk - start  # block offset of the float32 tail
            v_coded = min(width, v_residual)
            v_codes = v_fused and dropped == 0
            for side in range(2):
                count = width if side == 0 else v_coded
                if (k_codes if side == 0 else v_codes) and count > 0:
                    view = k if side == 0 else v
                    flat = k_flat if side == 0 else v_flat
                    groups = dim // min(view.group, dim)
                    if view.chunk != 1:  # the head's params alone
                        _token_params(
                            view, flat, head, start, count, groups, token_scales[side],
                            token_mins[side], staged,
                        )  # fmt: skip
                        param_stride[side] = groups
                        param_at[side] = 0
                    else:  # every head's of the task at the block's first head, then read
                        if staged_block[side] != b:
                            stride, base = _block_params(
                                view, flat, start, count, first_head * groups,
                                last_head * groups, token_scales[side], token_mins[side],
                            )  # fmt: skip
                            staged_block[side] = b
                            param_stride[side] = stride
                            param_base[side] = base
                        param_at[side] = head * groups - param_base[side]
                    _token_offsets(view, flat, head, start, count, dim, token_at[side])
            if k_codes:  # scores straight from the codes
                fused_k = True
                t = width
                for r in range(rows):
                    for j in range(dim // RUN):
                        total = np.float32(0.0)
                        for d in range(j * RUN, (j + 1) * RUN):
                            total += q[r, d]
                        run_sums[r, j] = total
                _scores_tokens(
                    k, k_flat, token_at[0], q, run_sums, token_scales[0][param_at[0] :],
                    token_mins[0][param_at[0] :], param_stride[0], scores, rows, width,
                )  # fmt: skip
            if k_vector:  # per-token codes, 32 a vector operation, then transposed
                coded = max(t, min(width, k_residual))
                if coded > t:
                    _token_rows(  # k_vector, not True: a literal is another signature
                        k, k_flat, k_vector, head, start + t, coded - t, dim, keys_tok,
                        keys_tok_flat, t, group_scales, group_mins, staged,
                    )  # fmt: skip
                    for i0 in range(t, coded - 15, 16):  # 16 x 16 register transposes
                        for d0 in range(0, dim, 16):
                            transpose_16(keys_tok, keys, i0, d0)
                    for i in range(coded - (coded - t) % 16, coded):
                        for d in range(dim):
                            keys[d, i] = keys_tok[i, d]
                    t = coded
            while t < width:
                if t >= k_residual:  # the rest of the block is residual: copied
                    for i in range(t, width):
                        for d in range(dim):
                            keys[d, i] = k.residual[head, i - k_residual, d]
                    break
                index = (start + t) // k_chunk
                aligned = (start + t) % k_chunk == 0
                if chunk_keys and aligned and index < k.chunks and t + k_chunk <= width:
                    _dequantize_chunk_keys(
                        k, k_flat, head, index, t, dim, keys, keys_flat, scratch,
                        channel_scales, channel_mins,
                    )  # fmt: skip
                    t += k_chunk
                else:
                    _decode_token_major(
                        k, k_flat, head, start + t, dim, codes, scales, mins, value
                    )
                    for d in range(dim):
                        keys[d, t] = value[d]
                    t += 1
            if rope:  # keys held before RoPE: turned by their positions' angles
                _turn_keys(keys, k.rope_cos, k.rope_sin, start, width)
            # --- scores = q . keys ---
            if not fused_k:
                _scores(keys, q, scores, rows, width)
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
            # --- values of the block: from their codes, or dequantized into scratch ---
            quantized_v = dropped
            fused = False
            if not v.per_channel:
                quantized_v = max(dropped, v_coded)
                fused = v_codes
                if fused:  # decoded in registers, never stored; the residual read as it is
                    if v_coded > 0:
                        _accumulate_codes(
                            v, v_flat, token_at[1], scores, token_scales[1][param_at[1] :],
                            token_mins[1][param_at[1] :], param_stride[1], acc, rows, v_coded,
                        )  # fmt: skip
                    _accumulate_rows(
                        v.residual, head, scores, acc, rows, max(0, v_coded), width, v_residual
                    )
                elif quantized_v > dropped:
                    _token_rows(
                        v, v_flat, v_vector, head, start + dropped, quantized_v - dropped,
                        dim, values, values_flat, dropped, group_scales, group_mins, staged,
                    )  # fmt: skip
            if v.per_channel:  # whole chunks via the channel-major scratch, the rest a token
                t = quantized_v
                while t < width:
                    index = (start + t) // v_chunk
                    if (
                        chunk_values
                        and (start + t) % v_chunk == 0
                        and index < v.chunks
                        and t + v_chunk <= width
                    ):
                        # the keys' scratch is free once the scores are taken
                        _chunk_values(
                            v, v_flat, head, index, t, dim, keys, keys_flat, values, scratch,
                            channel_scales, channel_mins,
                        )  # fmt: skip
                        t += v_chunk
                    else:
                        _decode_token_major(
                            v, v_flat, head, start + t, dim, codes, scales, mins, values[t]
                        )
                        t += 1
            elif not fused:  # the rest of the block is residual: copied
                for t in range(quantized_v, width):
                    for d in range(dim):
                        values[t, d] = v.residual[head, t - v_residual, d]
            # --- acc += p . values ---
            if not fused:
                _accumulate(scores, values, acc, rows, width)
    scratch[0] = np.float32(touched & 1)  # keeps the touching loads
    for head in range(first_head, last_head):
        partial = head * splits + split
        for r in range(rows):
            part_max[partial, r] = all_max[head, r]
            part_sum[partial, r] = all_sum[head, r]
            for d in range(dim):
                part_acc[partial, r, d] = all_acc[head, r, d]


@njit(inline="always")
def _hadamard(x, dim):
    """x <- x @ H in place for float32 x (dim,), H the Sylvester Hadamard matrix of order dim
    (a power of two), unnormalised: dim x log2(dim) additions (fast Walsh-Hadamard). From 8
    on, the first three stages run within each 8 values in registers and the rest 8 lanes at a
    time (2.5x faster than a butterfly at a time: 32 rows of 128, 21 -> 8 us on an AVX2 Zen 3)."""
    if dim < 8:
        h = 1
        while h < dim:
            for i in range(0, dim, 2 * h):
                for j in range(i, i + h):
                    a = x[j]
                    b = x[j + h]
                    x[j] = a + b
                    x[j + h] = a - b
            h *= 2
        return
    for i in range(0, dim, 8):
        a0, a1, a2, a3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        a4, a5, a6, a7 = x[i + 4], x[i + 5], x[i + 6], x[i + 7]
        b0, b1, b2, b3 = a0 + a1, a0 - a1, a2 + a3, a2 - a3
        b4, b5, b6, b7 = a4 + a5, a4 - a5, a6 + a7, a6 - a7
        c0, c1, c2, c3 = b0 + b2, b1 + b3, b0 - b2, b1 - b3
        c4, c5, c6, c7 = b4 + b6, b5 + b7, b4 - b6, b5 - b7
        x[i], x[i + 1], x[i + 2], x[i + 3] = c0 + c4, c1 + c5, c2 + c6, c3 + c7
        x[i + 4], x[i + 5], x[i + 6], x[i + 7] = c0 - c4, c1 - c5, c2 - c6, c3 - c7
    h = 8
    while h < dim:
        for i in range(0, dim, 2 * h):
            for j in range(i, i + h, 8):
                for lane in range(8):
                    a = x[j + lane]
                    b = x[j + h + lane]
                    x[j + lane] = a + b
                    x[j + h + lane] = a - b
        h *= 2


@njit(inline="always")
def _scale_row(queries, signs, factor, rows, head, r, order):
    """rows[head, r] = queries[head, r] @ R * factor for the rotation R = diag(signs) H /
    sqrt(dim) (``factor`` holds the 1 / sqrt(dim)), or queries[head, r] * factor where signs
    is empty, channel j taken from channel order[head * dim + j] when ``order`` is not empty
    (keys of per-channel widths, held widest first; they never rotate); 1 when a result is
    not finite, else 0."""
    dim = queries.shape[2]
    target = rows[head, r]
    if order.shape[0] > 0:
        for d in range(dim):
            target[d] = queries[head, r, order[head * dim + d]] * factor
    elif signs.shape[0] == 0:
        for d in range(dim):
            target[d] = queries[head, r, d] * factor
    else:
        for d in range(dim):
            target[d] = queries[head, r, d] * signs[d]
        _hadamard(target, dim)
        for d in range(dim):
            target[d] *= factor
    bad = 0
    for d in range(dim):
        if not np.isfinite(target[d]):
            bad = 1
    return bad


@njit(inline="always")
def _unorder_row(out, order, head, r, held):
    """out[head, r, order[head * dim + j]] = out[head, r, j]: values of per-channel widths,
    held widest first, back in the model's channel order (``held``: float32 (dim) scratch)."""
    dim = out.shape[2]
    for d in range(dim):
        held[d] = out[head, r, d]
    for d in range(dim):
        out[head, r, order[head * dim + d]] = held[d]


@njit(inline="always")
def _unrotate_row(out, signs, factor, head, r):
    """out[head, r] = out[head, r] @ R.T = (out[head, r] @ H) * signs * factor, for the
    rotation R = diag(signs) H / sqrt(dim) (factor 1 / sqrt(dim))."""
    dim = out.shape[2]
    row = out[head, r]
    _hadamard(row, dim)
    for d in range(dim):
        row[d] *= signs[d] * factor


_ROWS_PARALLEL = 1 << 16  # rows x head_dim (q scaling, the rotations) worth a prange


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def attention_blocks(
    queries, q_signs, q_factor, t_q, query_end, causal, window, first_visible, first_held,
    end_position, origin, block, splits, head_groups, k, v, sinks, merge, exact_from,
    exact_stop, k_exact, v_exact, exact_sinks, v_signs, v_factor, rows, part_max, part_sum,
    part_acc, out,
):  # fmt: skip
    """Softmax attention of ``queries`` over two streams ``k`` and ``v`` (the fields of a
    :class:`StreamView` as a plain tuple: Numba types a plain tuple argument in C, a named
    one in Python, about 2.7 us per call). Returns 0, or the number of query rows whose
    scaled values are not finite (then nothing else is computed).

    queries: float32 (kv_heads, rows, head_dim) as the model made them; the kernel's
    ``rows`` (same shape) receive ``queries @ R * q_factor`` for the keys' Hadamard rotation
    R = diag(q_signs) H / sqrt(head_dim) (q_factor: the scale over sqrt(head_dim)), or,
    with an empty ``q_signs``, ``queries * q_factor``. Rows are (group, t_q)
    group-major, and query token j sits at position query_end - t_q + j. It sees positions
    from max(first_visible, position - window + 1) (no window when window is 0) up to its own
    (``causal``) or end_position - 1. Blocks of ``block`` tokens start at ``origin`` and run
    to ``end_position``; positions before ``first_held`` were dropped by a window. sinks:
    float64 (kv_heads, group) logits (-inf: none). ``splits * head_groups`` parallel tasks
    each take a contiguous range of blocks through their group of KV heads, writing partials
    t = head * splits + split to part_max, part_sum float32 (kv_heads * splits, rows) and
    part_acc float32 (kv_heads * splits, rows, head_dim); they are merged into out float32
    (kv_heads, rows, head_dim). With ``merge``, the exact sink tokens at positions
    exact_from .. exact_stop - 1 of ``k_exact``/``v_exact`` and the logits ``exact_sinks``
    join in float64 (``merge_sink_tokens``; ``sinks`` is then -inf). Last, with ``v_signs``
    (not empty), each output row is turned back by the values' rotation (``v_factor``:
    1 / sqrt(head_dim)). Rotations run as fast Walsh-Hadamard transforms.

    Each block is dequantized into L1 scratch once per KV head and shared by all its query
    rows, then scores and values are two small matrix products with register-tiled loops.
    """
    kv_heads, n_rows, dim = queries.shape
    k = StreamView(*k)
    v = StreamView(*v)
    large = kv_heads * n_rows * dim >= _ROWS_PARALLEL
    bad = 0
    if large:
        for index in prange(kv_heads * n_rows):
            bad += _scale_row(
                queries, q_signs, q_factor, rows, index // n_rows, index % n_rows,
                k.channel_order,
            )  # fmt: skip
    else:
        for index in range(kv_heads * n_rows):
            bad += _scale_row(
                queries, q_signs, q_factor, rows, index // n_rows, index % n_rows,
                k.channel_order,
            )  # fmt: skip
    if bad:
        return bad
    row_first = np.empty(n_rows, np.int64)
    row_last = np.empty(n_rows, np.int64)
    for r in range(n_rows):
        position = query_end - t_q + r % t_q
        row_first[r] = max(first_visible, position - window + 1) if window > 0 else first_visible
        row_last[r] = position if causal else end_position - 1
    for task in prange(splits * head_groups):
        _attend_task(  # task as int64: prange's index may be uint64, another signature
            np.int64(task), rows, first_held, end_position, origin, block, splits, head_groups,
            k, v, row_first, row_last, part_max, part_sum, part_acc,
        )  # fmt: skip
    # --- merge the splits' partial softmaxes (float64) ---
    weights = np.empty((kv_heads * n_rows, splits), np.float64)
    if kv_heads * n_rows * splits * dim >= _MERGE_PARALLEL:
        for index in prange(kv_heads * n_rows):
            _merge_row(
                part_max, part_sum, part_acc, sinks, t_q, splits, out,
                index // n_rows, index % n_rows, weights[index],
            )  # fmt: skip
    else:
        for index in range(kv_heads * n_rows):
            _merge_row(
                part_max, part_sum, part_acc, sinks, t_q, splits, out,
                index // n_rows, index % n_rows, weights[index],
            )  # fmt: skip
    if merge:  # the exact sink tokens before the first position read from codes
        merge_sink_tokens(
            rows, t_q, query_end, causal, window, exact_from, exact_stop, k_exact, v_exact,
            exact_sinks, part_max, part_sum, splits, out,
        )  # fmt: skip
    if v_signs.shape[0]:
        if large:
            for index in prange(kv_heads * n_rows):
                _unrotate_row(out, v_signs, v_factor, index // n_rows, index % n_rows)
        else:
            for index in range(kv_heads * n_rows):
                _unrotate_row(out, v_signs, v_factor, index // n_rows, index % n_rows)
    if v.channel_order.shape[0]:  # values of per-channel widths: back in the model's order
        held = np.empty(dim, np.float32)
        for index in range(kv_heads * n_rows):
            _unorder_row(out, v.channel_order, index // n_rows, index % n_rows, held)
    return 0
