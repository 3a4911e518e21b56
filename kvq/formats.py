"""Interchange with other quantized formats: GGML's q8_0, q4_0, q4_1 bytes, and MLX's affine
``(w, scales, biases)`` triples.

``ggml_quantize`` / ``ggml_dequantize`` give the same bytes and values as the ``gguf``
package's ``gguf.quants.quantize`` / ``dequantize`` (tested equal on random and adversarial
data), in Numba kernels. ``to_mlx`` / ``from_mlx`` convert a :class:`kvq.QuantizedTensor`
with groups along the last axis to and from what ``mx.quantize`` returns. kvq never imports
``gguf`` or ``mlx``: these functions work on NumPy arrays (``from_mlx`` also takes
``mx.array`` inputs, converting them with NumPy).
"""

from __future__ import annotations

import math

import numpy as np

from kvq import kernels
from kvq._validate import as_float32, check_finite, check_int
from kvq.kernels import ggml
from kvq.scheme import BITS, Scheme
from kvq.tensor import QuantizedTensor

#: GGML kinds by name: (kernel id, bytes per block of 32 values).
GGML_KINDS = {
    "q8_0": (ggml.Q8_0, ggml.TYPE_SIZE[ggml.Q8_0]),
    "q4_0": (ggml.Q4_0, ggml.TYPE_SIZE[ggml.Q4_0]),
    "q4_1": (ggml.Q4_1, ggml.TYPE_SIZE[ggml.Q4_1]),
}
GGML_BLOCK = ggml.BLOCK  # values per GGML block
#: Group sizes MLX's affine quantization supports.
MLX_GROUP_SIZES = (32, 64, 128)


