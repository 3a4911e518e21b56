"""kvq.formats: GGML bytes against the gguf package, MLX's affine triples against MLX."""

import platform
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kvq
from kvq.formats import from_mlx, ggml_dequantize, ggml_quantize, to_mlx
from kvq.synthetic import kv_layer

KINDS = ["q8_0", "q4_0", "q4_1"]
TYPE_SIZE = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
F16_MAX = 65504.0


def gguf_quants():
    """gguf.quants and the kind -> GGMLQuantizationType map, or skip."""
    quants = pytest.importorskip("gguf.quants", reason="gguf is the reference for GGML bytes")
    from gguf import GGMLQuantizationType as T

    return quants, {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}


X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def platform_dependent(x) -> bool:
    """True if gguf casts NaN or Inf codes to integers for ``x``: in blocks whose scale is
    subnormal (1 / d overflows) or, for q4_1, whose range overflows. NumPy's cast then follows
    the CPU; kvq always writes what x86-64 gives (0)."""
    blocks = np.asarray(x, np.float32).astype(np.float64).reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    spread = blocks.max(axis=1) - blocks.min(axis=1)
    return bool(np.any((amax > 0) & (amax < 2.0**-120)) or np.any(spread > 3.4e38))


def mlx_core():
    return pytest.importorskip("mlx.core", reason="MLX interop needs mlx")


def reference_bytes(x, kind):
    quants, types = gguf_quants()
    with np.errstate(all="ignore"):  # gguf warns on overflowing scales and degenerate blocks
        return quants.quantize(np.asarray(x), types[kind])


def reference_values(blocks, kind):
    quants, types = gguf_quants()
    with np.errstate(all="ignore"):
        return quants.dequantize(blocks, types[kind])


def adversarial() -> dict[str, np.ndarray]:
    """Hostile inputs by name: each a float array whose last axis is a multiple of 32."""
    rng = np.random.default_rng(7)
    f32 = np.float32
    cases = {
        "normal": rng.standard_normal((16, 256)).astype(f32),
        "k layer 3-D": kv_layer(2, 33, 64, seed=2)[0],
        # q8_0 with amax 127 has d = 1 and q4_0 with max -8 has d = 1: x * id lands on .5
        "ties": np.concatenate(
            [
                np.full((64, 1), 127, f32),
                (rng.integers(-254, 255, (64, 31)) / 2).astype(f32),
            ],
            axis=1,
        ),
        "ties q4": np.concatenate(
            [np.full((64, 1), -8, f32), (rng.integers(-16, 17, (64, 31)) / 2).astype(f32)], axis=1
        ),
        "zeros": np.zeros((4, 64), f32),
        "signed zeros": np.where(rng.random((256, 32)) < 0.5, f32(0.0), f32(-0.0)).astype(f32),
        "constant": np.full((6, 64), 3.25, f32),
        "negative constant": np.full((6, 64), -7.5, f32),
        "negative max": np.concatenate(
            [np.full((32, 1), -50, f32), rng.uniform(-49, 50, (32, 31)).astype(f32)], axis=1
        ),
        "equal +-max": np.tile(np.array([2.0, -2.0] * 16, f32), (4, 1)),
        "near float16 max": rng.uniform(-F16_MAX, F16_MAX, (32, 64)).astype(f32),
        "scales beyond float16": (rng.standard_normal((32, 64)) * F16_MAX * 200).astype(f32),
        "float32 extremes": rng.uniform(-3.4e38, 3.4e38, (32, 64)).astype(f32),
        "tiny normal": (rng.standard_normal((32, 64)) * 1e-37).astype(f32),
        "subnormal": (rng.standard_normal((32, 64)) * 1e-42).astype(f32),
        "below float16": (rng.standard_normal((32, 64)) * 1e-7).astype(f32),
        "every block its magnitude": (
            rng.standard_normal((1024, 32)) * 10.0 ** rng.uniform(-45, 38, (1024, 1))
        ).astype(f32),
        "float64 input": rng.standard_normal((3, 5, 96)),
        "float16 input": rng.standard_normal((7, 64)).astype(np.float16),
        "transposed": rng.standard_normal((64, 8)).astype(f32).T,
        "big-endian": rng.standard_normal((4, 64)).astype(">f4"),
    }
    mixed = rng.standard_normal((64, 32)).astype(f32)
    mixed[:, ::3] = 0.0
    mixed[:, 1::3] = -0.0
    cases["zeros among values"] = mixed
    return cases


