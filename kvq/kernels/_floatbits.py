"""Bit-level helpers for float32 used inside kernels.

Numba has no ``float.view(int)`` for scalars, so the bit cast is an LLVM intrinsic. The
order-preserving integer key lets min/max reductions run on integers, which LLVM vectorizes
without fast-math flags (a float min/max reduction needs ``nnan``, which kvq never sets).
"""

import math

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from kvq import _format

# Order-preserving int32 keys of the float32 extremes: every finite value's key lies strictly
# between these two; NaNs (either sign) and infinities fall on or outside them.
KEY_NEG_INF = np.int32(-0x7F800001)  # key(-inf)
KEY_POS_INF = np.int32(0x7F800000)  # key(+inf)

F32_MIN_NORMAL = np.float32(2.0**-126)
FLOAT16_MAX = np.float32(_format.FLOAT16_MAX)


@intrinsic
def _bitcast_i32_to_f32(typingctx, bits):
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.int32), codegen


@intrinsic
def _half_to_float(typingctx, bits):
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        low = builder.trunc(args[0], ir.IntType(16))
        return builder.fpext(builder.bitcast(low, ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@njit(inline="always")
def half_bits_to_float(bits):
    """float32 value of the float16 whose bit pattern is the low 16 bits of ``bits``."""
    return _half_to_float(bits)


@njit(inline="always")
def bits_to_float(bits):
    """float32 whose bit pattern is the int32 ``bits``."""
    return _bitcast_i32_to_f32(bits)


@njit(inline="always")
def order_key(bits):
    """int32 bit pattern of a float32 -> int32 that sorts like the float (-0.0 < +0.0)."""
    return np.int32(bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF)))


@njit(inline="always")
def key_to_float(key):
    """Inverse of :func:`order_key`, returning the float32 value."""
    return _bitcast_i32_to_f32(np.int32(key ^ ((key >> 31) & np.int32(0x7FFFFFFF))))


@njit(inline="always")
def float16_grid_step(value):
    """Spacing of the float16 grid at ``value`` (float32), subnormals included."""
    _, exponent = math.frexp(value)  # value = m * 2**exponent, 0.5 <= |m| < 1
    return np.float32(math.ldexp(1.0, max(exponent - 1, -14) - 10))


@njit(inline="always")
def float16_round_down(value):
    """Largest float16-representable float32 <= value (value finite, |value| < 65504)."""
    if value == 0:
        return np.float32(0.0)
    step = float16_grid_step(value)
    return np.float32(math.floor(value / step) * step)


@njit(inline="always")
def float16_round_up(value):
    """Smallest float16-representable float32 >= value (value finite, |value| < 65504)."""
    if value == 0:
        return np.float32(0.0)
    step = float16_grid_step(value)
    return np.float32(math.ceil(value / step) * step)
