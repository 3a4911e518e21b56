"""kvq's one decoder of bit-packed codes (the little-endian bit streams of ``packing.py``).

- ``code_at(row, index, bits)``: one code, at random (``code_at_bit``: from a bit offset, for
  channels of mixed widths);
- ``unpack_run(row, start, count, bits, out)``: a run of codes into ``out`` (float32 codes for
  attention, uint8 codes for ``packing.unpack_codes``): byte loops for 8, 4, 2 and 6 bits,
  eight codes per ``bits`` bytes through a 64-bit word otherwise;
- ``unpack_affine_32(row, index, bits, scale, lowest, out, at)``: 32 codes with a group's
  scale and min applied, as one LLVM vector operation (below); ``unpack_affine_8``: the
  same for 8 codes (one second-level super-group of 6-bit scale or min codes);
  ``unpack_affine_bytes_32``: 32 codes from a byte offset, for a channel of its own width
  (``Scheme.channel_bits``: 1-6 or 8 bits).

Unpack 32 bit-packed codes and apply a group's scale and min, as one LLVM vector operation.

``unpack_affine_32(row, index, bits, scale, lowest, out, at)`` sets
``out[at:at + 32] = lowest + scale * code(row, index + i)`` for ``i < 32``, where ``row`` is a
little-endian bit stream of ``bits``-bit codes (uint8) and ``index * bits`` is a multiple of 8.
Lane ``i`` reads the 16-bit window at byte ``i * bits // 8`` of the run, shifts it by
``i * bits % 8`` and masks ``bits`` bits: a byte gather, a shift and an and per
lane, which LLVM turns into a few shuffles on AVX-512/AVX2 instead of a scalar loop. Codes
that straddle bytes (3, 5, 6 bits) pair each lane's two bytes with one byte shuffle before
widening (LLVM then shifts 16-bit lanes with a multiply: 3-bit runs 1.5x faster on AVX2);
1-bit codes shift one word by each lane's index.

Callers guarantee the run's ``4 * bits`` bytes and ``out[at:at + 32]`` lie inside the arrays.
The scale multiply and min add are one fused multiply-add per lane.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from kvq.kernels._simd import _is_array, _llvm_function

RUN = 32  # codes per call


@njit(inline="always")
def code_at(row, index, bits):
    """Code ``index`` of a little-endian bit stream ``row`` (uint8)."""
    bit = index * bits
    byte = bit >> 3
    shift = bit & 7
    # branch-free (the next byte is read always, clamped to the row): a branch here splits
    # Numba's reference counts of ``row`` across blocks, and the pair is then not pruned: an
    # atomic incref and decref per code in the callers' hot loops
    high = np.int64(row[min(byte + 1, row.size - 1)])
    value = np.int64(row[byte]) | (high << 8)
    return (value >> shift) & ((1 << bits) - 1)


@njit(inline="always")
def code_at_bit(row, bit, bits):
    """The ``bits``-bit code that starts at bit ``bit`` of a little-endian bit stream ``row``
    (uint8): codes of mixed widths (``Scheme.channel_bits``), each channel from its own byte."""
    byte = bit >> 3
    high = np.int64(row[min(byte + 1, row.size - 1)])  # branch-free, as code_at
    value = np.int64(row[byte]) | (high << 8)
    return (value >> (bit & 7)) & ((1 << bits) - 1)


@njit(inline="always")
def unpack_run(row, start, count, bits, out):
    """out[:count] = codes ``start .. start + count`` of bit stream ``row`` (bits 1-8), cast to
    out's dtype."""
    if bits == 8:
        run = row[start : start + count]
        for i in range(count):
            out[i] = run[i]
    elif bits == 4 and start % 2 == 0 and count % 2 == 0:
        run = row[start // 2 : (start + count) // 2]
        for i in range(count // 2):
            b = np.int32(run[i])
            out[2 * i] = b & 15
            out[2 * i + 1] = b >> 4
    elif bits == 2 and start % 4 == 0 and count % 4 == 0:
        run = row[start // 4 : (start + count) // 4]
        for i in range(count // 4):
            b = np.int32(run[i])
            out[4 * i] = b & 3
            out[4 * i + 1] = (b >> 2) & 3
            out[4 * i + 2] = (b >> 4) & 3
            out[4 * i + 3] = b >> 6
    elif bits == 6 and start % 4 == 0 and count % 4 == 0:  # second-level codes
        run = row[start // 4 * 3 : (start + count) // 4 * 3]
        for i in range(count // 4):
            word = (
                np.int32(run[3 * i])
                | (np.int32(run[3 * i + 1]) << 8)
                | (np.int32(run[3 * i + 2]) << 16)
            )
            out[4 * i] = word & 63
            out[4 * i + 1] = (word >> 6) & 63
            out[4 * i + 2] = (word >> 12) & 63
            out[4 * i + 3] = word >> 18
    elif start % 8 == 0:  # 8 codes are exactly ``bits`` bytes: one 64-bit word each
        mask = np.uint64((1 << bits) - 1)
        first = start // 8 * bits
        whole = count // 8
        for chunk in range(whole):
            value = np.uint64(0)
            for j in range(bits):
                value |= np.uint64(row[first + chunk * bits + j]) << np.uint64(8 * j)
            for i in range(8):
                out[chunk * 8 + i] = (value >> np.uint64(bits * i)) & mask
        for i in range(whole * 8, count):
            out[i] = code_at(row, start + i, bits)
    else:
        for i in range(count):
            out[i] = code_at(row, start + i, bits)


_i8, _i32, _i64, _f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _vector(element, count=RUN):
    return ir.VectorType(element, count)


def _splat(builder, scalar, count, element):
    undefined = ir.Constant(_vector(element, count), ir.Undefined)
    first = builder.insert_element(undefined, scalar, ir.Constant(_i32, 0))
    return builder.shuffle_vector(first, undefined, ir.Constant(_vector(_i32, count), [0] * count))


def _emit_codes(builder, row_data, index_value, bits, count, centred=False, byte=None):
    """The LLVM IR of ``count`` ``bits``-bit codes from code ``index_value`` of byte stream
    ``row_data`` (or from byte ``byte``, an i64, when given), as a float vector (see the
    module docstring); ``centred``: each code minus ``2 ** (bits - 1)``."""
    run_bytes = count * bits // 8
    low_index = [(i * bits) // 8 for i in range(count)]
    high_index = [min(j + 1, run_bytes - 1) for j in low_index]
    shifts = [(i * bits) % 8 for i in range(count)]
    needs_high = any(s + bits > 8 for s in shifts)
    if byte is None:
        first_bit = builder.mul(index_value, ir.Constant(_i64, bits))
        byte = builder.lshr(first_bit, ir.Constant(_i64, 3))
    lanes = _vector(_i32, count)
    if bits == 1:  # one word of count bits, in every lane, shifted by the lane's index: a
        # byte vector here became an SSE4a extrq among AVX code, 40x slower (AMD Zen 3)
        pointer = builder.bitcast(builder.gep(row_data, [byte]), ir.IntType(count).as_pointer())
        word = builder.load(pointer, align=1)
        window = _splat(builder, builder.zext(word, _i32) if count < 32 else word, count, _i32)
        shifts = list(range(count))
    else:
        vector = _vector(_i8, run_bytes)
        loaded = builder.load(builder.bitcast(builder.gep(row_data, [byte]), vector.as_pointer()),
                              align=1)  # fmt: skip
        if needs_high:  # codes that straddle bytes: each lane's two bytes paired by one byte
            # shuffle, then widened (four cross-lane vpermd of the widened bytes before: 34
            # instructions a 16-code run of the key tile against 26 for 4-bit codes)
            pairs = [b for i in range(count) for b in (low_index[i], high_index[i])]
            paired = builder.shuffle_vector(
                loaded,
                ir.Constant(vector, ir.Undefined),
                ir.Constant(_vector(_i32, 2 * count), pairs),
            )
            window = builder.zext(builder.bitcast(paired, _vector(ir.IntType(16), count)), lanes)
        else:  # widened, then each lane's byte (shuffling the bytes first was slower)
            window = builder.zext(loaded, _vector(_i32, run_bytes))
            if bits != 8:
                undefined = ir.Constant(_vector(_i32, run_bytes), ir.Undefined)
                window = builder.shuffle_vector(window, undefined, ir.Constant(lanes, low_index))
    codes = window
    if bits != 8:
        shifted = builder.lshr(window, ir.Constant(lanes, shifts))
        codes = builder.and_(shifted, ir.Constant(lanes, [(1 << bits) - 1] * count))
    if centred:
        codes = builder.sub(codes, ir.Constant(lanes, [1 << (bits - 1)] * count))
        return builder.sitofp(codes, _vector(_f32, count))
    return builder.uitofp(codes, _vector(_f32, count))


WIDTHS = (8, 6, 4, 2, 3)  # the widths the decoders take: any other reads as 3 (the last)
CODE_WIDTHS = (8, 4, 2, 3)  # the widths of K/V codes
# the widths of per-channel codes (Scheme.channel_bits: kvq.scheme.CHANNEL_BITS)
CHANNEL_WIDTHS = (8, 6, 5, 4, 2, 1, 3)


def emit_codes(
    builder, row_data, index_value, bits_value, count, widths=WIDTHS, centred=False, byte=None
):  # fmt: skip
    """IR of ``count`` codes (a float vector, ``centred`` and ``byte`` as :func:`_emit_codes`)
    for a run-time width ``bits_value`` (i64): a ``switch`` over ``widths`` inside the IR
    (LLVM folds it for a constant width); a width not listed reads as the last."""
    function = builder.function
    done = function.append_basic_block("codes.done")
    cases = {w: function.append_basic_block(f"codes.{w}") for w in widths}
    switch = builder.switch(bits_value, cases[widths[-1]])
    for width in widths[:-1]:
        switch.add_case(ir.Constant(_i64, width), cases[width])
    results = []
    for width, block in cases.items():
        builder.position_at_end(block)
        value = _emit_codes(builder, row_data, index_value, width, count, centred, byte)
        results.append((value, builder.basic_block))
        builder.branch(done)
    builder.position_at_end(done)
    merged = builder.phi(_vector(_f32, count))
    for value, block in results:
        merged.add_incoming(value, block)
    return merged


def fma_function(module, count):
    """``llvm.fma`` on ``count`` float32 lanes, declared once per module."""
    vector = _vector(_f32, count)
    return _llvm_function(module, f"llvm.fma.v{count}f32", vector, [vector] * 3)


def _unpack_affine(count, bytes_=False):
    """The intrinsic of a ``count``-code run (see :func:`unpack_affine_32`); ``bytes_``: its
    second argument is the run's first byte, and the widths are CHANNEL_WIDTHS."""

    def typer(typingctx, row, index, bits, scale, lowest, out, at):
        if not (_is_array(row, types.uint8) and _is_array(out, types.float32)):
            return None

        def codegen(context, builder, signature, args):
            row_value, index_value, bits_value, scale_value, lowest_value, out_value, at = args
            row_data = context.make_array(signature.args[0])(context, builder, row_value).data
            out_data = context.make_array(signature.args[5])(context, builder, out_value).data
            if bytes_:
                values = emit_codes(
                    builder, row_data, None, bits_value, count, CHANNEL_WIDTHS, byte=index_value
                )
            else:
                values = emit_codes(builder, row_data, index_value, bits_value, count)
            result = builder.call(
                fma_function(builder.module, count),
                [
                    _splat(builder, scale_value, count, _f32),
                    values,
                    _splat(builder, lowest_value, count, _f32),
                ],
            )
            target = builder.gep(out_data, [at])
            builder.store(
                result, builder.bitcast(target, _vector(_f32, count).as_pointer()), align=4
            )
            return context.get_dummy_value()

        return types.void(
            row, types.int64, types.int64, types.float32, types.float32, out, types.int64
        ), codegen

    typer.__name__ = typer.__qualname__ = f"unpack_affine_{'bytes_' if bytes_ else ''}{count}"
    return typer


unpack_affine_32 = intrinsic(_unpack_affine(RUN))
"""out[at:at + 32] = lowest + scale * codes index .. index + 31 of the ``bits``-bit
stream ``row`` (see the module docstring), for ``bits`` in :data:`WIDTHS`. The branch on
``bits`` is in the IR (LLVM folds it where ``bits`` is a constant), so Numba sees no branch
between its reference counts of ``row`` and ``out`` and prunes them: a Numba-level branch
left an atomic incref and decref per run in attention's hot loops."""

unpack_affine_8 = intrinsic(_unpack_affine(8))
"""out[at:at + 8] = lowest + scale * codes index .. index + 7 of ``row``, as
:func:`unpack_affine_32` (``index * bits`` a multiple of 8; ``bits`` bytes are read)."""

unpack_affine_bytes_32 = intrinsic(_unpack_affine(RUN, bytes_=True))
"""out[at:at + 32] = lowest + scale * the 32 ``bits``-bit codes from byte ``byte`` of ``row``
(``unpack_affine_bytes_32(row, byte, bits, scale, lowest, out, at)``), for ``bits`` in
:data:`CHANNEL_WIDTHS`: a channel of mixed widths, whose codes start on a byte of their own."""
