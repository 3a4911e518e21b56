"""Register-blocked tiles for attention's two small products, as LLVM vector code.

Numba's loops keep accumulators in memory (a load and a store per fused multiply-add), which
held attention's products to ~20 GMAC/s here. These intrinsics keep a tile of accumulators in
vector registers across the whole reduction loop:

- ``scores_tile(keys, q, scores, r0, i0)``: for query rows r0..r0+3 and tokens i0..i0+31,
  ``scores[r, i] = sum_d q[r, d] * keys[d, i]`` (8 accumulators of 16 floats);
- ``values_tile(weights, values, acc, r0, width, c0)``: for rows r0..r0+3 and the 64 columns
  c0..c0+63 of head_dim, ``acc[r, c] += sum_t weights[r, t] * values[t, c]`` (16
  accumulators).

For 1-4 query rows per KV head, three tiles read K/V codes themselves (decoded in registers
as ``_unpack.py`` does, never stored): ``values_codes_tile`` (per-token value codes),
``scores_codes_tile`` (32 tokens of per-channel key codes, a run of channels of one width
at a time, so keys of per-channel widths take one call per width) and ``scores_tokens_tile``
(per-token key codes, one sum of lanes per token and row).

``scores_tile_n`` and ``values_tile_n`` (and the code tiles' ``_n``) are the same for
n = 1..3 rows (a GQA group of 1-3 rows, or the rows left after tiles of 4).

A tile's accumulators must fit the register file: AVX-512's 32 registers hold a 4 x 64 tile
(16 accumulators of 16 floats), AVX2's 16 hold a quarter of it. So each tile takes its
columns in passes of at most ``ACCUMULATORS`` 16-float accumulators (16 with AVX-512, 4
with AVX2), one reduction loop per pass. A code tile's decoder width is switched once
before its loops, one copy of the loops per width.

Arrays are 2-D C-contiguous float32 (codes uint8, offsets int64, params float32 1-D);
callers guarantee the tile lies inside them.
"""

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import config
from numba.extending import intrinsic

from kvq.kernels._simd import _is_array
from kvq.kernels._unpack import CHANNEL_WIDTHS, CODE_WIDTHS, _emit_codes, fma_function

_f32 = ir.FloatType()
_i32 = ir.IntType(32)
_i64 = ir.IntType(64)
_v16 = ir.VectorType(_f32, 16)


def _wide_registers() -> bool:
    """Whether the CPU Numba compiles for has AVX-512 (``NUMBA_CPU_FEATURES`` when set, else
    the host's): thirty-two 16-float registers, against AVX2's sixteen 8-float ones."""
    if config.CPU_FEATURES is not None:
        return "+avx512f" in config.CPU_FEATURES.split(",")
    if config.CPU_NAME is not None:  # a named CPU without features: assume the narrow file
        return False
    return bool(llvm.get_host_cpu_features().get("avx512f", False))


# 16-float accumulators a tile keeps in registers at once. AVX-512 holds one in a register:
# a tile of 4 rows by 64 columns (16) fits its 32. AVX2 splits each over two of its 16, so a
# tile takes its columns in passes of at most 4 accumulators (8 registers; the rest hold the
# loads and the broadcast); in one pass, LLVM spilled every accumulator to the stack (a load
# and a store per FMA).
ACCUMULATORS = 16 if _wide_registers() else 4


