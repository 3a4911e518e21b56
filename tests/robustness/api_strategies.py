"""Hypothesis strategies and plain-NumPy helpers shared by the API robustness tests."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kvq
from kvq.scheme import SUB_BITS, SUPER_GROUPS

BITS = (2, 3, 4, 8)
FLOAT_DTYPES = (np.float16, np.float32, np.float64)
#: Magnitudes each input dtype can hold with every group's max - min within 2**127.
MAGNITUDES = {
    np.float16: [1e-6, 1.0, 1e3, 6e4],
    np.float32: [1e-42, 1e-30, 1e-6, 1.0, 1e4, 1e30, 8e37],
    np.float64: [1e-42, 1e-6, 1.0, 1e6, 1e37],
}
LAYOUTS = ("c", "swapped", "fortran", "strided", "reversed", "readonly", "unaligned", "list")


def with_layout(x: np.ndarray, layout: str):
    """``x``'s values in another memory layout (or as nested lists): what users pass in."""
    if layout == "c":
        return x
    if layout == "swapped":
        return x.astype(x.dtype.newbyteorder())
    if layout == "fortran":
        return np.asfortranarray(x)
    if layout == "strided":
        base = np.zeros((*x.shape[:-1], 2 * x.shape[-1]), x.dtype)
        base[..., ::2] = x
        return base[..., ::2]
    if layout == "reversed":
        return x[::-1].copy()[::-1]
    if layout == "readonly":
        y = x.copy()
        y.flags.writeable = False
        return y
    if layout == "unaligned":
        raw = bytearray(x.nbytes + 1)
        y = np.ndarray(x.shape, x.dtype, buffer=raw, offset=1)
        y[...] = x
        return y
    if layout == "list":
        return x.tolist()
    raise AssertionError(layout)


@st.composite
def float_arrays(draw, max_dims: int = 3, max_side: int = 12, dtypes=FLOAT_DTYPES):
    """(x, magnitude): a float16/32/64 array of 1-3 dims, values in [-1, 1] * magnitude, with
    a constant run (a constant group) sometimes."""
    dtype = draw(st.sampled_from(dtypes))
    magnitude = draw(st.sampled_from(MAGNITUDES[dtype]))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=max_dims, min_side=1, max_side=max_side))
    x = (unit_values(draw, shape) * magnitude).astype(dtype)
    if draw(st.booleans()):
        flat = x.reshape(-1)
        lo = draw(st.integers(0, flat.size - 1))
        flat[lo : draw(st.integers(lo, flat.size))] = flat[lo]
    return x, magnitude