CASES = adversarial()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_bytes_and_values_equal_gguf(kind, case):
    x = CASES[case]
    if not X86 and platform_dependent(x):
        pytest.skip("gguf's bytes for degenerate blocks follow the CPU; kvq matches x86-64")
    got = ggml_quantize(x, kind)
    expected = reference_bytes(x, kind)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert got.shape == (*x.shape[:-1], x.shape[-1] // 32 * TYPE_SIZE[kind])
    np.testing.assert_array_equal(got, expected)
    values = ggml_dequantize(got, kind, x.shape)
    assert values.dtype == np.float32 and values.shape == x.shape
    np.testing.assert_array_equal(values, reference_values(expected, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_any_bytes_equals_gguf(kind):
    """Arbitrary bytes, NaN and Inf float16 scales included, decode as gguf decodes them."""
    rng = np.random.default_rng(len(kind))
    blocks = rng.integers(0, 256, (3, 50 * TYPE_SIZE[kind]), dtype=np.uint8)
    blocks[0, :2] = [0x00, 0x7C]  # +inf scale
    blocks[1, :2] = [0x01, 0x7E]  # NaN scale
    values = ggml_dequantize(blocks, kind, (3, 50 * 32))
    np.testing.assert_array_equal(values, reference_values(blocks, kind))
    flat = ggml_dequantize(blocks.reshape(-1), kind, (3, 50 * 32))
    np.testing.assert_array_equal(flat, values)


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 4), st.integers(1, 4).map(lambda n: 32 * n)),
        elements=st.floats(-1e6, 1e6, width=32),
    ),
    kind=st.sampled_from(KINDS),
)
def test_bytes_equal_gguf_on_any_input(x, kind):
    assume(X86 or not platform_dependent(x))
    np.testing.assert_array_equal(ggml_quantize(x, kind), reference_bytes(x, kind))


def test_ties_by_hand():
    """Hand-computed blocks: q8_0 rounds half away from zero; q4 codes truncate x/d + 8.5."""
    x = np.zeros(32, np.float32)
    x[:5] = [127.0, 2.5, -2.5, 0.49999997, -126.5]
    q8 = ggml_quantize(x, "q8_0")
    assert q8[:2].view(np.float16)[0] == 1.0  # d = 127 / 127
    assert q8[2:7].view(np.int8).tolist() == [127, 3, -3, 0, -127]
    x = np.zeros(32, np.float32)
    x[:4] = [-8.0, 0.5, -0.5, 7.5]  # d = -8 / -8 = 1, codes trunc(x + 8.5)
    q4 = ggml_quantize(x, "q4_0")
    assert q4[:2].view(np.float16)[0] == 1.0
    assert [byte & 15 for byte in q4[2:6]] == [0, 9, 8, 15]  # 7.5 + 8.5 = 16 clips to 15
    assert q4[2] >> 4 == 8  # x[16] = 0 -> code 8, in the high nibble of byte 0
    x = np.arange(32, dtype=np.float32) / 2  # min 0, d = 15.5 / 15, codes trunc(x / d + 0.5)
    q41 = ggml_quantize(x, "q4_1")
    d = (np.float32(15.5) / np.float32(15)).astype(np.float16)
    assert q41[:4].view(np.float16).tolist() == [d, 0.0]
    assert q41[4] == 0x80 and q41[-1] == 0xF7  # codes (0, 8) and (7, 15) of x[0], x[16], ...


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_within_one_step(kind):
    x = np.random.default_rng(3).standard_normal((64, 128)).astype(np.float32)
    back = ggml_dequantize(ggml_quantize(x, kind), kind, x.shape)
    blocks = x.reshape(-1, 32).astype(np.float64)
    error = np.abs(back.reshape(-1, 32) - blocks).max(axis=1)
    amax = np.abs(blocks).max(axis=1)
    step = {
        "q8_0": amax / 127 * (0.5 + 127 * 2.0**-11),  # half a step, plus d rounded to float16
        "q4_0": amax / 8 * (1 + 16 * 2.0**-11),  # +max's mirror clips to 7: one step
        "q4_1": np.ptp(blocks, axis=1) / 15 * (0.5 + 15 * 2.0**-11) + amax * 2.0**-11,
    }[kind]
    assert np.all(error <= step + 1e-6 * amax)


