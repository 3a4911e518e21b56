"""Explicit SIMD for whole blocks of 32 float32 values, as Numba intrinsics over LLVM vectors.

For a runtime block size LLVM vectorizes the block loops but wraps each in trip-count checks,
remainder loops and 4-way interleaving that a 32-element block never fills: measured here,
that per-block overhead was ~70% of quantize time at block size 32. These intrinsics emit the
block's work as straight-line ``<16 x i32>`` / ``<16 x float>`` operations (two vectors per
block); LLVM lowers them to whatever the CPU has (AVX-512, AVX2 or SSE). They compute exactly
what the generic loops compute, operation for operation, so results are bit-identical (tested).

Callers guarantee ``offset + 32 <= len`` for every array passed: nothing is bounds-checked.
``widen_halves`` and ``widen_floats`` widen 1-16 float16 or float32 params from byte rows to
float32 (a masked load, a 16-float store).
"""

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

LANES = 16
SIMD_BLOCK = 2 * LANES  # the block size these intrinsics handle

_i8, _i32, _f32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
_v_i8, _v_i32, _v_f32 = (ir.VectorType(t, LANES) for t in (_i8, _i32, _f32))


def _is_array(value, dtype) -> bool:
    return (
        isinstance(value, types.Array)
        and value.dtype == dtype
        and value.ndim == 1
        and value.layout == "C"
    )


def _llvm_function(module, name, return_type, arg_types):
    """Declare an LLVM intrinsic once per module."""
    if name in module.globals:
        return module.globals[name]
    return ir.Function(module, ir.FunctionType(return_type, arg_types), name)