def ggml_quantize(x, kind) -> np.ndarray:
    """Quantize ``x`` to GGML ``kind`` blocks: the bytes ``gguf.quants.quantize`` gives.

    x: float16/32/64 array, at least 1-D, whose last axis is a multiple of 32 (each run of 32
    values along it is one block); it is rounded to float32 first, as gguf does. kind:
    'q8_0' (34 bytes per block: 8.5 bits per value), 'q4_0' (18 bytes: 4.5 bits) or 'q4_1'
    (20 bytes: 5.0 bits), case-insensitive, or a ``gguf.GGMLQuantizationType`` of those.
    Returns uint8 of shape ``(*x.shape[:-1], x.shape[-1] // 32 * bytes_per_block)``.

    NaN and +-Inf (and float64 values beyond the float32 range) raise ValueError naming the
    first one's flat index: gguf would write meaningless bytes for them.
    """
    name, kind_id, type_size = _check_kind(kind)
    original, flat = as_float32("x", x)
    if original.ndim == 0:
        raise ValueError("x must have at least one dimension, got a 0-d array")
    length = original.shape[-1]
    if length % GGML_BLOCK:
        raise ValueError(
            f"x's last axis must be a multiple of {GGML_BLOCK} (GGML's block size) for "
            f"{name}, got shape {original.shape}; pad the last axis to "
            f"{-(-length // GGML_BLOCK) * GGML_BLOCK}"
        )
    n_blocks = flat.size // GGML_BLOCK
    out = np.empty((n_blocks, type_size), np.uint8)
    if n_blocks:
        d = np.empty(n_blocks, np.float32)
        m = np.empty(n_blocks if kind_id == ggml.Q4_1 else 0, np.float32)
        blocks = flat.reshape(n_blocks, GGML_BLOCK)
        if kernels.ggml_quantize_blocks(blocks, kind_id, out, d, m):
            check_finite("x", flat, "GGML blocks hold finite values only", original)
        out[:, 0:2] = _float16_bytes(d)
        if kind_id == ggml.Q4_1:
            out[:, 2:4] = _float16_bytes(m)
    return out.reshape(*original.shape[:-1], length // GGML_BLOCK * type_size)


def ggml_dequantize(blocks, kind, shape) -> np.ndarray:
    """float32 array of ``shape`` from GGML ``kind`` blocks, as ``gguf.quants.dequantize``.

    blocks: uint8 array holding exactly the blocks of ``shape``: either gguf's layout
    ``(*shape[:-1], shape[-1] // 32 * bytes_per_block)`` or flat. shape: the values' shape,
    last axis a multiple of 32. kind: as for :func:`ggml_quantize`. Scales that are Inf or
    NaN in the bytes decode to Inf or NaN values, as in gguf.
    """
    name, kind_id, type_size = _check_kind(kind)
    shape = _check_shape(shape)
    if shape[-1] % GGML_BLOCK:
        raise ValueError(
            f"shape's last axis must be a multiple of {GGML_BLOCK} (GGML's block size), "
            f"got shape {shape}"
        )
    if isinstance(blocks, bytes | bytearray | memoryview):
        blocks = np.frombuffer(blocks, np.uint8)
    blocks = np.asarray(blocks)
    if blocks.dtype != np.uint8:
        raise TypeError(
            f"blocks must be a uint8 array of {name} bytes, got dtype {blocks.dtype}; "
            "view raw data with .view(np.uint8)"
        )
    n_blocks = math.prod(shape) // GGML_BLOCK
    byte_shape = (*shape[:-1], shape[-1] // GGML_BLOCK * type_size)
    if blocks.size != n_blocks * type_size or (blocks.ndim != 1 and blocks.shape != byte_shape):
        raise ValueError(
            f"blocks of shape {blocks.shape} do not hold the {name} blocks of shape {shape}: "
            f"want shape {byte_shape} or ({n_blocks * type_size},) "
            f"({n_blocks} blocks of {type_size} bytes)"
        )
    out = np.empty((n_blocks, GGML_BLOCK), np.float32)
    if n_blocks:
        rows = np.ascontiguousarray(blocks).reshape(n_blocks, type_size)
        kernels.ggml_dequantize_blocks(rows, kind_id, out)
    return out.reshape(shape)


def to_mlx(qt: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(w, scales, biases)`` in MLX's affine layout, as NumPy arrays (new copies).

    qt: a :class:`kvq.QuantizedTensor` of at least 2 dims, grouped along the last axis
    (``axis=-1``) in groups of 32, 64 or 128 that divide it, without ``rotate`` or
    ``double_quant``; any bits kvq has (2, 3, 4, 8) and either scale dtype. For ``x`` of shape
    ``(..., n)``: w uint32 ``(..., n * bits // 32)`` (codes packed from the low bits up, as
    ``mx.quantize`` packs them, 3-bit included); scales and biases float32
    ``(..., n // group_size)``, so each value is ``scales * code + biases``.

    Hand them to MLX with ``mx.array``: ``mx.dequantize(mx.array(w), mx.array(scales),
    mx.array(biases), group_size, bits)`` then equals ``qt.dequantize()`` exactly (MLX
    computes ``scales * code + biases`` in float32, as kvq does). Scales are float32 even for
    float16 schemes so that this holds; ``.astype(np.float16)`` on them is exact, but MLX then
    computes in float16.
    """
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a kvq.QuantizedTensor, got {type(qt).__name__}")
    scheme = qt.scheme
    ndim = len(qt.shape)
    if ndim < 2:
        raise ValueError(
            f"MLX quantizes arrays of at least 2 dims, qt has shape {qt.shape}; "
            "quantize x[None] instead"
        )
    if qt.axis != ndim - 1:
        raise ValueError(
            f"MLX groups along the last axis; qt is grouped along axis {scheme.axis} of "
            f"{ndim} (scheme '{scheme.describe()}'): quantize with axis=-1"
        )
    if scheme.rotate:
        raise ValueError(
            f"MLX has no rotation; qt is rotated (seed {scheme.seed}): quantize without "
            "rotate, or rotate the inputs yourself"
        )
    if scheme.double_quant:
        raise ValueError(
            "MLX stores one scale and bias per group; qt uses double_quant (second-level "
            "scales): quantize with double_quant=False"
        )
    length = qt.shape[-1]
    group = scheme.group_size
    if group not in MLX_GROUP_SIZES or length % group:
        raise ValueError(
            f"MLX needs group_size in {MLX_GROUP_SIZES} dividing the last axis; qt has "
            f"group_size {group} and shape {qt.shape}"
        )
    lead = qt.shape[:-1]
    n_bytes = qt.size * scheme.bits // 8
    if qt.codes.size != n_bytes:
        raise ValueError(f"qt.codes holds {qt.codes.size} bytes, {n_bytes} expected")
    codes = np.ascontiguousarray(qt.codes, dtype=np.uint8)
    w = codes.view("<u4").astype(np.uint32).reshape(*lead, length * scheme.bits // 32)
    scales, mins = qt.params.to_float32()
    scales = np.array(scales, np.float32).reshape(*lead, length // group)
    biases = np.array(mins, np.float32).reshape(*lead, length // group)
    return w, scales, biases


def from_mlx(w, scales, biases, group_size: int, bits: int) -> QuantizedTensor:
    """A :class:`kvq.QuantizedTensor` holding MLX's affine quantization ``(w, scales,
    biases)``: scheme ``Scheme(bits, group_size, axis=-1)``, its float32 or float16 scales
    kept as they are (bfloat16 ones converted to float32, exactly).

    w: uint32 ``(..., n * bits // 32)``; scales, biases: ``(..., n // group_size)``, finite;
    NumPy arrays or ``mx.array``s (as ``mx.quantize(x, group_size, bits)`` returns them).
    bits: 2, 3, 4 or 8. Returns a tensor of shape ``(..., n)``. Its ``dequantize()``
    computes ``scales * code + biases`` in float32: equal to ``mx.dequantize`` for float32
    scales; for float16 (bfloat16) scales MLX rounds the product and the sum to that dtype,
    so the two differ by at most ``2**-11`` (``2**-8``) times ``|scales * code| + |value|``,
    plus ``2**-24`` for float16 subnormals. kvq's ``scale / 2`` bound does not apply: MLX
    nudges scales so that zero is on the grid, and its error bound is one step.
    """
    w = _as_numpy(w)
    scales = _as_numpy(scales)
    biases = _as_numpy(biases)
    group_size = check_int("group_size", group_size, 1)
    bits = check_int("bits", bits, 1)
    if bits not in BITS:
        raise ValueError(f"bits must be one of kvq's {BITS}, got {bits}")
    if w.dtype != np.uint32:
        raise TypeError(f"w must be uint32 (MLX's packed codes), got dtype {w.dtype}")
    if w.ndim < 1:
        raise ValueError("w must have at least one dimension, got a 0-d array")
    for name, array in (("scales", scales), ("biases", biases)):
        if array.dtype.newbyteorder("=") not in (np.float16, np.float32):
            raise TypeError(
                f"{name} must be float16, float32 or bfloat16 (as MLX stores them), got dtype "
                f"{array.dtype}"
            )
    lead = w.shape[:-1]
    per_row = w.shape[-1] * 32 // bits  # codes in each row of w
    n_groups = per_row // group_size
    if (
        per_row * bits != w.shape[-1] * 32
        or n_groups * group_size != per_row
        or scales.shape != (*lead, n_groups)
        or biases.shape != scales.shape
    ):
        need = per_row / group_size
        fits = (
            f"scales and biases of shape {(*lead, n_groups)}"
            if n_groups == need
            else f"a whole number of groups, not {need:g}"
        )
        raise ValueError(
            f"w {w.shape}, scales {scales.shape} and biases {biases.shape} do not fit "
            f"group_size={group_size} and bits={bits}: each row of w holds "
            f"{w.shape[-1] * 32 / bits:g} codes, which need {fits}"
        )
    dtype = np.dtype(np.float16 if scales.dtype == biases.dtype == np.float16 else np.float32)
    scales = np.ascontiguousarray(scales, dtype=dtype).reshape(-1)
    biases = np.ascontiguousarray(biases, dtype=dtype).reshape(-1)
    for name, array in (("scales", scales), ("biases", biases)):
        check_finite(name, array, "kvq holds finite values only", shape=(*lead, n_groups))
    codes = np.ascontiguousarray(w, dtype="<u4").reshape(-1).view(np.uint8).copy()
    scheme = Scheme(bits, group_size, axis=-1, scale_dtype=str(dtype))
    shape = (*lead, n_groups * group_size)
    parts = {"codes": codes, "scales": scales.copy(), "mins": biases.copy()}
    return QuantizedTensor.from_parts(parts, shape, dtype, scheme)


def _check_kind(kind) -> tuple[str, int, int]:
    """(name, kernel id, bytes per block) of a GGML kind given by name or gguf enum."""
    if isinstance(kind, str):
        name = kind.lower()
    elif isinstance(getattr(kind, "name", None), str):  # gguf.GGMLQuantizationType
        name = kind.name.lower()
    else:
        raise TypeError(f"kind must be a string such as 'q8_0', got {type(kind).__name__}")
    if name not in GGML_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, GGML_KINDS))}, got {kind!r}")
    return (name, *GGML_KINDS[name])


def _check_shape(shape) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple of integers, got {shape!r}") from None
    if not dims:
        raise ValueError("shape must have at least one dimension, got ()")
    return tuple(check_int("shape", d, 0) for d in dims)


def _float16_bytes(values: np.ndarray) -> np.ndarray:
    """(n, 2) uint8: float32 ``values`` rounded to little-endian float16 (overflow -> inf)."""
    with np.errstate(over="ignore"):
        return values.astype("<f2").view(np.uint8).reshape(-1, 2)


def _as_numpy(a) -> np.ndarray:
    """NumPy view of a NumPy or MLX array; MLX bfloat16 becomes float32 (exactly)."""
    if isinstance(a, np.ndarray):
        return a
    if type(a).__module__.startswith("mlx"):
        import mlx.core as mx  # the caller already uses MLX

        if a.dtype == mx.bfloat16:
            a = a.astype(mx.float32)
    return np.asarray(a)