@pytest.mark.parametrize(
    ("shape", "out_shape"),
    [((0, 64), (0, 2)), ((4, 0), (4, 0)), ((32,), (1,)), ((2, 3, 64), (2, 3, 2))],
)
def test_shapes(shape, out_shape):
    x = np.ones(shape, np.float32)
    for kind in KINDS:
        blocks = ggml_quantize(x, kind)
        assert blocks.shape == (*out_shape[:-1], out_shape[-1] * TYPE_SIZE[kind])
        back = ggml_dequantize(blocks, kind, shape)
        assert back.shape == shape and back.dtype == np.float32
        np.testing.assert_allclose(back, x, rtol=2.0**-10)  # 1 = 127 * d, d rounded to float16


def test_kind_spellings():
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_array_equal(ggml_quantize(x, "Q4_1"), ggml_quantize(x, "q4_1"))
    _, types = gguf_quants()
    np.testing.assert_array_equal(ggml_quantize(x, types["q8_0"]), ggml_quantize(x, "q8_0"))


@pytest.mark.parametrize(
    ("x", "kind", "error", "message"),
    [
        (np.zeros((2, 64), np.float32), "q5_0", ValueError, "kind must be one of 'q8_0', 'q4_0'"),
        (np.zeros((2, 64), np.float32), 8, TypeError, "kind must be a string"),
        (np.zeros((2, 100), np.float32), "q8_0", ValueError, r"multiple of 32 .* \(2, 100\)"),
        (np.zeros((2, 64), np.int32), "q4_0", TypeError, "float16, float32 or float64"),
        (np.float32(1.0), "q4_0", ValueError, "at least one dimension"),
        (np.full((2, 64), 1e300), "q4_1", ValueError, r"flat index 0 \(position \(0, 0\)\) .*"),
    ],
)
def test_quantize_bad_input(x, kind, error, message):
    with pytest.raises(error, match=message):
        ggml_quantize(x, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_names_first_position(kind, bad):
    x = np.zeros((3, 64), np.float32)
    x[1, 40] = bad
    x[2, 3] = np.nan
    with pytest.raises(
        ValueError, match=rf"x has {bad!r} at flat index 104 \(position \(1, 40\)\)"
    ):
        ggml_quantize(x, kind)


def test_float64_beyond_float32_is_named():
    x = np.zeros((1, 32))
    x[0, 9] = -1e39
    with pytest.raises(
        ValueError, match=r"-1e\+39 at flat index 9 .*\(beyond the float32 range\)"
    ):
        ggml_quantize(x, "q8_0")


@pytest.mark.parametrize(
    ("blocks", "shape", "error", "message"),
    [
        (np.zeros(68, np.uint8), (2, 33), ValueError, "multiple of 32"),
        (np.zeros(67, np.uint8), (2, 32), ValueError, r"want shape \(2, 34\) or \(68,\)"),
        (np.zeros((4, 17), np.uint8), (2, 32), ValueError, r"blocks of shape \(4, 17\)"),
        (np.zeros(68, np.int8), (2, 32), TypeError, r"uint8 .* got dtype int8"),
        (np.zeros(68, np.uint8), (2, -32), ValueError, "shape must be >= 0"),
        (np.zeros(68, np.uint8), (), ValueError, "at least one dimension"),
        (np.zeros(68, np.uint8), 64, TypeError, "shape must be a tuple"),
    ],
)
def test_dequantize_bad_input(blocks, shape, error, message):
    with pytest.raises(error, match=message):
        ggml_dequantize(blocks, "q8_0", shape)


def test_importing_kvq_imports_neither_mlx_nor_gguf():
    code = (
        "import sys, kvq.formats, kvq.testing; "
        "assert not {'mlx', 'gguf'} & set(m.split('.')[0] for m in sys.modules), 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- MLX ------------------------------------------------------------------------------------

MLX_CASES = [(bits, group) for bits in (2, 3, 4, 8) for group in (32, 64)]


def unpacked_codes(qt: kvq.QuantizedTensor) -> np.ndarray:
    """Each element's code, by the little-endian bit stream's definition (slow, obvious)."""
    bits = qt.scheme.bits
    stream = np.unpackbits(qt.codes, bitorder="little")[: qt.size * bits]
    return (stream.reshape(-1, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)


@pytest.mark.parametrize(("bits", "group"), MLX_CASES)
@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_to_mlx_layout_and_round_trip(bits, group, scale_dtype):
    """Without MLX: the triple's layout by hand, and from_mlx(to_mlx(qt)) == qt."""
    k, _ = kv_layer(2, 5, 128, seed=bits)
    qt = kvq.quantize(k, bits, group, scale_dtype=scale_dtype)
    w, scales, biases = to_mlx(qt)
    assert w.dtype == np.uint32 and w.shape == (2, 5, 128 * bits // 32)
    assert scales.dtype == biases.dtype == np.float32
    assert scales.shape == biases.shape == (2, 5, 128 // group)
    codes = unpacked_codes(qt).reshape(2, 5, 128)
    values = scales.repeat(group, -1) * codes.astype(np.float32) + biases.repeat(group, -1)
    np.testing.assert_array_equal(values, qt.dequantize())
    per_word = 32 // bits if 32 % bits == 0 else None
    if per_word:  # the first word holds the first 32 // bits codes, low bits first
        first = sum(int(c) << (bits * i) for i, c in enumerate(codes[0, 0, :per_word]))
        assert int(w[0, 0, 0]) == first
    back = from_mlx(w, scales, biases, group, bits)
    assert back.shape == qt.shape and back.scheme == kvq.Scheme(bits, group, axis=-1)
    np.testing.assert_array_equal(back.codes, qt.codes)
    np.testing.assert_array_equal(back.dequantize(), qt.dequantize())


@pytest.mark.parametrize(("bits", "group"), MLX_CASES)
@pytest.mark.parametrize("kwargs", [{}, {"scale_dtype": "float16"}, {"search": True}])
def test_mlx_dequantize_equals_kvq(bits, group, kwargs):
    mx = mlx_core()
    k, _ = kv_layer(3, 7, 128, seed=group + bits)
    qt = kvq.quantize(k, bits, group, **kwargs)
    w, scales, biases = (mx.array(a) for a in to_mlx(qt))
    got = np.array(mx.dequantize(w, scales, biases, group, bits))
    np.testing.assert_array_equal(got, qt.dequantize())  # exact: both compute s * q + b


@pytest.mark.parametrize(("bits", "group"), MLX_CASES)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_from_mlx_quantize_equals_mlx_dequantize(bits, group, dtype):
    mx = mlx_core()
    x, _ = kv_layer(2, 9, 256, seed=bits)
    xm = mx.array(x).astype(getattr(mx, dtype))
    w, scales, biases = mx.quantize(xm, group, bits)
    expected = np.array(mx.dequantize(w, scales, biases, group, bits).astype(mx.float32))
    qt = from_mlx(w, scales, biases, group, bits)
    got = qt.dequantize()
    assert got.shape == x.shape and qt.scheme.group_size == group
    assert qt.params.scales.dtype == (np.float16 if dtype == "float16" else np.float32)
    if dtype == "float32":
        np.testing.assert_array_equal(got, expected)
    else:  # MLX rounds s * q and the sum to the scale dtype; kvq computes in float32
        unit = {"float16": 2.0**-11, "bfloat16": 2.0**-8}[dtype]
        offsets = qt.params.mins.astype(np.float32).repeat(group).reshape(got.shape)
        product = np.abs(got.astype(np.float64) - offsets)  # |s * q|, to float32 rounding
        tolerance = unit * (product + np.abs(expected)) + 2.0**-24
        assert np.all(np.abs(got - expected) <= tolerance)
        assert not np.array_equal(got, expected)  # the difference is real, not hidden
    # NumPy inputs give the same tensor, and to_mlx gives MLX's words back
    as_numpy = [np.array(a.astype(mx.float32)) for a in (scales, biases)]
    same = from_mlx(np.array(w), *as_numpy, group, bits)
    np.testing.assert_array_equal(same.codes, qt.codes)
    np.testing.assert_array_equal(same.dequantize(), got)
    np.testing.assert_array_equal(to_mlx(qt)[0], np.array(w))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda x: kvq.quantize(x, 4, 32, axis=-2), "grouped along axis -2"),
        (lambda x: kvq.quantize(x, 4, 32, rotate=True), r"rotated \(seed 0\)"),
        (lambda x: kvq.quantize(x, 4, 32, double_quant=True), "double_quant"),
        (lambda x: kvq.quantize(x, 4, 16), r"group_size in \(32, 64, 128\)"),
        (lambda x: kvq.quantize(x[:, :96], 4, 64), r"group_size 64 and shape \(4, 96\)"),
        (lambda x: kvq.quantize(x[0], 4, 32), "at least 2 dims"),
    ],
)
def test_to_mlx_rejects_other_schemes(make, message):
    x = np.random.default_rng(0).standard_normal((4, 128)).astype(np.float32)
    with pytest.raises(ValueError, match=message):
        to_mlx(make(x))


def test_to_mlx_needs_a_quantized_tensor():
    cache = kvq.QuantizedKVCache.quantize(np.zeros((2, 32)), np.zeros((2, 32)))
    with pytest.raises(TypeError, match="QuantizedTensor, got QuantizedKVCache"):
        to_mlx(cache)


def test_from_mlx_bad_input():
    w = np.zeros((4, 16), np.uint32)
    s = np.ones((4, 4), np.float32)
    with pytest.raises(TypeError, match="w must be uint32"):
        from_mlx(w.astype(np.int32), s, s, 32, 4)
    with pytest.raises(TypeError, match="scales must be float16, float32 or bfloat16"):
        from_mlx(w, s.astype(np.int32), s, 32, 4)
    with pytest.raises(ValueError, match=r"bits must be one of kvq's \(2, 3, 4, 8\), got 5"):
        from_mlx(w, s, s, 32, 5)
    with pytest.raises(ValueError, match=r"scales \(4, 2\) .* do not fit group_size=32"):
        from_mlx(w, s[:, :2], s[:, :2], 32, 4)
    with pytest.raises(ValueError, match=r"do not fit group_size=64"):
        from_mlx(w, s, s, 64, 4)
    bad = s.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"biases has nan at flat index 9 \(position \(2, 1\)\)"):
        from_mlx(w, s, bad, 32, 4)
    with pytest.raises(TypeError, match="group_size must be an integer"):
        from_mlx(w, s, s, 32.0, 4)
