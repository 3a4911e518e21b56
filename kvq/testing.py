"""Assertions for test suites that use kvq, in the manner of ``numpy.testing``.

``assert_dequantized_close(x, qt)`` checks kvq's error guarantee element by element;
``assert_attention_close(out, ref, rtol)`` compares attention outputs row by row. Both raise
AssertionError with a message naming the worst offender, and need nothing beyond NumPy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvq._validate import as_float32
from kvq.blocks import QuantizedBlocks
from kvq.cache import QuantizedKVCache
from kvq.rotation import rotate
from kvq.tensor import QuantizedTensor

#: Float32 rounding slack, relative to the largest magnitude a group's arithmetic sees.
RELATIVE_SLACK = 1e-6
#: Absolute slack for groups of subnormal numbers, where float32 spacing is absolute.
ABSOLUTE_SLACK = 2.0**-140


def assert_dequantized_close(x, qt, *, err_msg: str = "") -> None:
    """Assert that ``qt`` dequantizes to within kvq's guaranteed bound of ``x``.

    x: the array that was quantized (any float dtype; compared as the float32 values kvq
    quantized), or a ``(k, v)`` pair for a QuantizedKVCache. qt: a kvq.QuantizedTensor,
    QuantizedBlocks or QuantizedKVCache. Every element must satisfy
    ``|dequantized - x| <= |scale| / 2 + 1e-6 * largest + 2**-140``, where ``scale`` is its
    group's (its block's) stored scale and ``largest`` the largest magnitude among the group's
    values and the ends of its grid ``[min, min + (2**bits - 1) * scale]`` (float32 rounding;
    with ``double_quant`` the grid may reach beyond the values).

    Rotated schemes are checked in the rotated basis, where kvq quantized: ``x`` is rotated as
    ``kvq.quantize`` rotates it, and compared with the dequantized values before rotating
    back (so the bound is per coordinate of ``x @ R``; in the original basis, each row's L2
    error is at most the L2 norm of its coordinates' bounds). With ``search=True``, values
    outside their group's grid are clipped by design: they are compared with the nearest end
    of the grid instead.

    Raises AssertionError naming the number of elements beyond the bound and the worst one
    (largest error over bound): its N-d index, value, dequantized value, bound and group.
    """
    if isinstance(qt, QuantizedKVCache):
        if not (isinstance(x, tuple | list) and len(x) == 2):
            raise TypeError(
                "for a QuantizedKVCache, x must be the (k, v) pair that was quantized, got "
                f"{type(x).__name__}"
            )
        _check_groups(_blocks_groups(x[0], qt.k, "k"), err_msg)
        _check_groups(_blocks_groups(x[1], qt.v, "v"), err_msg)
    elif isinstance(qt, QuantizedBlocks):
        _check_groups(_blocks_groups(x, qt, "x"), err_msg)
    elif isinstance(qt, QuantizedTensor):
        _check_groups(_tensor_groups(x, qt), err_msg)
    else:
        raise TypeError(
            "qt must be a kvq.QuantizedTensor, QuantizedBlocks or QuantizedKVCache, got "
            f"{type(qt).__name__}"
        )


def assert_attention_close(
    out, ref, rtol: float = 1e-5, *, atol: float = 0.0, err_msg: str = ""
) -> None:
    """Assert that attention outputs agree row by row in relative Frobenius (L2) norm.

    out, ref: arrays of one shape, ``(num_q_heads, t_q, head_dim)`` as ``kvq.attention``
    returns (any shape works: rows run along the last axis). Each row (one head, one query)
    must satisfy ``||out[r] - ref[r]|| <= atol + rtol * ||ref[r]||``, computed in float64.
    Per row, so that one wrong head or query is not averaged away by the others; NaN fails.
    A per-row bound of ``rtol / sqrt(head_dim)`` implies an elementwise bound of ``rtol``
    times the largest ``|ref|``.

    Raises AssertionError naming the number of failing rows and the worst one (largest
    error over its allowance): its index, norms, relative error, and its largest element
    difference.
    """
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool | np.bool_) or not isinstance(
            value, int | float | np.floating | np.integer
        ):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
        if not 0 <= value < np.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    out = np.asarray(out)
    ref = np.asarray(ref)
    if out.shape != ref.shape:
        raise AssertionError(
            _join(
                f"Attention outputs have different shapes: out {out.shape}, ref {ref.shape}",
                err_msg,
            )
        )
    if out.ndim == 0:
        raise ValueError("out and ref must have at least one dimension (rows run along the last)")
    if out.size == 0:
        return
    out64 = out.astype(np.float64).reshape(-1, out.shape[-1])
    ref64 = ref.astype(np.float64).reshape(-1, out.shape[-1])
    diff = out64 - ref64
    errors = np.linalg.norm(diff, axis=1)
    norms = np.linalg.norm(ref64, axis=1)
    allowed = atol + rtol * norms
    failing = ~(errors <= allowed)
    if not failing.any():
        return
    with np.errstate(divide="ignore", invalid="ignore"):
        excess = np.where(np.isnan(errors), np.inf, errors / allowed)
    worst = int(np.argmax(np.where(failing, excess, -np.inf)))
    index = tuple(int(i) for i in np.unravel_index(worst, out.shape[:-1]))
    where = f"row {list(index)}"
    if out.ndim == 3:
        where += f" (head {index[0]}, query {index[1]})"
    row = np.abs(diff[worst])
    channel = int(np.argmax(np.where(np.isnan(row), np.inf, row)))
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = errors[worst] / norms[worst]
        overall = np.linalg.norm(diff) / np.linalg.norm(ref64)
    message = (
        f"Attention outputs differ by more than rtol={rtol:g}, atol={atol:g} (relative L2 "
        f"error per row along the last axis) in {int(failing.sum()):,} of {errors.size:,} "
        f"rows.\nWorst {where}: ||out - ref|| = {errors[worst]:.6g}, ||ref|| = "
        f"{norms[worst]:.6g}, relative {relative:.6g}; largest difference at channel "
        f"{channel}: out {out64[worst, channel]:.8g}, ref {ref64[worst, channel]:.8g}.\n"
        f"Overall relative L2 error {overall:.6g}."
    )
    raise AssertionError(_join(message, err_msg))


@dataclass
class _Groups:
    """Values laid out so that each group is a contiguous run of ``values``."""

    values: np.ndarray  # float64, what was quantized
    dequantized: np.ndarray  # float64, same layout
    starts: np.ndarray  # first element of each group
    scales: np.ndarray  # float64 per group
    lows: np.ndarray  # float64 per group: the grid's ends
    highs: np.ndarray
    clipped: bool  # values outside the grid are clipped by design
    index: Callable[[int], str]  # element -> 'x[1, 2, 3]'
    group: Callable[[int], str]  # group -> 'x[1, 2, 0:32]'
    context: str  # scheme, basis


def _tensor_groups(x, qt: QuantizedTensor) -> _Groups:
    original, flat = as_float32("x", x)
    if original.shape != qt.shape:
        raise AssertionError(f"x has shape {original.shape}, qt {qt.shape}")
    scheme = qt.scheme
    values = flat.reshape(qt.shape)
    name = "x"
    dequantized_qt = qt
    context = f"scheme '{scheme.describe()}'"
    if scheme.rotate:
        values = rotate(values, scheme.seed)
        unrotated = dataclasses.replace(scheme, rotate=False)
        dequantized_qt = dataclasses.replace(qt, scheme=unrotated)
        name = "(x @ R)"
        context += (
            f", checked in the rotated basis x @ R, "
            f"R = kvq.rotation.hadamard_rotation({qt.shape[-1]}, {scheme.seed})"
        )
    axis = qt.axis
    moved = np.moveaxis(values, axis, -1)
    rest = moved.shape[:-1]
    length = moved.shape[-1]
    rows = moved.size // length if length else 0
    group = min(scheme.group_size, max(length, 1))
    per_row = -(-length // group)
    starts = (np.arange(rows)[:, None] * length + np.arange(0, length, group)[None, :]).ravel()
    dequantized = np.moveaxis(dequantized_qt.dequantize(), axis, -1)
    scales, mins = (a.astype(np.float64) for a in qt.params.to_float32())
    tops = mins + scheme.max_code * scales

    def position(row: int, piece) -> str:
        index = [str(i) for i in np.unravel_index(row, rest)] if rest else []
        index.insert(axis, str(piece))
        return f"{name}[{', '.join(index)}]"

    def index_of(element: int) -> str:
        row, i = divmod(element, length)
        return position(row, i)

    def group_of(g: int) -> str:
        row, k = divmod(g, per_row)
        return position(row, f"{k * group}:{min((k + 1) * group, length)}")

    return _Groups(
        values=moved.astype(np.float64).reshape(-1),
        dequantized=dequantized.astype(np.float64).reshape(-1),
        starts=starts,
        scales=scales,
        lows=np.minimum(mins, tops),
        highs=np.maximum(mins, tops),
        clipped=scheme.search,
        index=index_of,
        group=group_of,
        context=context,
    )


def _blocks_groups(x, blocks: QuantizedBlocks, name: str) -> _Groups:
    original, flat = as_float32(name, x)
    if original.shape != blocks.shape:
        raise AssertionError(
            f"{name} has shape {original.shape}, the quantized one {blocks.shape}"
        )
    size = flat.size
    block = blocks.block_size
    scales = blocks.scales.astype(np.float64)
    mins = blocks.mins.astype(np.float64)
    tops = mins + 255 * scales

    def index_of(element: int) -> str:
        index = np.unravel_index(element, blocks.shape) if blocks.shape else ()
        return f"{name}[{', '.join(str(i) for i in index)}]"

    def group_of(b: int) -> str:
        return f"flat elements [{b * block}, {min((b + 1) * block, size)}) of {name}"

    return _Groups(
        values=flat.astype(np.float64),
        dequantized=blocks.dequantize().astype(np.float64),
        starts=np.arange(0, size, block),
        scales=scales,
        lows=np.minimum(mins, tops),
        highs=np.maximum(mins, tops),
        clipped=False,
        index=index_of,
        group=group_of,
        context=f"uint8 codes in flat blocks of {block}, {blocks.scale_dtype} scales",
    )


def _check_groups(groups: _Groups, err_msg: str) -> None:
    values = groups.values
    if values.size == 0:
        return
    lengths = np.diff(np.append(groups.starts, values.size))
    owner = np.repeat(np.arange(groups.starts.size), lengths)
    largest = np.fmax.reduceat(np.abs(values), groups.starts)  # a NaN in x fails on its own
    largest = np.maximum(largest, np.maximum(np.abs(groups.lows), np.abs(groups.highs)))
    group_bound = np.abs(groups.scales) / 2 + RELATIVE_SLACK * largest + ABSOLUTE_SLACK
    bound = group_bound[owner]
    target = values
    if groups.clipped:
        target = np.clip(values, groups.lows[owner], groups.highs[owner])
    errors = np.abs(groups.dequantized - target)
    failing = ~(errors <= bound)  # NaN fails
    if not failing.any():
        return
    excess = np.where(np.isnan(errors), np.inf, errors / bound)
    worst = int(np.argmax(np.where(failing, excess, -np.inf)))
    g = int(owner[worst])
    clip_note = ""
    if groups.clipped and target[worst] != values[worst]:
        clip_note = f" (compared with the grid's end {target[worst]:.8g}: search clips it)"
    message = (
        f"Dequantized values exceed kvq's error bound at {int(failing.sum()):,} of "
        f"{values.size:,} elements ({groups.context}).\n"
        f"Worst {groups.index(worst)}: value {values[worst]:.8g}, dequantized "
        f"{groups.dequantized[worst]:.8g}{clip_note}, |error| {errors[worst]:.6g} > bound "
        f"{bound[worst]:.6g} ({excess[worst]:.3g}x).\n"
        f"Its group {g} of {groups.starts.size:,}, {groups.group(g)}: scale "
        f"{groups.scales[g]:.6g}, grid [{groups.lows[g]:.8g}, {groups.highs[g]:.8g}]; bound = "
        f"|scale| / 2 + {RELATIVE_SLACK:g} * {largest[g]:.6g} (largest magnitude) + 2**-140."
    )
    raise AssertionError(_join(message, err_msg))


def _join(message: str, err_msg: str) -> str:
    return f"{message}\n{err_msg}" if err_msg else message