def unit_values(draw, shape: tuple[int, ...]) -> np.ndarray:
    """float64 values in [-1, 1] of ``shape``: drawn one by one (so Hypothesis can shrink
    them) for small arrays, from a drawn seed for larger ones (drawing each is slow)."""
    if math.prod(shape) <= 64:
        return draw(hnp.arrays(np.float64, shape, elements=st.floats(-1, 1, width=32)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    values = rng.uniform(-1, 1, shape).astype(np.float32).astype(np.float64)
    if draw(st.booleans()):  # heavy tails: a few large values among small ones
        values *= rng.random(shape) ** 8
    return values


def group_ids(shape: tuple[int, ...], axis: int, group_size: int) -> np.ndarray:
    """Each element's group index in kvq.quantize's order (axis moved last, rows of groups)."""
    axis %= len(shape)
    length = shape[axis]
    moved = (*shape[:axis], *shape[axis + 1 :], length)
    group = min(group_size, max(length, 1))
    per_row = -(-length // group)
    rows = math.prod(shape) // length if length else 0
    ids = np.arange(rows)[:, None] * per_row + (np.arange(length) // group)[None, :]
    return np.moveaxis(ids.reshape(moved), -1, axis)


def element_params(qt: kvq.QuantizedTensor) -> tuple[np.ndarray, np.ndarray]:
    """(scale, min) of each element's group, float64, in the tensor's layout."""
    scales, mins = qt.params.to_float32()
    ids = group_ids(qt.shape, qt.axis, qt.scheme.group_size)
    return scales.astype(np.float64)[ids], mins.astype(np.float64)[ids]


def half_scale_bound(x32: np.ndarray, qt: kvq.QuantizedTensor) -> np.ndarray:
    """The README's bound per element: scale / 2, plus float32 rounding of 1e-6 of the
    largest magnitude the group's grid spans (its values and its stored min and max), plus
    2**-140 for subnormal groups."""
    scale, low = element_params(qt)
    ids = group_ids(qt.shape, qt.axis, qt.scheme.group_size)
    largest = np.zeros(int(ids.max()) + 1 if ids.size else 0)
    np.maximum.at(largest, ids.reshape(-1), np.abs(x32.astype(np.float64)).reshape(-1))
    grid = np.maximum(np.abs(low), np.abs(low + qt.scheme.max_code * scale))
    return scale / 2 + 1e-6 * np.maximum(largest[ids], grid) + 2.0**-140


def expected_nbytes(qt: kvq.QuantizedTensor) -> int:
    """Bytes kvq must report for ``qt``, by hand: packed codes plus per-group parameters."""
    scheme = qt.scheme
    n_groups = int(group_ids(qt.shape, qt.axis, scheme.group_size).max()) + 1 if qt.size else 0
    codes = -(-qt.size * scheme.bits // 8)
    if scheme.double_quant:
        supers = -(-n_groups // SUPER_GROUPS)
        return codes + 2 * -(-n_groups * SUB_BITS // 8) + 2 * 2 * supers
    return codes + 2 * n_groups * np.dtype(scheme.scale_dtype).itemsize


# --- KV caches -------------------------------------------------------------------------------


@st.composite
def schemes(draw, head_dim: int, rotate: int | None = None) -> kvq.Scheme:
    axis = draw(st.sampled_from([-1, -2]))
    if axis == -2:  # groups run across tokens: keep chunks short enough to fill
        group_size = draw(st.sampled_from([1, 2, 3, 4, 8]))
    else:
        group_size = draw(st.sampled_from([1, 3, 4, 8, 16, 32, 64]))
    return kvq.Scheme(
        bits=draw(st.sampled_from(BITS)),
        group_size=group_size,
        axis=axis,
        scale_dtype=draw(st.sampled_from(["float32", "float16"])),
        rotate=rotate is not None,
        seed=rotate or 0,
        double_quant=draw(st.booleans()),
        search=draw(st.booleans()),
    )


@dataclass
class Setup:
    heads: int
    head_dim: int
    config: kvq.QuantConfig
    window: int | None
    capacity: int | None
    steps: list[int]
    k: np.ndarray
    v: np.ndarray

    def build(self, pool: kvq.MemoryPool | None = None) -> kvq.KVCache:
        return kvq.KVCache(
            self.heads,
            self.head_dim,
            self.config,
            capacity=self.capacity,
            window=self.window,
            pool=pool,
        )

    def feed(self, cache: kvq.KVCache, upto: int | None = None) -> None:
        at = 0
        for step in self.steps[:upto]:
            cache.append(self.k[:, at : at + step], self.v[:, at : at + step])
            at += step

    @property
    def total(self) -> int:
        return sum(self.steps)


def chunk_possible(config: kvq.QuantConfig, heads: int, head_dim: int) -> bool:
    from kvq.kvcache import chunk_tokens

    try:
        for scheme in (config.k, config.v):
            chunk_tokens(scheme, heads, head_dim)
    except ValueError:
        return False
    return True


@st.composite
def cache_setups(
    draw, max_tokens: int = 80, allow_capacity: bool = True, magnitudes=(1e-3, 1.0, 300.0)
) -> Setup:
    """A KVCache configuration (schemes, rotation, residual, window or capacity) and the K/V
    of ``steps`` appends."""
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([4, 8, 16, 32]))
    rotate = draw(st.one_of(st.none(), st.integers(0, 2**32)))
    config = kvq.QuantConfig(
        k=draw(schemes(head_dim, rotate)),
        v=draw(schemes(head_dim, rotate)),
        residual=draw(st.sampled_from([0, 0, 1, 3, 6])),
        sink_tokens=draw(st.sampled_from([0, 0, 1, 3])),
    )
    if not chunk_possible(config, heads, head_dim):  # documented ValueError; not this test's
        plain = kvq.Scheme(rotate=rotate is not None, seed=rotate or 0)  # 8-bit per token
        config = replace(config, k=plain, v=plain)
    steps = draw(st.lists(st.integers(1, 12), min_size=1, max_size=8))
    while sum(steps) > max_tokens:
        steps.pop()
    window = draw(st.one_of(st.none(), st.integers(1, 40)))
    capacity = None
    if window is None and allow_capacity and draw(st.booleans()):
        capacity = sum(steps) + draw(st.integers(0, 5))
    magnitude = draw(st.sampled_from(magnitudes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    k, v = (rng.standard_normal((2, heads, sum(steps), head_dim)) * magnitude).astype(np.float32)
    return Setup(heads, head_dim, config, window, capacity, steps, k, v)


def snapshot(cache: kvq.KVCache) -> dict:
    """Everything observable about a cache, and its stored arrays, copied."""
    state = {
        "len": len(cache),
        "held": cache.held,
        "positions": cache.positions.copy(),
        "keys": cache.keys().copy(),
        "values": cache.values().copy(),
        "stats": cache.stats(),
        "nbytes": cache.nbytes,
    }
    for name in ("_k", "_v"):
        stream = getattr(cache, name)
        state[name] = (
            stream.appended,
            stream.chunks,
            stream.first_chunk,
            stream.slots,
            stream.pending.copy(),
            {key: array.copy() for key, array in stream.store.items()},
        )
    return state


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if key in ("_k", "_v"):
            *counts, pending, store = value
            *counts_after, pending_after, store_after = after[key]
            assert counts == counts_after, key
            np.testing.assert_array_equal(pending, pending_after)
            assert store.keys() == store_after.keys()
            for part in store:
                np.testing.assert_array_equal(store[part], store_after[part])
        elif isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, after[key])
        elif isinstance(value, dict):
            assert value.keys() == after[key].keys()
            for k in value:
                same = value[k] == after[key][k] or (
                    value[k] != value[k] and after[key][k] != after[key][k]
                )
                assert same, (k, value[k], after[key][k])
        else:
            assert value == after[key], key


def assert_same_contents(a: kvq.KVCache, b: kvq.KVCache) -> None:
    """Two caches hold the same tokens, chunk for chunk (unused storage slots aside)."""
    assert len(a) == len(b) and a.held == b.held and a.stats().keys() == b.stats().keys()
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.keys(), b.keys())
    np.testing.assert_array_equal(a.values(), b.values())
    for name in ("_k", "_v"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert (sa.appended, sa.chunks, sa.first_chunk) == (sb.appended, sb.chunks, sb.first_chunk)
        np.testing.assert_array_equal(sa.pending, sb.pending)
        for key in sa.store:
            for c in range(sa.first_chunk, sa.chunks):
                np.testing.assert_array_equal(
                    sa.store[key][c % sa.slots], sb.store[key][c % sb.slots]
                )