def _vector_pointer(context, builder, array_type, array, offset, vector_type):
    """Pointer to ``array[offset]`` typed as a pointer to ``vector_type``."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [offset]), vector_type.as_pointer())


def _splat(builder, scalar, vector_type):
    undefined = ir.Constant(vector_type, ir.Undefined)
    first = builder.insert_element(undefined, scalar, ir.Constant(_i32, 0))
    zeros = ir.Constant(ir.VectorType(_i32, LANES), [0] * LANES)
    return builder.shuffle_vector(first, undefined, zeros)


def _half(builder, pointer, index):
    return builder.gep(pointer, [ir.Constant(_i32, index)])


@intrinsic
def extrema_keys_32(typingctx, bits, offset):
    """(min, max) order keys (see ``order_key``) of int32 ``bits[offset:offset + 32]``."""
    if not _is_array(bits, types.int32):
        return None

    def codegen(context, builder, signature, args):
        array, start = args
        module = builder.module
        pointer = _vector_pointer(context, builder, signature.args[0], array, start, _v_i32)
        shift = _splat(builder, ir.Constant(_i32, 31), _v_i32)
        magnitude = _splat(builder, ir.Constant(_i32, 0x7FFFFFFF), _v_i32)

        def key(half):
            value = builder.load(_half(builder, pointer, half), align=4)
            return builder.xor(value, builder.and_(builder.ashr(value, shift), magnitude))

        low, high = key(0), key(1)
        v_min = _llvm_function(module, "llvm.smin.v16i32", _v_i32, [_v_i32, _v_i32])
        v_max = _llvm_function(module, "llvm.smax.v16i32", _v_i32, [_v_i32, _v_i32])
        r_min = _llvm_function(module, "llvm.vector.reduce.smin.v16i32", _i32, [_v_i32])
        r_max = _llvm_function(module, "llvm.vector.reduce.smax.v16i32", _i32, [_v_i32])
        key_min = builder.call(r_min, [builder.call(v_min, [low, high])])
        key_max = builder.call(r_max, [builder.call(v_max, [low, high])])
        return context.make_tuple(builder, signature.return_type, [key_min, key_max])

    return types.UniTuple(types.int32, 2)(bits, offset), codegen


@intrinsic
def encode_32(typingctx, x, offset, lowest, inverse, levels, codes):
    """codes[offset:offset + 32] = min(rint((x - lowest) * inverse), levels) as uint8."""
    if not (_is_array(x, types.float32) and _is_array(codes, types.uint8)):
        return None
    if not (lowest == inverse == levels == types.float32):
        return None

    def codegen(context, builder, signature, args):
        x_array, start, lowest_value, inverse_value, levels_value, codes_array = args
        x_type, _, _, _, _, codes_type = signature.args
        module = builder.module
        x_pointer = _vector_pointer(context, builder, x_type, x_array, start, _v_f32)
        codes_pointer = _vector_pointer(context, builder, codes_type, codes_array, start, _v_i8)
        rint = _llvm_function(module, "llvm.rint.v16f32", _v_f32, [_v_f32])
        smaller = _llvm_function(module, "llvm.minnum.v16f32", _v_f32, [_v_f32, _v_f32])
        low = _splat(builder, lowest_value, _v_f32)
        inv = _splat(builder, inverse_value, _v_f32)
        top = _splat(builder, levels_value, _v_f32)
        for half in (0, 1):
            value = builder.load(_half(builder, x_pointer, half), align=4)
            level = builder.call(rint, [builder.fmul(builder.fsub(value, low), inv)])
            code = builder.fptoui(builder.call(smaller, [level, top]), _v_i8)
            builder.store(code, _half(builder, codes_pointer, half), align=1)
        return context.get_dummy_value()

    return types.void(x, offset, lowest, inverse, levels, codes), codegen


@intrinsic
def decode_32(typingctx, codes, offset, scale, lowest, out):
    """out[offset:offset + 32] = lowest + scale * float32(codes[offset:offset + 32])."""
    if not (_is_array(codes, types.uint8) and _is_array(out, types.float32)):
        return None

    def codegen(context, builder, signature, args):
        codes_array, start, scale_value, lowest_value, out_array = args
        codes_type, _, _, _, out_type = signature.args
        codes_pointer = _vector_pointer(context, builder, codes_type, codes_array, start, _v_i8)
        out_pointer = _vector_pointer(context, builder, out_type, out_array, start, _v_f32)
        step = _splat(builder, scale_value, _v_f32)
        low = _splat(builder, lowest_value, _v_f32)
        for half in (0, 1):
            code = builder.load(_half(builder, codes_pointer, half), align=1)
            value = builder.fadd(low, builder.fmul(step, builder.uitofp(code, _v_f32)))
            builder.store(value, _half(builder, out_pointer, half), align=4)
        return context.get_dummy_value()

    return types.void(codes, offset, scale, lowest, out), codegen


def _widen(source_type):
    """An intrinsic: out[out_first + i] = float32 of the little-endian ``source_type`` value
    (half or float) at element first + i of a byte array, for i < count (1 <= count <= 16),
    as one masked vector load (nothing past the count is read) and one 16-float store: the
    caller guarantees out[out_first:out_first + 16] lies inside ``out`` (lanes from count on
    get zeros). Attention stages a token's 1-8 params with it, where a scalar loop cost a
    quarter of Llama-2's per-token schemes."""
    size = 2 if isinstance(source_type, ir.HalfType) else 4
    vector = ir.VectorType(source_type, LANES)
    lanes = ir.Constant(_v_i32, list(range(LANES)))
    mask_type = ir.VectorType(ir.IntType(1), LANES)
    element = "f16" if size == 2 else "f32"
    load_name = f"llvm.masked.load.v16{element}.p0v16{element}"

    @intrinsic
    def widen(typingctx, source, first, out, out_first, count):
        if not (_is_array(source, types.uint8) and _is_array(out, types.float32)):
            return None

        def codegen(context, builder, signature, args):
            source_array, start, out_array, out_start, n = args
            module = builder.module
            source_data = context.make_array(signature.args[0])(context, builder, source_array)
            byte = builder.mul(start, ir.Constant(start.type, size))
            pointer = builder.bitcast(builder.gep(source_data.data, [byte]), vector.as_pointer())
            limit = _splat(builder, builder.trunc(n, _i32), _v_i32)
            mask = builder.icmp_unsigned("<", lanes, limit)
            load = _llvm_function(
                module, load_name, vector, [vector.as_pointer(), _i32, mask_type, vector]
            )
            zeros = ir.Constant(vector, [0.0] * LANES)
            values = builder.call(load, [pointer, ir.Constant(_i32, 1), mask, zeros])
            if size == 2:
                values = builder.fpext(values, _v_f32)
            out_pointer = _vector_pointer(
                context, builder, signature.args[2], out_array, out_start, _v_f32
            )
            builder.store(values, out_pointer, align=4)
            return context.get_dummy_value()

        return types.void(source, first, out, out_first, count), codegen

    return widen


widen_halves = _widen(ir.HalfType())
widen_floats = _widen(_f32)
