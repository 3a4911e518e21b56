"""Input checks shared by the public API. Each raises with the argument's name and value."""

import math
import operator
from collections.abc import Callable

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
SCALE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def as_float32(name: str, x) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(original, flat)``: the input as an ndarray, and its float32[size] C-order form.

    Accepts NumPy arrays and anything ``np.asarray`` takes (lists, objects with ``__array__``,
    torch CPU tensors) of float16, float32 or float64 in either byte order. Non-contiguous input is
    copied. Raises TypeError for other dtypes.
    """
    original = np.asarray(x)
    check_float_dtype(name, original.dtype)
    flags = original.flags
    if original.dtype == np.float32 and flags.c_contiguous and flags.aligned:
        return original, original.reshape(-1)  # the common case, without np.require
    with np.errstate(over="ignore"):  # float64 beyond float32 becomes inf, reported later
        # C-contiguous and aligned ("CA"): kernels load whole vectors assuming 4-byte alignment
        flat = np.require(original, np.float32, requirements="CA").reshape(-1)
    return original, flat


def check_float_dtype(name: str, dtype: np.dtype) -> None:
    """TypeError unless ``dtype`` is float16, float32 or float64 (either byte order)."""
    if dtype in FLOAT_DTYPES:  # native order: the common case, without a new dtype object
        return
    if dtype.newbyteorder("=") not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must hold float16, float32 or float64 values, got dtype {dtype}; "
            f"convert it first, e.g. {name}.astype(np.float32)"
        )


def check_finite(
    name: str,
    values: np.ndarray,
    rule: str,
    original: np.ndarray | None = None,
    shape: tuple[int, ...] | None = None,
    at: Callable[[int], str] | None = None,
) -> None:
    """ValueError naming ``name``'s first non-finite element of ``values``, else nothing.

    The message: '{name} has {value} at {where}[ ({why})]; {rule}'. ``original``: the array as
    given, of the same size, when ``values`` is its float32 conversion: the value shown is the
    original one, and ``why`` says 'non-finite' or 'beyond the float32 range'. ``where`` is
    ``at(flat index)`` if given, else 'flat index i (position ...)' in ``shape`` (default: the
    shape of ``original``, else of ``values``).
    """
    flat = values.reshape(-1)
    if np.isfinite(flat).all():
        return
    index = int(np.flatnonzero(~np.isfinite(flat))[0])
    source = values if original is None else np.asarray(original)
    value = float(source.reshape(-1)[index])
    if at is not None:
        where = at(index)
    else:
        where = f"flat index {position(index, source.shape if shape is None else shape)}"
    why = ""
    if original is not None:
        why = " (beyond the float32 range)" if math.isfinite(value) else " (non-finite)"
    raise ValueError(f"{name} has {value!r} at {where}{why}; {rule}")


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (NumPy integers accepted; bools and floats refused)."""
    if type(value) is int and value >= minimum:  # the common case, checked first
        return value
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, got {type(value).__name__} {value!r}"
        ) from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def check_block_size(block_size) -> int:
    """An integer >= 1."""
    return check_int("block_size", block_size, 1)


def check_scale_dtype(scale_dtype) -> np.dtype:
    """'float32' or 'float16' (or the NumPy types) -> np.dtype."""
    try:
        dtype = np.dtype(scale_dtype)
    except (TypeError, ValueError):  # ValueError: e.g. ("f4", -1)
        dtype = None
    if dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be 'float32' or 'float16', got {scale_dtype!r}")
    return dtype


def check_range(start, end, size: int) -> tuple[int, int]:
    """Integers with 0 <= start <= end <= size, else IndexError naming the bounds."""
    try:
        if isinstance(start, bool | np.bool_) or isinstance(end, bool | np.bool_):
            raise TypeError
        start = operator.index(start)
        end = size if end is None else operator.index(end)
    except TypeError:
        raise TypeError(f"start and end must be integers, got {start!r} and {end!r}") from None
    if not 0 <= start <= end <= size:
        raise IndexError(
            f"element range [{start}, {end}) is outside [0, {size}]: "
            f"need 0 <= start <= end <= {size}"
        )
    return start, end


def check_out(out, size: int) -> np.ndarray:
    """A new float32[size] if ``out`` is None, else ``out`` checked to fit, viewed 1-D."""
    if out is None:
        return np.empty(size, np.float32)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.dtype != np.float32:
        raise TypeError(f"out must have dtype float32, got {out.dtype}")
    flags = out.flags
    if out.size != size or not (flags.c_contiguous and flags.writeable and flags.aligned):
        raise ValueError(
            f"out must be a writeable, aligned, C-contiguous float32 array of {size} elements, "
            f"got shape {out.shape}, contiguous={flags.c_contiguous}, "
            f"writeable={flags.writeable}, aligned={flags.aligned}"
        )
    # a plain 1-D ndarray view: subclasses such as np.matrix stay 2-D under reshape(-1)
    return out.view(np.ndarray).reshape(-1)


def position(index: int, shape: tuple[int, ...]) -> str:
    """A flat index and, for N-D shapes, its multi-index: '7' or '7 (position (0, 1, 3))'."""
    if len(shape) <= 1:
        return str(index)
    return f"{index} (position {tuple(int(i) for i in np.unravel_index(index, shape))})"
