"""kvq.attention: softmax attention computed directly on a quantized KVCache (phase 4)."""

from __future__ import annotations

import math

import numba
import numpy as np

from kvq import kernels
from kvq._validate import check_finite, check_float_dtype, check_int
from kvq.kvcache import KVCache, TensorStream
from kvq.rotation import hadamard_rotation

_DUMMY = np.zeros((1, 1), np.uint8)


# Scratch for one kernel call (partial softmaxes, the kernel's per-task accumulators, the
# float64 merge) stays under this many bytes: the queries are taken in chunks that fit.
SCRATCH_BYTES = 32 << 20


def attention(
    q,
    cache: KVCache,
    scale: float | None = None,
    sinks=None,
    causal: bool = True,
    start: int = 0,
):
    """Attention of queries ``q`` over everything ``cache`` holds, read from its codes.

    q: (num_q_heads, t_q, head_dim), num_q_heads a multiple of the cache's num_kv_heads
    (grouped-query attention: query head h reads KV head h // (num_q_heads / num_kv_heads)).
    The queries sit at the cache's last t_q positions (append a prefill chunk's K/V first):
    with ``causal`` a query at position p sees positions <= p, and a windowed cache limits
    that to p - window < position (a windowed cache serves up to its ``max_queries`` query
    tokens). ``start``: positions below it are never attended (left padding); a query before
    ``start`` sees nothing and gets zeros. ``scale`` defaults to 1/sqrt(head_dim). ``sinks``:
    (num_q_heads,) logits that join each head's softmax denominator and carry no value
    (GPT-OSS). Returns float32 (num_q_heads, t_q, head_dim).

    Memory: besides the float32 output, one float32 copy of q (scaled, rotated) and, per
    chunk of queries, scratch under ``SCRATCH_BYTES`` (32 MiB; :func:`query_chunk`), or one
    query token's share when that is larger (about 4 x group x (kv_heads x splits x
    (head_dim + 2) + threads x (kv_heads x head_dim + 128)) bytes, splits <= 2 x threads:
    0.9 MB for GPT-OSS's 8 KV heads of 64 on 16 threads). Measured (tracemalloc, 2 threads)
    on a GPT-OSS layer (64 query heads, 8 KV heads of 64) for 2,048 queries over 2,048
    tokens: 89 MiB in all, of which 32 are the output and 32 the copy of q; before the
    chunking, 754 MiB (the partials grow with the thread count).

    q, sinks and scale must be finite: NaN or +-Inf raises ValueError naming the argument and
    the position, and so does a ``q * scale`` that overflows float32. The cache's lock is held
    while it is read, so a concurrent append waits (see :class:`KVCache`).
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a kvq.KVCache, got {type(cache).__name__}")
    original, queries = _check_queries(q, cache)
    heads, t_q, dim = queries.shape
    kv_heads = cache.num_kv_heads
    group = heads // kv_heads
    sink_logits = _check_sinks(sinks, heads)
    scale = _check_scale(scale, dim)
    start = check_int("start", start, 0)
    k_scheme, v_scheme = cache.config.k, cache.config.v
    with np.errstate(over="ignore", invalid="ignore"):  # reported below, by position
        if k_scheme.rotate:  # one copy of q: rotated and scaled together
            rotation = hadamard_rotation(dim, k_scheme.seed).astype(np.float32)
            queries = queries @ (rotation * np.float32(scale))
        else:
            queries = queries * np.float32(scale)
    if not np.isfinite(queries).all():
        _raise_queries(original, queries, scale)
    # rows of one KV head: (query head within the group, query token)
    rows = queries.reshape(kv_heads, group, t_q, dim)
    out = np.empty((kv_heads, group, t_q, dim), np.float32)
    unrotate = hadamard_rotation(dim, v_scheme.seed).T if v_scheme.rotate else None
    with cache._lock:  # a consistent state, and no append while the kernel reads the store
        positions = _query_positions(cache, t_q)
        step = query_chunk(cache, group, dim)
        for lo in range(0, t_q, step):
            hi = min(t_q, lo + step)
            chunk = np.ascontiguousarray(
                rows[:, :, lo:hi].reshape(kv_heads, group * (hi - lo), dim), dtype=np.float32
            )
            part_max, part_sum, part_acc, splits = _attend(
                cache, chunk, positions[lo:hi], causal, start
            )
            merged = _merge(
                part_max, part_sum, part_acc, kv_heads, splits, group, hi - lo, sink_logits
            )
            if unrotate is not None:
                merged = merged @ unrotate
            out[:, :, lo:hi] = merged.reshape(kv_heads, group, hi - lo, dim)
            del chunk, part_max, part_sum, part_acc, merged  # before the next chunk's
    return out.reshape(heads, t_q, dim)


def query_chunk(cache: KVCache, group: int, dim: int) -> int:
    """Query tokens per kernel call so that its scratch fits ``SCRATCH_BYTES`` (at least 1).

    Per query token (``group`` rows per KV head): the rows, float32 (kv_heads, rows,
    head_dim); the partials, float32 (kv_heads x splits, rows, head_dim + 2); the kernel's
    accumulators, float32 (kv_heads, rows, head_dim) plus (rows, block) scores in each of at
    most ``threads`` running tasks; the merge, two float64 (kv_heads, rows, head_dim) and at
    most six float64 (kv_heads, splits, rows) at a time.
    """
    return max(1, SCRATCH_BYTES // scratch_per_query(cache.num_kv_heads, group, dim))


def scratch_per_query(kv_heads: int, group: int, dim: int) -> int:
    """Bytes of scratch one query token costs (see :func:`query_chunk`)."""
    threads = numba.get_num_threads()
    splits = 2 * threads
    per_row = 4 * kv_heads * dim  # the rows
    per_row += 4 * kv_heads * splits * (dim + 2)  # partials
    per_row += 4 * threads * (kv_heads * dim + _MAX_BLOCK)  # kernel tasks
    per_row += 16 * kv_heads * dim + 48 * kv_heads * splits  # merge
    return group * per_row


def _query_positions(cache: KVCache, t_q: int) -> np.ndarray:
    """Absolute positions of the last ``t_q`` tokens, checked to be held and servable."""
    if cache.held == 0:
        raise ValueError("the cache is empty: append keys and values before attention")
    end = len(cache)
    first = end - cache.held
    positions = np.arange(end - t_q, end, dtype=np.int64)
    if t_q > end:
        raise ValueError(
            f"q has {t_q} query tokens but the cache holds {cache.held}: the queries' own "
            "keys and values must be appended first"
        )
    if cache.window is not None:
        needed = max(0, positions[0] - cache.window + 1)
        if needed < first:
            raise ValueError(
                f"the query at position {positions[0]} needs keys from position {needed}, "
                f"but the windowed cache dropped everything before {first}: attend each "
                f"chunk right after appending it, in chunks of at most "
                f"{cache.held - cache.window + 1} tokens (KVCache max_queries="
                f"{cache.max_queries})"
            )
    return positions


_MAX_BLOCK = 128  # tokens per kernel block (per-channel keys: a multiple of their chunk)


def _attend(
    cache: KVCache, rows: np.ndarray, positions: np.ndarray, causal: bool, start: int
) -> tuple:
    """Run the kernel for query rows at ``positions``: (part_max, part_sum, part_acc, splits).

    rows: float32 (kv_heads, group * len(positions), head_dim), group-major.
    """
    kv_heads, group_rows, dim = rows.shape
    t_q = positions.size
    group = group_rows // t_q
    end = len(cache)
    first = end - cache.held
    last = positions if causal else np.full(t_q, end - 1, np.int64)
    lowest = np.full(t_q, max(first, start), np.int64)
    if cache.window is not None:
        lowest = np.maximum(lowest, positions - cache.window + 1)
    row_first = np.tile(lowest, group)
    row_last = np.tile(last, group)

    k_stream, v_stream = cache._k, cache._v
    k_chunk = k_stream.chunk
    per_channel = cache.config.k.axis in (-2, 1)
    block = k_chunk * max(1, _MAX_BLOCK // k_chunk) if per_channel else _MAX_BLOCK
    # walk only the blocks some row sees (no key before the lowest nor after the last)
    stop = max(int(last.max()) + 1, first + 1)
    origin = max(first, min(int(lowest.min()), stop - 1)) // block * block
    n_blocks = -(-(stop - origin) // block)
    threads = numba.get_num_threads()
    splits = max(1, min(n_blocks, 2 * threads))  # token ranges; each walks every head,
    head_groups = min(kv_heads, -(-2 * threads // splits))  # or a share of them when few
    tasks = kv_heads * splits
    part_max = np.empty((tasks, group * t_q), np.float32)
    part_sum = np.empty((tasks, group * t_q), np.float32)
    part_acc = np.empty((tasks, group * t_q, dim), np.float32)
    kernels.attention_blocks(
        rows, row_first, row_last, origin, first, stop, block, splits, head_groups,
        *_stream_arrays(k_stream),
        *_stream_arrays(v_stream),
        part_max, part_sum, part_acc,
    )  # fmt: skip
    return part_max, part_sum, part_acc, splits


def _stream_arrays(stream: TensorStream) -> tuple:
    """(layout, codes, p0, p1, p2, p3, residual) of a stream for the kernel, params as bytes."""
    scheme = stream.scheme
    store = stream.store
    if scheme.double_quant:
        params = [store[key] for key in ("scale_codes", "min_codes", "super_scales", "super_mins")]
    else:
        params = [store["scales"], store["mins"], _DUMMY, _DUMMY]
    params = [p.view(np.uint8) for p in params]
    layout = np.array(
        [
            scheme.bits,
            scheme.axis in (-2, 1),
            scheme.group_size,
            stream.chunk,
            stream.first_chunk,
            stream.chunks,
            stream.slots,
            scheme.double_quant,
            scheme.scale_dtype == "float16",
            stream.pending.shape[1],
            stream.heads,
            stream.head_dim,
        ],
        np.int64,
    )
    residual = np.ascontiguousarray(stream.pending, dtype=np.float32)
    return (layout, store["codes"], *params, residual)


def _merge(part_max, part_sum, part_acc, kv_heads, splits, group, t_q, sinks):
    """Combine the tasks' partial softmaxes (and the sinks) into float64 (heads, t_q, head_dim).

    One split at a time, so the float64 scratch is two (kv_heads, rows, head_dim) arrays.
    """
    dim = part_acc.shape[-1]
    m = part_max.reshape(kv_heads, splits, group * t_q).astype(np.float64)
    s = part_sum.reshape(kv_heads, splits, group * t_q).astype(np.float64)
    acc = part_acc.reshape(kv_heads, splits, group * t_q, dim)
    top = m.max(axis=1)
    if sinks is not None:
        sink = np.repeat(sinks.reshape(kv_heads, group), t_q, axis=1)
        top = np.maximum(top, sink)
    with np.errstate(invalid="ignore"):  # -inf - -inf for rows that see nothing
        weight = np.where(np.isfinite(m), np.exp(m - top[:, None, :]), 0.0)
    total = (s * weight).sum(axis=1)
    if sinks is not None:
        total += np.exp(sink - top)
    out = np.zeros((kv_heads, group * t_q, dim), np.float64)
    for split in range(splits):
        out += acc[:, split] * weight[:, split, :, None]
    out /= np.where(total > 0, total, 1.0)[..., None]
    return out.reshape(kv_heads * group, t_q, dim)


def _check_queries(q, cache: KVCache) -> tuple[np.ndarray, np.ndarray]:
    """(q as given, q as float32 C-contiguous); finiteness is checked after scaling."""
    array = np.asarray(q)
    check_float_dtype("q", array.dtype)
    if array.ndim != 3:
        raise ValueError(f"q must have shape (num_q_heads, t_q, head_dim), got {array.shape}")
    heads, t_q, dim = array.shape
    if dim != cache.head_dim:
        raise ValueError(f"q has head_dim {dim}, the cache {cache.head_dim}")
    if heads < 1 or heads % cache.num_kv_heads:
        raise ValueError(
            f"q has {heads} heads, which is not a positive multiple of the cache's "
            f"{cache.num_kv_heads} KV heads"
        )
    if t_q < 1:
        raise ValueError("q must hold at least one query token")
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32: reported later
        queries = np.ascontiguousarray(array, dtype=np.float32)
    return array, queries


def _raise_queries(original: np.ndarray, queries: np.ndarray, scale: float) -> None:
    """ValueError for the first non-finite query value, or for an overflowing q * scale."""
    with np.errstate(over="ignore", invalid="ignore"):
        converted = np.asarray(original, dtype=np.float32)

    def at(index: int) -> str:
        head, token, channel = (int(i) for i in np.unravel_index(index, converted.shape))
        return f"head {head}, token {token}, channel {channel}"

    check_finite("q", converted, "queries must be finite", original, at=at)
    head, token = (int(i) for i in np.argwhere(~np.isfinite(queries))[0][:2])
    raise ValueError(
        f"q * scale overflows float32 at head {head}, token {token} (scale {scale!r}, largest "
        f"|q| {float(np.abs(converted).max()):.3g}); use a smaller scale or rescale q"
    )


def _check_sinks(sinks, heads: int) -> np.ndarray | None:
    """(heads,) float64 finite sink logits, or None."""
    if sinks is None:
        return None
    array = np.asarray(sinks)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"sinks must hold real numbers, got dtype {array.dtype}")
    values = array.astype(np.float64)
    if values.shape != (heads,):
        raise ValueError(
            f"sinks must have shape ({heads},), one per query head, got {values.shape}"
        )
    check_finite("sinks", values, "sinks must be finite (pass sinks=None for no sinks)")
    return values


def _check_scale(scale, dim: int) -> float:
    """``scale`` as a finite float, 1/sqrt(dim) when None."""
    if scale is None:
        return 1.0 / math.sqrt(dim)
    array = np.asarray(scale)
    if array.ndim != 0 or array.dtype.kind not in "fiu":
        raise TypeError(f"scale must be a real number, got {type(scale).__name__} {scale!r}")
    value = float(array)
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {value!r}")
    return value


def _reference_array(name: str, x, ndim: int) -> np.ndarray:
    """``x`` as float64 with ``ndim`` dims, real-valued and finite."""
    array = np.asarray(x)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    values = array.astype(np.float64)
    check_finite(name, values, f"{name} must be finite")
    return values


def attention_reference(
    q, k, v, scale: float | None = None, sinks=None, causal: bool = True, window=None
) -> np.ndarray:
    """Plain float64 NumPy attention: q (Hq, t_q, d), k and v (Hkv, T, d) -> (Hq, t_q, d).

    Query i sits at position T - t_q + i; with ``causal`` it sees positions <= its own, and
    ``window`` W limits that to positions > p - W. ``sinks`` (Hq,) join the denominator.
    Inputs are checked as :func:`attention` checks them: real, finite, shapes that fit.
    """
    q = _reference_array("q", q, 3)
    k = _reference_array("k", k, 3)
    v = _reference_array("v", v, 3)
    heads, t_q, dim = q.shape
    kv_heads, tokens, _ = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if k.shape[2] != dim:
        raise ValueError(f"q has head_dim {dim}, k and v {k.shape[2]}")
    if kv_heads < 1 or heads < 1 or heads % kv_heads:
        raise ValueError(
            f"q has {heads} heads, which is not a positive multiple of k's {kv_heads} heads"
        )
    if not 1 <= t_q <= tokens:
        raise ValueError(f"q has {t_q} query tokens; it needs 1 to {tokens} (k's tokens)")
    if window is not None:
        window = check_int("window", window, 1)
    group = heads // kv_heads
    scale = _check_scale(scale, dim)
    sinks = _check_sinks(sinks, heads)
    kk = np.repeat(k, group, axis=0)
    vv = np.repeat(v, group, axis=0)
    scores = np.einsum("hqd,htd->hqt", q, kk) * scale
    positions = np.arange(tokens)
    query_positions = np.arange(tokens - t_q, tokens)[:, None]
    visible = np.ones((t_q, tokens), bool)
    if causal:
        visible &= positions[None, :] <= query_positions
    if window is not None:
        visible &= positions[None, :] > query_positions - window
    scores = np.where(visible[None], scores, -np.inf)
    top = scores.max(axis=-1, keepdims=True)
    if sinks is not None:
        top = np.maximum(top, sinks[:, None, None])
    weights = np.exp(scores - top)
    total = weights.sum(axis=-1, keepdims=True)
    if sinks is not None:
        total = total + np.exp(sinks[:, None, None] - top)
    return np.einsum("hqt,htd->hqd", weights / total, vv)
