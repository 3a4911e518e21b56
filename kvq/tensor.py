"""kvq.quantize: group-wise affine quantization at 2, 3, 4 or 8 bits -> QuantizedTensor."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvq import _rows, kernels
from kvq._format import FLOAT16_MAX, MIN_OFFSET, SUB_BITS, SUPER_GROUPS
from kvq._validate import as_float32, check_finite
from kvq.rotation import rotate as rotate_last_axis
from kvq.rotation import unrotate
from kvq.scheme import Scheme

_FINITE_ONLY = "kvq quantizes finite values only"


@dataclass(frozen=True, eq=False)
class GroupParams:
    """Per-group scales and mins, stored directly (float32 or float16)."""

    scales: np.ndarray
    mins: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.scales.nbytes + self.mins.nbytes

    def to_float32(self) -> tuple[np.ndarray, np.ndarray]:
        return self.scales.astype(np.float32, copy=False), self.mins.astype(np.float32, copy=False)


@dataclass(frozen=True, eq=False)
class DoubleQuantParams:
    """Scales and mins quantized again: per group 6-bit codes ``sc`` and ``mc`` (packed), per
    SUPER_GROUPS groups float16 ``d`` and ``dmin``; scale = d * sc, min = dmin * (mc - 32)."""

    scale_codes: np.ndarray  # packed 6-bit
    min_codes: np.ndarray  # packed 6-bit, offset by 32
    super_scales: np.ndarray  # float16
    super_mins: np.ndarray  # float16
    n_groups: int

    @property
    def nbytes(self) -> int:
        return (
            self.scale_codes.nbytes
            + self.min_codes.nbytes
            + self.super_scales.nbytes
            + self.super_mins.nbytes
        )

    def to_float32(self) -> tuple[np.ndarray, np.ndarray]:
        sc = _unpack(self.scale_codes, SUB_BITS, self.n_groups).astype(np.float32)
        mc = _unpack(self.min_codes, SUB_BITS, self.n_groups).astype(np.float32) - MIN_OFFSET
        owner = np.arange(self.n_groups) // SUPER_GROUPS
        d = self.super_scales.astype(np.float32)[owner]
        dmin = self.super_mins.astype(np.float32)[owner]
        return d * sc, dmin * mc


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A tensor quantized group-wise by ``scheme``.

    codes: the codes as a little-endian bit stream (``scheme.bits`` each) in the order of the
    tensor with ``scheme.axis`` moved last; params: per-group scales and mins. ``dequantize``
    returns float32 of ``shape``. ``bits_per_element`` counts every stored bit. With
    ``scheme.channel_bits`` each channel (a row of the moved tensor) has its own width and
    starts on a byte (the layout of ``kvq._rows``); the widths live in the scheme.
    """

    codes: np.ndarray
    params: GroupParams | DoubleQuantParams
    shape: tuple[int, ...]
    dtype: np.dtype
    scheme: Scheme

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes, scales and mins (and second-level scales)."""
        return self.codes.nbytes + self.params.nbytes

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / self.size if self.size else float("nan")

    @property
    def axis(self) -> int:
        """The grouping axis, non-negative."""
        return self.scheme.axis % len(self.shape)

    def dequantize(self) -> np.ndarray:
        """float32 array of ``shape`` (rotated back when the scheme rotates)."""
        moved_shape = _moved_shape(self.shape, self.axis)
        length = moved_shape[-1] if moved_shape else 1
        rows = self.size // length if length else 0
        group = min(self.scheme.group_size, max(length, 1))
        padded = -(-length // group) * group
        if self.scheme.channel_bits is None:
            codes = _unpack(self.codes, self.scheme.bits, self.size).reshape(rows, length)
        else:
            widths = _rows.row_widths(self.scheme.channel_bits, moved_shape[:-1])
            codes = _rows.unpack_rows(self.codes, widths, length)
        if padded != length:
            codes = np.pad(codes, ((0, 0), (0, padded - length)))
        scales, mins = self.params.to_float32()
        values = np.empty((rows, padded), np.float32)
        if values.size:
            kernels.dequantize_blocks(codes.reshape(-1), scales, mins, group, values.reshape(-1))
        moved = values[:, :length].reshape(moved_shape)
        out = np.moveaxis(moved, -1, self.axis)
        if self.scheme.rotate:
            out = unrotate(out, self.scheme.seed)
        return np.ascontiguousarray(out, dtype=np.float32)

    def parts(self) -> dict[str, np.ndarray]:
        """The stored arrays by name (1-D each): what :meth:`from_parts` takes back."""
        if isinstance(self.params, DoubleQuantParams):
            p = self.params
            return {
                "codes": self.codes,
                "scale_codes": p.scale_codes,
                "min_codes": p.min_codes,
                "super_scales": p.super_scales,
                "super_mins": p.super_mins,
            }
        return {"codes": self.codes, "scales": self.params.scales, "mins": self.params.mins}

    @classmethod
    def from_parts(
        cls, parts: dict[str, np.ndarray], shape: tuple[int, ...], dtype, scheme: Scheme
    ) -> QuantizedTensor:
        """Rebuild from :meth:`parts` (e.g. chunks stacked along a new leading axis)."""
        if scheme.double_quant:
            moved = _moved_shape(tuple(shape), scheme.axis % len(shape))
            length = moved[-1]
            group = min(scheme.group_size, max(length, 1))
            n_groups = (math.prod(shape) // length) * -(-length // group) if length else 0
            params = DoubleQuantParams(
                parts["scale_codes"],
                parts["min_codes"],
                parts["super_scales"],
                parts["super_mins"],
                n_groups,
            )
        else:
            params = GroupParams(parts["scales"], parts["mins"])
        return cls(parts["codes"], params, tuple(shape), np.dtype(dtype), scheme)

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(shape={self.shape}, scheme='{self.scheme.describe()}', "
            f"bits_per_element={self.bits_per_element:.3f}, nbytes={self.nbytes:,})"
        )


def quantize(
    x,
    bits: int | None = None,
    group_size: int | None = None,
    axis: int | None = None,
    scale_dtype=None,
    rotate: bool | None = None,
    double_quant: bool | None = None,
    search: bool | None = None,
    scheme: Scheme | None = None,
    seed: int | None = None,
) -> QuantizedTensor:
    """Quantize ``x`` group-wise: groups of ``group_size`` consecutive elements along ``axis``
    share a min and a scale = (max - min) / (2**bits - 1); codes are packed densely.

    Every element comes back within scale / 2 (plus float32 rounding; with ``rotate``, in the
    rotated basis, so in L2 norm) unless ``search`` clips it. The keywords are
    :class:`kvq.Scheme`'s, with its defaults (8 bits, groups of 32 along axis -1, float32
    scales, no rotation, no double_quant, no search, seed 0); or pass ``scheme=`` to reuse
    one, and no other keyword (ValueError: they would conflict).
    """
    options = {
        "bits": bits,
        "group_size": group_size,
        "axis": axis,
        "scale_dtype": scale_dtype,
        "rotate": rotate,
        "double_quant": double_quant,
        "search": search,
        "seed": seed,
    }
    given = {name: value for name, value in options.items() if value is not None}
    if scheme is None:
        scheme = Scheme(**given)
    elif not isinstance(scheme, Scheme):
        raise TypeError(f"scheme must be a kvq.Scheme, got {scheme!r}")
    elif given:
        raise ValueError(
            f"pass either scheme= or the scheme's keywords, not both: got scheme="
            f"{scheme.describe()!r} and {', '.join(f'{k}={v!r}' for k, v in given.items())}"
        )
    original, flat = as_float32("x", x)
    if original.ndim == 0:
        raise ValueError("x must have at least one dimension, got a 0-d array")
    if not -original.ndim <= scheme.axis < original.ndim:
        raise ValueError(f"axis {scheme.axis} is out of range for x with {original.ndim} dims")
    axis = scheme.axis % original.ndim
    values = flat.reshape(original.shape)
    if scheme.rotate:
        if original.shape[-1] & (original.shape[-1] - 1) or not original.shape[-1]:
            raise ValueError(
                f"rotate needs the last axis to be a power of two long, got {original.shape[-1]}"
            )
        # a rotation would smear a NaN over its row
        check_finite("x", flat, _FINITE_ONLY, original=original)
        values = rotate_last_axis(values, scheme.seed)
    moved = values if axis == values.ndim - 1 else np.moveaxis(values, axis, -1)
    moved = np.ascontiguousarray(moved)
    length = moved.shape[-1]
    rows = moved.size // length if length else 0
    group = min(scheme.group_size, max(length, 1))
    padded = -(-length // group) * group
    grid = moved.reshape(rows, length)
    if padded != length and rows:
        # repeat each row's last value: the short last group keeps its own min and max
        grid = np.concatenate([grid, np.repeat(grid[:, -1:], padded - length, axis=1)], axis=1)
    grid_flat = np.ascontiguousarray(grid).reshape(-1)
    row_groups = max(padded // group, 1) if group else 1
    last_count = length - (row_groups - 1) * group  # real values in each row's last group
    n_groups = grid_flat.size // group if group else 0
    codes = np.empty(grid_flat.size, np.uint8)
    levels = np.float32(scheme.max_code)
    half = scheme.scale_dtype == "float16"
    peak = np.abs(grid_flat).max() if half and grid_flat.size else 0.0
    if not np.isfinite(peak):  # name the position, as without float16 scales
        _raise_rejected(original, flat, scheme)
    if peak > FLOAT16_MAX:
        raise ValueError(
            f"x has values beyond +-{FLOAT16_MAX:g}, which float16 scales and mins cannot "
            "hold; use scale_dtype='float32'"
        )
    if scheme.channel_bits is not None:
        widths = _rows.row_widths(scheme.channel_bits, moved.shape[:-1])
        packed, stored = _quantize_rows(
            grid_flat, widths, group, row_groups, last_count, padded, length, scheme,
            original, flat,
        )  # fmt: skip
        return QuantizedTensor(packed, stored, tuple(original.shape), original.dtype, scheme)
    scales = np.empty(n_groups, np.float32)
    mins = np.empty(n_groups, np.float32)
    if grid_flat.size:
        bits_view = grid_flat.view(np.int32)
        if not (scheme.double_quant or scheme.search):
            rejected = kernels.quantize_blocks(
                grid_flat, bits_view, group, levels, half, codes, scales, mins
            )
            if rejected:
                _raise_rejected(original, flat, scheme)
        else:
            lows = np.empty(n_groups, np.float32)
            highs = np.empty(n_groups, np.float32)
            if kernels.extrema_blocks(bits_view, group, lows, highs):
                _raise_rejected(original, flat, scheme)
            if not np.all(highs.astype(np.float64) - lows <= float(kernels.MAX_RANGE_F32)):
                _raise_rejected(original, flat, scheme)
            if scheme.search:
                kernels.search_blocks(
                    grid_flat,
                    group,
                    row_groups,
                    last_count,
                    levels,
                    half,
                    lows,
                    highs,
                    scales,
                    mins,
                )
            else:
                scales, mins = _minmax_params(lows, highs, levels, half)
            if scheme.double_quant:
                grid_arg = grid_flat if scheme.search else None
                params, scales, mins = _double_quantize(
                    scales, mins, levels, grid_arg, group, row_groups, last_count
                )
            kernels.encode_blocks(grid_flat, group, levels, scales, mins, codes)
    if scheme.double_quant:
        stored = params if grid_flat.size else _empty_double_quant()
    else:
        dtype = np.dtype(scheme.scale_dtype)
        stored = GroupParams(scales.astype(dtype), mins.astype(dtype))
    if padded != length:
        codes = codes.reshape(rows, padded)[:, :length].reshape(-1)
    return QuantizedTensor(
        codes=_pack(codes, scheme.bits),
        params=stored,
        shape=tuple(original.shape),
        dtype=original.dtype,
        scheme=scheme,
    )


def _quantize_rows(
    grid_flat, widths, group, row_groups, last_count, padded, length, scheme, original, flat
):  # fmt: skip
    """(packed codes, params) of a grid whose rows have their own widths (``widths``, int64
    (rows,)): each width's rows are searched and encoded at their own levels, and second-level
    scales are taken over all groups in order, as with one width."""
    rows = widths.size
    n_groups = rows * row_groups
    half = scheme.scale_dtype == "float16"
    scales = np.empty(n_groups, np.float32)
    mins = np.empty(n_groups, np.float32)
    codes = np.empty((rows, padded), np.uint8)
    lows = np.empty(n_groups, np.float32)
    highs = np.empty(n_groups, np.float32)
    grid = grid_flat.reshape(rows, padded)
    members = []  # (width, levels, rows, their groups, their values)
    if n_groups:
        if kernels.extrema_blocks(grid_flat.view(np.int32), group, lows, highs):
            _raise_rejected(original, flat, scheme)
        if not np.all(highs.astype(np.float64) - lows <= float(kernels.MAX_RANGE_F32)):
            _raise_rejected(original, flat, scheme)
        if half and np.maximum(np.abs(lows), np.abs(highs)).max() > FLOAT16_MAX:
            raise ValueError(
                f"x has values beyond +-{FLOAT16_MAX:g}, which float16 scales and mins cannot "
                "hold; use scale_dtype='float32'"
            )
    for width, chosen in _rows.classes(widths):
        levels = np.float32((1 << width) - 1)
        groups = (chosen[:, None] * row_groups + np.arange(row_groups)).reshape(-1)
        values = np.ascontiguousarray(grid[chosen]).reshape(-1)
        members.append((width, levels, chosen, groups, values))
        if scheme.search:
            found_scales = np.empty(groups.size, np.float32)
            found_mins = np.empty(groups.size, np.float32)
            kernels.search_blocks(
                values, group, row_groups, last_count, levels, half, lows[groups],
                highs[groups], found_scales, found_mins,
            )  # fmt: skip
            scales[groups], mins[groups] = found_scales, found_mins
        else:
            scales[groups], mins[groups] = _minmax_params(
                lows[groups], highs[groups], levels, half
            )
    if scheme.double_quant:
        group_levels = np.empty(n_groups, np.float32)
        for _, levels, _, groups, _ in members:
            group_levels[groups] = levels
        refine = [(levels, groups, values) for _, levels, _, groups, values in members]
        if n_groups:
            stored, scales, mins = _double_quantize(
                scales, mins, group_levels, None, group, row_groups, last_count,
                classes=refine if scheme.search else None,
            )  # fmt: skip
        else:
            stored = _empty_double_quant()
    else:
        dtype = np.dtype(scheme.scale_dtype)
        stored = GroupParams(scales.astype(dtype), mins.astype(dtype))
    for _, levels, chosen, groups, values in members:
        encoded = np.empty(values.size, np.uint8)
        kernels.encode_blocks(
            values, group, levels, np.ascontiguousarray(scales[groups]),
            np.ascontiguousarray(mins[groups]), encoded,
        )  # fmt: skip
        codes[chosen] = encoded.reshape(chosen.size, padded)
    return _rows.pack_rows(np.ascontiguousarray(codes[:, :length]), widths), stored


def _quantize_with(scheme: Scheme, x) -> QuantizedTensor:
    """``kvq.quantize(x, scheme=scheme)``."""
    return quantize(x, scheme=scheme)


# bound here, not defined in kvq.scheme, so that kvq.scheme imports nothing from this module
Scheme.quantize = _quantize_with


def _moved_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    rest = shape[:axis] + shape[axis + 1 :]
    return (*rest, shape[axis])


def _minmax_params(lows, highs, levels, half) -> tuple[np.ndarray, np.ndarray]:
    """Plain min/max scales and mins (float16 rounded outward with ``half``), in NumPy."""
    if not half:
        return (highs - lows) / levels, lows.copy()
    mins = _f16_round(lows, down=True)
    return _f16_round((highs - mins) / levels, down=False), mins


def _f16_round(values: np.ndarray, down: bool) -> np.ndarray:
    """float16-representable float32 values rounded toward -inf (down) or +inf."""
    h = values.astype(np.float16)
    wrong = h.astype(np.float32) > values if down else h.astype(np.float32) < values
    h[wrong] = np.nextafter(h[wrong], np.float16(-np.inf if down else np.inf))
    return h.astype(np.float32)


def _double_quantize(
    scales,
    mins,
    levels,
    grid: np.ndarray | None = None,
    group: int = 0,
    row_groups: int = 1,
    last_count: int = 0,  # with grid: real values in each row's last group
    classes: list | None = None,
) -> tuple[DoubleQuantParams, np.ndarray, np.ndarray]:
    """Second-level quantization of per-group (scale, min), SUPER_GROUPS groups at a time:
    the params, and the float32 scales and mins they store (``params.to_float32()``).

    Per super-group, float16 steps ``d`` (scales) and ``dmin`` (mins); per group, 6-bit codes.
    Min codes round down and scale codes up, so every group's grid still spans
    ``[min, min + levels * scale]`` and the scale / 2 bound holds for the stored values.
    With ``grid`` (after a range search: the values, ``group`` per block), each group then
    tries its codes +-1 and keeps the lowest squared error (``row_groups`` groups a row, the
    last holding ``last_count`` real values). ``levels`` may be per group (channel widths);
    ``classes``, [(levels, group indices, their values)], refine each width's groups so.
    """
    n = scales.size
    n_super = -(-n // SUPER_GROUPS)

    def per_group(a: np.ndarray) -> np.ndarray:
        return a.repeat(SUPER_GROUPS)[:n]

    d = np.empty(n_super, np.float32)
    dmin = np.empty(n_super, np.float32)
    sc = np.empty(n, np.int64)
    mc = np.empty(n, np.int64)
    every = np.ascontiguousarray(np.reshape(levels, -1), dtype=np.float32)
    needed = np.empty(n, np.float32)
    if kernels.second_level_codes(scales, mins, every, needed, d, dmin, sc, mc):
        raise ValueError(
            "x spans a range too wide for double_quant's float16 second-level scales "
            f"(largest group min {np.abs(mins).max():.3g}, scale {scales.max():.3g}); "
            "turn double_quant off"
        )
    for class_levels, groups, values in classes or ():
        class_sc, class_mc = sc[groups], mc[groups]
        kernels.refine_subcodes(
            values, group, row_groups, last_count, np.float32(class_levels),
            np.ascontiguousarray(per_group(d)[groups]),
            np.ascontiguousarray(per_group(dmin)[groups]), class_sc, class_mc,
        )  # fmt: skip
        sc[groups], mc[groups] = class_sc, class_mc
    if grid is not None:
        kernels.refine_subcodes(
            grid,
            group,
            row_groups,
            last_count,
            np.float32(levels),
            per_group(d),
            per_group(dmin),
            sc,
            mc,
        )
    params = DoubleQuantParams(
        scale_codes=_pack(sc.astype(np.uint8), SUB_BITS),
        min_codes=_pack(mc.astype(np.uint8), SUB_BITS),
        super_scales=d.astype(np.float16),
        super_mins=dmin.astype(np.float16),
        n_groups=n,
    )
    # what params.to_float32() decodes, from the codes at hand (d, dmin float16-exact)
    scales = per_group(d) * sc.astype(np.float32)
    mins = per_group(dmin) * (mc - MIN_OFFSET).astype(np.float32)
    return params, scales, mins


def _empty_double_quant() -> DoubleQuantParams:
    empty = np.empty(0, np.uint8)
    return DoubleQuantParams(empty, empty, np.empty(0, np.float16), np.empty(0, np.float16), 0)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return codes
    packed = np.empty(-(-codes.size * bits // 8), np.uint8)
    if codes.size:
        kernels.pack_codes(codes, bits, packed)
    return packed


def _unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    if bits == 8:
        return packed[:n]
    codes = np.empty(n, np.uint8)
    if n:
        kernels.unpack_codes(packed, bits, codes)
    return codes


def _raise_rejected(original: np.ndarray, flat: np.ndarray, scheme: Scheme) -> None:
    """ValueError naming the first non-finite element, or the range that overflowed."""
    check_finite("x", flat, _FINITE_ONLY, original=original)
    raise ValueError("x has a group whose max - min exceeds 2**127 (1.7e38); rescale the tensor")
