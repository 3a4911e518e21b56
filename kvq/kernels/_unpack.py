"""Unpack 32 bit-packed codes and apply a group's scale and min, as one LLVM vector operation.

``unpack_affine_32[bits](row, index, scale, lowest, out, at)`` sets
``out[at:at + 32] = lowest + scale * code(row, index + i)`` for ``i < 32``, where ``row`` is a
little-endian bit stream of ``bits``-bit codes (uint8) and ``index * bits`` is a multiple of 8.
Lane ``i`` reads the 16-bit window at byte ``i * bits // 8`` of the run, shifts it by
``i * bits % 8`` and masks ``bits`` bits: a byte gather, a shift and an and per
lane, which LLVM turns into a few shuffles on AVX-512/AVX2 instead of a scalar loop.

Callers guarantee the run's ``4 * bits`` bytes and ``out[at:at + 32]`` lie inside the arrays.
The scale multiply and min add are one fused multiply-add per lane.
"""

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from kvq.kernels._simd import _is_array

RUN = 32  # codes per call

_i8, _i32, _i64, _f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _vector(element, count=RUN):
    return ir.VectorType(element, count)


def _splat(builder, scalar, count, element):
    undefined = ir.Constant(_vector(element, count), ir.Undefined)
    first = builder.insert_element(undefined, scalar, ir.Constant(_i32, 0))
    return builder.shuffle_vector(first, undefined, ir.Constant(_vector(_i32, count), [0] * count))


def _make(bits: int):
    run_bytes = RUN * bits // 8
    low_index = [(i * bits) // 8 for i in range(RUN)]
    high_index = [min(j + 1, run_bytes - 1) for j in low_index]
    shifts = [(i * bits) % 8 for i in range(RUN)]
    needs_high = any(s + bits > 8 for s in shifts)

    @intrinsic
    def unpack_affine_32(typingctx, row, index, scale, lowest, out, at):
        if not (_is_array(row, types.uint8) and _is_array(out, types.float32)):
            return None

        def codegen(context, builder, signature, args):
            row_value, index_value, scale_value, lowest_value, out_value, at_value = args
            row_type, out_type = signature.args[0], signature.args[4]
            row_data = context.make_array(row_type)(context, builder, row_value).data
            out_data = context.make_array(out_type)(context, builder, out_value).data
            byte = builder.lshr(
                builder.mul(index_value, ir.Constant(_i64, bits)), ir.Constant(_i64, 3)
            )
            source = builder.bitcast(
                builder.gep(row_data, [byte]), _vector(_i8, run_bytes).as_pointer()
            )
            packed = builder.zext(builder.load(source, align=1), _vector(_i32, run_bytes))
            undefined = ir.Constant(_vector(_i32, run_bytes), ir.Undefined)
            if bits == 8:
                codes = packed
            else:
                window = builder.shuffle_vector(
                    packed, undefined, ir.Constant(_vector(_i32), low_index)
                )
                if needs_high:
                    high = builder.shuffle_vector(
                        packed, undefined, ir.Constant(_vector(_i32), high_index)
                    )
                    window = builder.or_(
                        window, builder.shl(high, ir.Constant(_vector(_i32), [8] * RUN))
                    )
                shifted = builder.lshr(window, ir.Constant(_vector(_i32), shifts))
                codes = builder.and_(shifted, ir.Constant(_vector(_i32), [(1 << bits) - 1] * RUN))
            values = builder.uitofp(codes, _vector(_f32))
            fma_name = "llvm.fma.v32f32"
            module = builder.module
            fma = module.globals.get(fma_name) or ir.Function(
                module, ir.FunctionType(_vector(_f32), [_vector(_f32)] * 3), fma_name
            )
            result = builder.call(
                fma,
                [
                    _splat(builder, scale_value, RUN, _f32),
                    values,
                    _splat(builder, lowest_value, RUN, _f32),
                ],
            )
            target = builder.bitcast(builder.gep(out_data, [at_value]), _vector(_f32).as_pointer())
            builder.store(result, target, align=4)
            return context.get_dummy_value()

        return types.void(
            row, types.int64, types.float32, types.float32, out, types.int64
        ), codegen

    return unpack_affine_32


unpack_affine_32_8 = _make(8)
unpack_affine_32_4 = _make(4)
unpack_affine_32_3 = _make(3)
unpack_affine_32_2 = _make(2)
unpack_affine_32_6 = _make(6)  # second-level scale and min codes