def _pass_vectors(count: int, fits: int) -> int:
    """16-float column vectors per pass of a tile of ``count`` rows (at least 1)."""
    return max(1, fits // count)


def _fma(module):
    return fma_function(module, 16)


def _splat(builder, scalar):
    undefined = ir.Constant(_v16, ir.Undefined)
    first = builder.insert_element(undefined, scalar, ir.Constant(_i32, 0))
    return builder.shuffle_vector(first, undefined, ir.Constant(ir.VectorType(_i32, 16), [0] * 16))


def _array(context, builder, array_type, value):
    """(data pointer, row stride in elements) of a 2-D C-contiguous array."""
    array = context.make_array(array_type)(context, builder, value)
    shape = builder.extract_value(array.shape, 1)
    return array.data, shape, builder.extract_value(array.shape, 0)


def _vector_at(builder, data, index):
    return builder.bitcast(builder.gep(data, [index]), _v16.as_pointer())


def _is_matrix(value) -> bool:
    return (
        isinstance(value, types.Array)
        and value.dtype == types.float32
        and value.ndim == 2
        and value.layout == "C"
    )


def _emit_tile(builder, a, b, out, row0, col0, steps, count, vectors, accumulate, name, fits):
    """IR of a register tile: for rows r < count and the ``16 * vectors`` columns from col0,
    ``out[row0 + r, col] (+)= sum_k a[row0 + r, k] * b[k, col]`` over k < steps (steps >= 1);
    ``a``, ``b``, ``out``: (data pointer, row stride) of C-contiguous float32 matrices. The
    accumulators stay in registers (phi nodes) through the whole loop: the columns are taken
    in passes of at most ``fits`` accumulators (:func:`_pass_vectors`), one reduction loop
    each; ``accumulate`` adds them to ``out``, else they overwrite it."""
    step = _pass_vectors(count, fits)
    for first in range(0, vectors, step):
        _emit_tile_pass(
            builder, a, b, out, row0, col0, steps, count, range(first, min(vectors, first + step)),
            accumulate, f"{name}.{first}",
        )  # fmt: skip


def _open_loop(builder, name, start, keys):
    """Open a counted loop block ``name``: (counter phi from ``start``, {key: a 16-float
    accumulator phi from zero}, the entry block, the loop block, the block after it)."""
    entry = builder.basic_block
    loop = builder.append_basic_block(f"{name}.loop")
    done = builder.append_basic_block(f"{name}.done")
    builder.branch(loop)
    builder.position_at_end(loop)
    counter = builder.phi(_i64)
    counter.add_incoming(start, entry)
    accs = {key: builder.phi(_v16) for key in keys}
    zero = ir.Constant(_v16, [0.0] * 16)
    for acc in accs.values():
        acc.add_incoming(zero, entry)
    return counter, accs, entry, loop, done


def _close_loop(builder, counter, stop, loop, done, phis):
    """Close a loop from :func:`_open_loop`: counter + 1 and each (phi, its new value) of
    ``phis`` flow back; the loop runs while counter + 1 < ``stop``, then ``done`` follows."""
    following = builder.add(counter, ir.Constant(_i64, 1))
    body_end = builder.basic_block
    counter.add_incoming(following, body_end)
    for phi, value in phis:
        phi.add_incoming(value, body_end)
    builder.cbranch(builder.icmp_signed("<", following, stop), loop, done)
    builder.position_at_end(done)


def _emit_tile_pass(builder, a, b, out, row0, col0, steps, count, columns, accumulate, name):
    """One pass of :func:`_emit_tile`: the 16-float column vectors ``columns``."""
    (a_data, a_stride), (b_data, b_stride), (out_data, out_stride) = a, b, out
    fma = _fma(builder.module)
    vectors = len(columns)
    start = ir.Constant(_i64, 0)
    k, phis, _, loop, done = _open_loop(builder, name, start, range(count * vectors))
    accs = list(phis.values())
    b_base = builder.add(builder.mul(k, b_stride), col0)
    loaded = [
        builder.load(
            _vector_at(builder, b_data, builder.add(b_base, ir.Constant(_i64, 16 * c))), align=4
        )
        for c in columns
    ]
    updated = []
    for r in range(count):
        row = builder.add(row0, ir.Constant(_i64, r))
        weight = builder.load(builder.gep(a_data, [builder.add(builder.mul(row, a_stride), k)]))
        broadcast = _splat(builder, weight)
        for c in range(vectors):
            updated.append(builder.call(fma, [broadcast, loaded[c], accs[vectors * r + c]]))
    _close_loop(builder, k, steps, loop, done, zip(accs, updated, strict=True))
    for r in range(count):
        row = builder.add(row0, ir.Constant(_i64, r))
        base = builder.add(builder.mul(row, out_stride), col0)
        for c, column in enumerate(columns):
            at = builder.add(base, ir.Constant(_i64, 16 * column))
            pointer = _vector_at(builder, out_data, at)
            value = updated[vectors * r + c]
            if accumulate:
                value = builder.fadd(builder.load(pointer, align=4), value)
            builder.store(value, pointer, align=4)


def _make_scores_tile(count: int, fits: int = ACCUMULATORS):
    @intrinsic
    def scores_tile(typingctx, keys, q, scores, r0, i0):
        """scores[r0:r0+count, i0:i0+32] = q[r0:r0+count, :] @ keys[:, i0:i0+32]."""
        if not (_is_matrix(keys) and _is_matrix(q) and _is_matrix(scores)):
            return None

        def codegen(context, builder, signature, args):
            keys_value, q_value, scores_value, row0, col0 = args
            k_type, q_type, s_type = signature.args[:3]
            k_data, k_stride, dim = _array(context, builder, k_type, keys_value)
            q_data, q_stride, _ = _array(context, builder, q_type, q_value)
            s_data, s_stride, _ = _array(context, builder, s_type, scores_value)
            _emit_tile(
                builder, (q_data, q_stride), (k_data, k_stride), (s_data, s_stride), row0, col0,
                dim, count, 2, False, "scores", fits,
            )  # fmt: skip
            return context.get_dummy_value()

        return types.void(keys, q, scores, types.int64, types.int64), codegen

    return scores_tile


def _make_values_tile(count: int, fits: int = ACCUMULATORS):
    @intrinsic
    def values_tile(typingctx, weights, values, acc, r0, width, c0):
        """acc[r0:r0+count, c0:c0+64] += weights[r0:r0+count, :width] @ values[:width,
        c0:c0+64] (width >= 1)."""
        if not (_is_matrix(weights) and _is_matrix(values) and _is_matrix(acc)):
            return None

        def codegen(context, builder, signature, args):
            w_value, v_value, a_value, row0, width_value, col0 = args
            w_type, v_type, a_type = signature.args[:3]
            w_data, w_stride, _ = _array(context, builder, w_type, w_value)
            v_data, v_stride, _ = _array(context, builder, v_type, v_value)
            a_data, a_stride, _ = _array(context, builder, a_type, a_value)
            _emit_tile(
                builder, (w_data, w_stride), (v_data, v_stride), (a_data, a_stride), row0, col0,
                width_value, count, 4, True, "values", fits,
            )  # fmt: skip
            return context.get_dummy_value()

        return types.void(weights, values, acc, types.int64, types.int64, types.int64), codegen

    return values_tile


scores_tile_1, scores_tile_2, scores_tile_3, scores_tile = (
    _make_scores_tile(n) for n in (1, 2, 3, 4)
)
values_tile_1, values_tile_2, values_tile_3, values_tile = (
    _make_values_tile(n) for n in (1, 2, 3, 4)
)


@intrinsic
def transpose_16(typingctx, source, target, t0, d0):
    """target[d0:d0+16, t0:t0+16] = source[t0:t0+16, d0:d0+16].T: sixteen vector loads, four
    rounds of perfect shuffles (interleaving vector i with vector i + 8), sixteen stores."""
    if not (_is_matrix(source) and _is_matrix(target)):
        return None

    def codegen(context, builder, signature, args):
        s_value, t_value, row0, col0 = args
        s_type, t_type = signature.args[:2]
        s_data, s_stride, _ = _array(context, builder, s_type, s_value)
        t_data, t_stride, _ = _array(context, builder, t_type, t_value)
        vectors = []
        for i in range(16):
            row = builder.add(row0, ir.Constant(_i64, i))
            at = builder.add(builder.mul(row, s_stride), col0)
            vectors.append(builder.load(_vector_at(builder, s_data, at), align=4))
        low = ir.Constant(ir.VectorType(_i32, 16), [j // 2 + 16 * (j % 2) for j in range(16)])
        high = ir.Constant(ir.VectorType(_i32, 16), [8 + j // 2 + 16 * (j % 2) for j in range(16)])
        for _ in range(4):
            shuffled = []
            for i in range(8):
                a, b = vectors[i], vectors[i + 8]
                shuffled.append(builder.shuffle_vector(a, b, low))
                shuffled.append(builder.shuffle_vector(a, b, high))
            vectors = shuffled
        for j in range(16):
            row = builder.add(col0, ir.Constant(_i64, j))
            at = builder.add(builder.mul(row, t_stride), row0)
            builder.store(vectors[j], _vector_at(builder, t_data, at), align=4)
        return context.get_dummy_value()

    return types.void(source, target, types.int64, types.int64), codegen


def _per_width(builder, bits_v, emit, widths=CODE_WIDTHS):
    """IR that runs ``emit(builder, width)`` for the code width ``bits_v`` (i64) holds, one
    copy per width of ``widths`` (any other runs as the last): the switch is taken once
    before a tile's loops, not in them (inside, LLVM kept it in every iteration, with its
    constants reloaded: a third of the values tile's instructions)."""
    function = builder.function
    done = function.append_basic_block("width.done")
    cases = {w: function.append_basic_block(f"width.{w}") for w in widths}
    switch = builder.switch(bits_v, cases[widths[-1]])
    for width in widths[:-1]:
        switch.add_case(ir.Constant(_i64, width), cases[width])
    for width, block in cases.items():
        builder.position_at_end(block)
        emit(builder, width)
        builder.branch(done)
    builder.position_at_end(done)


def _decoded_columns(builder, codes_data, base, width, col0, columns):
    """{column: its 16 codes as floats, centred} for the 16-float column vectors ``columns``
    (< 4) of a 64-column tile from code ``base + col0``, ``width`` bits each: a 32-code run
    decoded at once when both its halves are wanted, else 16 codes."""
    decoded = {}
    undefined = ir.Constant(ir.VectorType(_f32, 32), ir.Undefined)
    for c in columns:
        if c in decoded:
            continue
        if c % 2 == 0 and c + 1 in columns:
            index = builder.add(base, builder.add(col0, ir.Constant(_i64, 16 * c)))
            run = _emit_codes(builder, codes_data, index, width, 32, True)
            for half in (0, 1):
                mask = ir.Constant(ir.VectorType(_i32, 16), list(range(16 * half, 16 * half + 16)))
                decoded[c + half] = builder.shuffle_vector(run, undefined, mask)
        else:
            index = builder.add(base, builder.add(col0, ir.Constant(_i64, 16 * c)))
            decoded[c] = _emit_codes(builder, codes_data, index, width, 16, True)
    return decoded


def _emit_values_codes_pass(
    builder, arrays, width, groups_v, runs_v, row0, first, last, col0, count, columns
):  # fmt: skip
    """One pass of ``values_codes_tile`` over the 16-float column vectors ``columns``: a loop
    over tokens first .. last - 1 whose accumulators stay in registers."""
    codes_data, at_data, (w_data, w_stride), s_data, m_data, (a_data, a_stride) = arrays
    # codes arrive centred (minus 2 ** (bits - 1), so the two sums do not both grow with the
    # group's offset): the min becomes the group's centre
    middle = ir.Constant(_f32, float(1 << (width - 1)))
    fma = _fma(builder.module)
    runs = sorted({c // 2 for c in columns})  # the tile's 32-column runs this pass reads
    run0 = builder.sdiv(col0, ir.Constant(_i64, 32))
    group_of = {j: builder.sdiv(builder.add(run0, ir.Constant(_i64, j)), runs_v) for j in runs}
    keys = [(r, c) for r in range(count) for c in columns]
    t, accs, entry, loop, done = _open_loop(builder, "vcodes", first, keys)
    low_sums = {(r, j): builder.phi(_f32) for r in range(count) for j in runs}
    for m in low_sums.values():
        m.add_incoming(ir.Constant(_f32, 0.0), entry)
    local = builder.sub(t, first)
    base = builder.load(builder.gep(at_data, [local]))
    decoded = _decoded_columns(builder, codes_data, base, width, col0, columns)
    group_scales, group_centres = {}, {}
    for j in runs:
        param = builder.add(builder.mul(local, groups_v), group_of[j])
        scale = builder.load(builder.gep(s_data, [param]))
        lowest = builder.load(builder.gep(m_data, [param]))
        group_scales[j] = scale
        group_centres[j] = builder.fadd(lowest, builder.fmul(scale, middle))
    updated, updated_sums = {}, {}
    for r in range(count):
        row = builder.add(row0, ir.Constant(_i64, r))
        p = builder.load(builder.gep(w_data, [builder.add(builder.mul(row, w_stride), t)]))
        for j in runs:
            weight = _splat(builder, builder.fmul(p, group_scales[j]))
            for c in columns:
                if c // 2 == j:
                    updated[r, c] = builder.call(fma, [weight, decoded[c], accs[r, c]])
            low = builder.fadd(low_sums[r, j], builder.fmul(p, group_centres[j]))
            updated_sums[r, j] = low
    phis = [(a, updated[key]) for key, a in accs.items()]
    phis += [(m, updated_sums[key]) for key, m in low_sums.items()]
    _close_loop(builder, t, last, loop, done, phis)
    for r in range(count):
        row = builder.add(row0, ir.Constant(_i64, r))
        out_base = builder.add(builder.mul(row, a_stride), col0)
        for c in columns:
            at = builder.add(out_base, ir.Constant(_i64, 16 * c))
            pointer = _vector_at(builder, a_data, at)
            total = builder.fadd(updated[r, c], _splat(builder, updated_sums[r, c // 2]))
            builder.store(builder.fadd(builder.load(pointer, align=4), total), pointer, align=4)


def _make_values_codes_tile(count: int, fits: int = ACCUMULATORS):
    @intrinsic
    def values_codes_tile(
        typingctx, codes, token_at, bits, weights, scales, mins, groups, group_runs, acc, r0,
        t0, t1, c0,
    ):  # fmt: skip
        """acc[r0:r0+count, c0:c0+64] += sum over t in t0..t1-1 of weights[r, t] * value(t),
        value(t)[c] = mins[j] + scales[j] * code, j = (t - t0) * groups + c // (32 *
        group_runs): token t's code of column c is code token_at[t - t0] + c of ``codes``
        (``bits`` wide). The scale is folded into the weight and the group's centre (min plus
        scale times 2 ** (bits - 1), the codes taken centred) summed apart, so the codes are
        decoded into registers and never stored (t1 > t0)."""
        if not (
            _is_array(codes, types.uint8)
            and _is_array(token_at, types.int64)
            and _is_matrix(weights)
            and _is_array(scales, types.float32)
            and _is_array(mins, types.float32)
            and _is_matrix(acc)
        ):
            return None

        def codegen(context, builder, signature, args):
            (codes_v, at_v, bits_v, w_v, s_v, m_v, groups_v, runs_v, acc_v, row0, first, last,
             col0) = args  # fmt: skip
            types_ = signature.args
            codes_data = context.make_array(types_[0])(context, builder, codes_v).data
            at_data = context.make_array(types_[1])(context, builder, at_v).data
            w_data, w_stride, _ = _array(context, builder, types_[3], w_v)
            s_data = context.make_array(types_[4])(context, builder, s_v).data
            m_data = context.make_array(types_[5])(context, builder, m_v).data
            a_data, a_stride, _ = _array(context, builder, types_[8], acc_v)
            arrays = (codes_data, at_data, (w_data, w_stride), s_data, m_data, (a_data, a_stride))
            step = _pass_vectors(count, fits)

            def emit(builder, width):
                for first_column in range(0, 4, step):
                    _emit_values_codes_pass(
                        builder, arrays, width, groups_v, runs_v, row0, first, last, col0, count,
                        range(first_column, min(4, first_column + step)),
                    )  # fmt: skip

            _per_width(builder, bits_v, emit)
            return context.get_dummy_value()

        return types.void(
            codes, token_at, types.int64, weights, scales, mins, types.int64, types.int64, acc,
            types.int64, types.int64, types.int64, types.int64,
        ), codegen  # fmt: skip

    return values_codes_tile


values_codes_tile_1, values_codes_tile_2, values_codes_tile_3, values_codes_tile = (
    _make_values_codes_tile(n) for n in (1, 2, 3, 4)
)


def _emit_scores_codes_pass(
    builder, arrays, stride_v, width, first_v, last_v, add_v, row0, col0, count, halves
):  # fmt: skip
    """One pass of ``scores_codes_tile`` over its 16-token halves ``halves`` (of 0, 1): a loop
    over the channels first .. last - 1 whose accumulators stay in registers."""
    codes_data, (w_data, w_stride), bias_data, (s_data, s_stride) = arrays
    fma = _fma(builder.module)
    keys = [(r, h) for r in range(count) for h in halves]
    d, accs, _, loop, done = _open_loop(builder, "kcodes", first_v, keys)
    index = builder.mul(builder.sub(d, first_v), stride_v)
    decoded = _decoded_columns(builder, codes_data, index, width, ir.Constant(_i64, 0), halves)
    updated = {}
    for r in range(count):
        row = builder.add(row0, ir.Constant(_i64, r))
        weight = builder.load(builder.gep(w_data, [builder.add(builder.mul(row, w_stride), d)]))
        broadcast = _splat(builder, weight)
        for h in halves:
            updated[r, h] = builder.call(fma, [broadcast, decoded[h], accs[r, h]])
    _close_loop(builder, d, last_v, loop, done, [(a, updated[key]) for key, a in accs.items()])
    adding = builder.icmp_signed("!=", add_v, ir.Constant(_i64, 0))
    for r in range(count):
        row = builder.add(row0, ir.Constant(_i64, r))
        offset = _splat(builder, builder.load(builder.gep(bias_data, [row])))
        base = builder.add(builder.mul(row, s_stride), col0)
        for h in halves:
            pointer = _vector_at(builder, s_data, builder.add(base, ir.Constant(_i64, 16 * h)))
            earlier = builder.select(adding, builder.load(pointer, align=4), offset)
            builder.store(builder.fadd(updated[r, h], earlier), pointer, align=4)


def _make_scores_codes_tile(count: int, fits: int = ACCUMULATORS):
    @intrinsic
    def scores_codes_tile(
        typingctx, codes, base, stride, bits, weights, bias, scores, r0, i0, first, last, add
    ):  # fmt: skip
        """scores[r, i0:i0+32] = (bias[r], or with ``add`` what they hold) + sum over channels
        d in first..last-1 of weights[r, d] * (code(d, i) - 2 ** (bits - 1)) for rows
        r0..r0+count-1: per-channel key codes (32 tokens of channel d from code (d - first) *
        stride after byte ``base`` of ``codes``, ``bits`` wide, one of CHANNEL_WIDTHS),
        centred, with each channel's scale folded into the weights (q times scale) and its
        centre into ``bias``: decoded in registers, never stored (last > first). Channels of
        several widths take one call per run of one width, the later ones with ``add``."""
        if not (
            _is_array(codes, types.uint8)
            and _is_matrix(weights)
            and _is_array(bias, types.float32)
            and _is_matrix(scores)
        ):
            return None

        def codegen(context, builder, signature, args):
            (codes_v, base_v, stride_v, bits_v, w_v, bias_v, s_v, row0, col0, first_v, last_v,
             add_v) = args  # fmt: skip
            types_ = signature.args
            codes_data = context.make_array(types_[0])(context, builder, codes_v).data
            codes_data = builder.gep(codes_data, [base_v])
            w_data, w_stride, _ = _array(context, builder, types_[4], w_v)
            bias_data = context.make_array(types_[5])(context, builder, bias_v).data
            s_data, s_stride, _ = _array(context, builder, types_[6], s_v)
            arrays = (codes_data, (w_data, w_stride), bias_data, (s_data, s_stride))
            step = _pass_vectors(count, fits)

            def emit(builder, width):
                for half in range(0, 2, step):
                    _emit_scores_codes_pass(
                        builder, arrays, stride_v, width, first_v, last_v, add_v, row0, col0,
                        count, range(half, min(2, half + step)),
                    )  # fmt: skip

            _per_width(builder, bits_v, emit, CHANNEL_WIDTHS)
            return context.get_dummy_value()

        return types.void(
            codes, types.int64, types.int64, types.int64, weights, bias, scores, types.int64,
            types.int64, types.int64, types.int64, types.int64,
        ), codegen  # fmt: skip

    return scores_codes_tile


scores_codes_tile_1, scores_codes_tile_2, scores_codes_tile_3, scores_codes_tile = (
    _make_scores_codes_tile(n) for n in (1, 2, 3, 4)
)


def _sum_lanes(builder, vector):
    """IR of the sum of a <16 x float>'s lanes: four rounds of halving shuffles and adds."""
    width = 16
    while width > 1:
        width //= 2
        mask = ir.Constant(
            ir.VectorType(_i32, 16), [i + width if i < width else i for i in range(16)]
        )
        vector = builder.fadd(vector, builder.shuffle_vector(vector, vector, mask))
    return builder.extract_element(vector, ir.Constant(_i32, 0))


def _make_scores_tokens_tile(count: int):
    @intrinsic
    def scores_tokens_tile(
        typingctx, codes, token_at, bits, q, run_sums, scales, mins, groups, group_runs,
        scores, r0, t1,
    ):  # fmt: skip
        """scores[r, t] = q[r] . key(t) for rows r0..r0+count-1 and tokens t < t1, the keys
        read from per-token codes: token t's code of channel d is code token_at[t] + d,
        key(t)[d] = mins[j] + scales[j] * code, j = t * groups + d // (32 * group_runs).
        Each 32-channel run is decoded in registers (centred: minus 2 ** (bits - 1)) and
        multiplied with q, its group's scale applied to the run's sum and its centre times
        ``run_sums[r, run]`` (q summed over the run's channels) added apart; one sum of
        lanes per token and row."""
        if not (
            _is_array(codes, types.uint8)
            and _is_array(token_at, types.int64)
            and _is_matrix(q)
            and _is_matrix(run_sums)
            and _is_array(scales, types.float32)
            and _is_array(mins, types.float32)
            and _is_matrix(scores)
        ):
            return None

        def codegen(context, builder, signature, args):
            (codes_v, at_v, bits_v, q_v, sums_v, s_v, m_v, groups_v, runs_v, scores_v, row0,
             last) = args  # fmt: skip
            types_ = signature.args
            codes_data = context.make_array(types_[0])(context, builder, codes_v).data
            at_data = context.make_array(types_[1])(context, builder, at_v).data
            q_data, dim, _ = _array(context, builder, types_[3], q_v)
            sums_data, sums_stride, _ = _array(context, builder, types_[4], sums_v)
            s_data = context.make_array(types_[5])(context, builder, s_v).data
            m_data = context.make_array(types_[6])(context, builder, m_v).data
            out_data, out_stride, _ = _array(context, builder, types_[9], scores_v)

            def emit(builder, width):
                fma = _fma(builder.module)
                middle = ir.Constant(_f32, float(1 << (width - 1)))
                runs_total = builder.sdiv(dim, ir.Constant(_i64, 32))
                zero = ir.Constant(_v16, [0.0] * 16)
                rows = [builder.add(row0, ir.Constant(_i64, r)) for r in range(count)]
                # outer loop over tokens
                entry = builder.basic_block
                tokens = builder.append_basic_block("ktok.tokens")
                runs = builder.append_basic_block("ktok.runs")
                token_end = builder.append_basic_block("ktok.token_end")
                done = builder.append_basic_block("ktok.done")
                builder.branch(tokens)
                builder.position_at_end(tokens)
                t = builder.phi(_i64)
                t.add_incoming(ir.Constant(_i64, 0), entry)
                base = builder.load(builder.gep(at_data, [t]))
                first_param = builder.mul(t, groups_v)
                builder.branch(runs)
                # inner loop over the token's 32-channel runs
                builder.position_at_end(runs)
                j = builder.phi(_i64)
                j.add_incoming(ir.Constant(_i64, 0), tokens)
                totals = [builder.phi(_v16) for _ in range(count)]
                offsets = [builder.phi(_f32) for _ in range(count)]
                for total in totals:
                    total.add_incoming(zero, tokens)
                for offset in offsets:
                    offset.add_incoming(ir.Constant(_f32, 0.0), tokens)
                channel = builder.mul(j, ir.Constant(_i64, 32))
                values = _emit_codes(
                    builder, codes_data, builder.add(base, channel), width, 32, True
                )
                undefined = ir.Constant(ir.VectorType(_f32, 32), ir.Undefined)
                halves = [
                    builder.shuffle_vector(
                        values,
                        undefined,
                        ir.Constant(ir.VectorType(_i32, 16), list(range(h, h + 16))),
                    )
                    for h in (0, 16)
                ]
                param = builder.add(first_param, builder.sdiv(j, runs_v))
                scale = builder.load(builder.gep(s_data, [param]))
                centre = builder.fadd(
                    builder.load(builder.gep(m_data, [param])), builder.fmul(scale, middle)
                )
                broadcast = _splat(builder, scale)
                new_totals, new_offsets = [], []
                for r in range(count):
                    q_at = builder.add(builder.mul(rows[r], dim), channel)
                    low = builder.load(_vector_at(builder, q_data, q_at), align=4)
                    high = builder.load(
                        _vector_at(builder, q_data, builder.add(q_at, ir.Constant(_i64, 16))),
                        align=4,
                    )
                    partial = builder.fmul(halves[0], low)
                    partial = builder.call(fma, [halves[1], high, partial])
                    new_totals.append(builder.call(fma, [broadcast, partial, totals[r]]))
                    run_sum = builder.load(
                        builder.gep(sums_data, [builder.add(builder.mul(rows[r], sums_stride), j)])
                    )
                    new_offsets.append(builder.fadd(offsets[r], builder.fmul(centre, run_sum)))
                next_j = builder.add(j, ir.Constant(_i64, 1))
                runs_end = builder.basic_block
                j.add_incoming(next_j, runs_end)
                for phi, value in zip(totals + offsets, new_totals + new_offsets, strict=True):
                    phi.add_incoming(value, runs_end)
                builder.cbranch(builder.icmp_signed("<", next_j, runs_total), runs, token_end)
                builder.position_at_end(token_end)
                for r in range(count):
                    score = builder.fadd(_sum_lanes(builder, new_totals[r]), new_offsets[r])
                    at = builder.add(builder.mul(rows[r], out_stride), t)
                    builder.store(score, builder.gep(out_data, [at]))
                next_t = builder.add(t, ir.Constant(_i64, 1))
                t.add_incoming(next_t, token_end)
                builder.cbranch(builder.icmp_signed("<", next_t, last), tokens, done)
                builder.position_at_end(done)

            _per_width(builder, bits_v, emit)
            return context.get_dummy_value()

        return types.void(
            codes, token_at, types.int64, q, run_sums, scales, mins, types.int64, types.int64,
            scores, types.int64, types.int64,
        ), codegen  # fmt: skip

    return scores_tokens_tile


scores_tokens_tile_1, scores_tokens_tile_2, scores_tokens_tile_3, scores_tokens_tile = (
    _make_scores_tokens_tile(n) for n in (1, 2, 3, 4)
)


@intrinsic
def turn_keys_16(typingctx, keys, cos, sin, j, start, i0):
    """RoPE on 16 tokens of channel-major keys: for i in i0 .. i0 + 15, channel j and
    j + half (half = keys' rows / 2) turn by the angle of position start + i, whose cos and
    sin are cos[j, start + i], sin[j, start + i]: a = keys[j, i], b = keys[j + half, i] become
    a c - b s and b c + a s (Numba's scalar loop, with its index checks, was not vectorized:
    half of a pre-RoPE decode's time)."""
    if not (_is_matrix(keys) and _is_matrix(cos) and _is_matrix(sin)):
        return None

    def codegen(context, builder, signature, args):
        keys_v, cos_v, sin_v, channel, first, token = args
        k_data, k_stride, k_rows = _array(context, builder, signature.args[0], keys_v)
        c_data, c_stride, _ = _array(context, builder, signature.args[1], cos_v)
        s_data, s_stride, _ = _array(context, builder, signature.args[2], sin_v)
        half = builder.sdiv(k_rows, ir.Constant(_i64, 2))
        a_at = builder.add(builder.mul(channel, k_stride), token)
        b_at = builder.add(builder.mul(builder.add(channel, half), k_stride), token)
        position = builder.add(first, token)
        c = builder.load(
            _vector_at(builder, c_data, builder.add(builder.mul(channel, c_stride), position)),
            align=4,
        )
        s = builder.load(
            _vector_at(builder, s_data, builder.add(builder.mul(channel, s_stride), position)),
            align=4,
        )
        a_pointer = _vector_at(builder, k_data, a_at)
        b_pointer = _vector_at(builder, k_data, b_at)
        a = builder.load(a_pointer, align=4)
        b = builder.load(b_pointer, align=4)
        builder.store(builder.fsub(builder.fmul(a, c), builder.fmul(b, s)), a_pointer, align=4)
        builder.store(builder.fadd(builder.fmul(b, c), builder.fmul(a, s)), b_pointer, align=4)
        return context.get_dummy_value()

    return types.void(keys, cos, sin, types.int64, types.int64, types.int64), codegen
