"""Register-blocked tiles for attention's two small products, as LLVM vector code.

Numba's loops keep accumulators in memory (a load and a store per fused multiply-add), which
held attention's products to ~20 GMAC/s here. These intrinsics keep a tile of accumulators in
vector registers across the whole reduction loop:

- ``scores_tile(keys, q, scores, r0, i0)``: for query rows r0..r0+3 and tokens i0..i0+31,
  ``scores[r, i] = sum_d q[r, d] * keys[d, i]`` (8 accumulators of 16 floats);
- ``values_tile(weights, values, acc, r0, width, c0)``: for rows r0..r0+3 and the 64 columns
  c0..c0+63 of head_dim, ``acc[r, c] += sum_t weights[r, t] * values[t, c]`` (16
  accumulators).

``scores_tiles[n]`` and ``values_tiles[n]`` are the same for n = 1..4 rows (a GQA group of
1-3 rows, or the rows left after tiles of 4). Arrays are 2-D C-contiguous float32; callers
guarantee the tile lies inside them.
"""

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_f32 = ir.FloatType()
_i32 = ir.IntType(32)
_i64 = ir.IntType(64)
_v16 = ir.VectorType(_f32, 16)


def _fma(module):
    name = "llvm.fma.v16f32"
    if name in module.globals:
        return module.globals[name]
    return ir.Function(module, ir.FunctionType(_v16, [_v16, _v16, _v16]), name)


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


def _emit_tile(builder, a, b, out, row0, col0, steps, count, vectors, accumulate, name):
    """IR of a register tile: for rows r < count and the ``16 * vectors`` columns from col0,
    ``out[row0 + r, col] (+)= sum_k a[row0 + r, k] * b[k, col]`` over k < steps (steps >= 1);
    ``a``, ``b``, ``out``: (data pointer, row stride) of C-contiguous float32 matrices. The
    ``count * vectors`` accumulators stay in registers (phi nodes) through the whole loop;
    ``accumulate`` adds them to ``out``, else they overwrite it."""
    (a_data, a_stride), (b_data, b_stride), (out_data, out_stride) = a, b, out
    fma = _fma(builder.module)
    zero = ir.Constant(_v16, [0.0] * 16)
    entry = builder.basic_block
    loop = builder.append_basic_block(f"{name}.loop")
    done = builder.append_basic_block(f"{name}.done")
    builder.branch(loop)
    builder.position_at_end(loop)
    k = builder.phi(_i64)
    k.add_incoming(ir.Constant(_i64, 0), entry)
    accs = [builder.phi(_v16) for _ in range(count * vectors)]
    for acc in accs:
        acc.add_incoming(zero, entry)
    b_base = builder.add(builder.mul(k, b_stride), col0)
    columns = [
        builder.load(
            _vector_at(builder, b_data, builder.add(b_base, ir.Constant(_i64, 16 * c))), align=4
        )
        for c in range(vectors)
    ]
    updated = []
    for r in range(count):
        row = builder.add(row0, ir.Constant(_i64, r))
        weight = builder.load(builder.gep(a_data, [builder.add(builder.mul(row, a_stride), k)]))
        broadcast = _splat(builder, weight)
        for c in range(vectors):
            updated.append(builder.call(fma, [broadcast, columns[c], accs[vectors * r + c]]))
    next_k = builder.add(k, ir.Constant(_i64, 1))
    body_end = builder.basic_block
    k.add_incoming(next_k, body_end)
    for acc, value in zip(accs, updated, strict=True):
        acc.add_incoming(value, body_end)
    builder.cbranch(builder.icmp_signed("<", next_k, steps), loop, done)
    builder.position_at_end(done)
    for r in range(count):
        row = builder.add(row0, ir.Constant(_i64, r))
        base = builder.add(builder.mul(row, out_stride), col0)
        for c in range(vectors):
            pointer = _vector_at(builder, out_data, builder.add(base, ir.Constant(_i64, 16 * c)))
            value = updated[vectors * r + c]
            if accumulate:
                value = builder.fadd(builder.load(pointer, align=4), value)
            builder.store(value, pointer, align=4)


def _make_scores_tile(count: int):
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
                dim, count, 2, False, "scores",
            )  # fmt: skip
            return context.get_dummy_value()

        return types.void(keys, q, scores, types.int64, types.int64), codegen

    return scores_tile


def _make_values_tile(count: int):
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
                width_value, count, 4, True, "values",
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
