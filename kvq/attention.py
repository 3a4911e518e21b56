"""kvq.attention: softmax attention computed directly on a quantized KVCache (phase 4)."""

from __future__ import annotations

import functools
import math

import numba
import numpy as np

from kvq import kernels
from kvq._threads import on_calling_thread
from kvq._validate import check_finite, check_float_dtype, check_int
from kvq.kvcache import CacheView, KVCache
from kvq.rotation import hadamard_rotation

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
    (GPT-OSS). Returns float32 (num_q_heads, t_q, head_dim). A cache's sink tokens
    (``QuantConfig.sink_tokens``) are read from their float32 copy and joined to the kernel's
    softmax over the codes in float64 (``kernels.merge_sink_tokens``). Keys of a
    ``pre_rope`` cache are turned back by RoPE inside the kernel; q comes as the model made
    it (RoPE applied).

    Memory: queries are processed in chunks, so scratch beyond q and the output stays under
    ``SCRATCH_BYTES`` (32 MiB), or one query token's share when that is larger (about
    4 x group x (kv_heads x splits x (head_dim + 2) + threads x (kv_heads x head_dim + 512))
    bytes, splits <= 2 x threads: 1.1 MB for GPT-OSS's 8 KV heads of 64 on 16 threads),
    plus each running task's block of per-token params (at most 16 x block x (kv_heads x
    head_dim / group + 16) bytes: 0.3 MB for Llama-2's 32 heads of 128 in groups of 32).
    Small calls (at most ``SERIAL_WORK`` elements of work) run on the calling thread alone.

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
    sinks_array = (
        _no_sinks(kv_heads, group) if sink_logits is None else sink_logits.reshape(kv_heads, group)
    )
    config = cache.config
    # the rotations R = diag(signs) H / sqrt(dim): q @ R * scale, and out @ R.T for values
    norm = 1.0 / math.sqrt(dim)
    q_signs = _signs(dim, config.k.seed) if config.k.rotate else _NO_SIGNS
    q_factor = np.float32(scale * norm if config.k.rotate else scale)
    v_signs = _signs(dim, config.v.seed) if config.v.rotate else _NO_SIGNS
    rotations = (q_signs, q_factor, v_signs, np.float32(norm))
    with cache.reading() as view:  # a consistent state; appends wait while the kernel reads
        _check_positions(view, t_q, cache.max_queries)
        work = 2 * view.held * kv_heads * dim * max(1, group * t_q // 8)
        args = (view, queries, rotations, group, sinks_array)
        if work <= SERIAL_WORK:  # a parallel launch costs more than it saves
            out = on_calling_thread(_attend_all, *args, causal, start, 1)
        else:
            out = _attend_all(*args, causal, start, numba.get_num_threads())
    if out is None:  # some q * scale (rotated) is not finite
        _raise_queries(original, queries, config.k, scale)
    return out


# Calls of at most this many elements of work (2 x held tokens x kv_heads x head_dim, times
# query rows per KV head over 8) run on the calling thread: below it (about 0.1-0.2 ms of
# work, GPT-OSS's shape at 512 tokens) a parallel launch costs about what it saves, and on a
# loaded machine it waits for every worker thread to be scheduled (milliseconds). On the idle
# 2-core machine 2^17 was tried: SmolLM2's shape at 1K tokens went from 234 to 151 us, but
# 128-token calls at Llama-3's and Llama-2's shapes went from 130-420 to 330-950 us.
SERIAL_WORK = 1 << 19

# no rotation of q or of the output: no signs, read-only like the rotations' (one kernel type)
_NO_SIGNS = np.zeros(0, np.float32)
_NO_SIGNS.flags.writeable = False


def _attend_all(view, queries, rotations, group, sinks, causal, start, threads):
    """float32 (heads, t_q, head_dim): the kernel over query chunks that fit SCRATCH_BYTES;
    None when some scaled query is not finite. rotations: (q_signs, q_factor, v_signs,
    v_factor) as the kernel takes them."""
    heads, t_q, dim = queries.shape
    kv_heads = heads // group
    step = _chunk_tokens(kv_heads, group, dim, threads)
    rows = queries.reshape(kv_heads, group, t_q, dim)
    if step >= t_q:
        out = np.empty((kv_heads, group * t_q, dim), np.float32)
        rows = rows.reshape(kv_heads, group * t_q, dim)
        if _attend(view, rows, rotations, t_q, view.appended, sinks, causal, start, threads, out):
            return None
        return out.reshape(heads, t_q, dim)
    out = np.empty((kv_heads, group, t_q, dim), np.float32)
    for lo in range(0, t_q, step):
        hi = min(t_q, lo + step)
        tokens = hi - lo
        chunk = np.ascontiguousarray(rows[:, :, lo:hi].reshape(kv_heads, group * tokens, dim))
        part = np.empty((kv_heads, group * tokens, dim), np.float32)
        query_end = view.appended - t_q + hi
        if _attend(view, chunk, rotations, tokens, query_end, sinks, causal, start, threads, part):
            return None
        out[:, :, lo:hi] = part.reshape(kv_heads, group, tokens, dim)
        del chunk, part  # before the next chunk's: one chunk's scratch at a time
    return out.reshape(heads, t_q, dim)


def query_chunk(cache: KVCache, group: int, dim: int) -> int:
    """Query tokens per kernel call so that its scratch fits ``SCRATCH_BYTES`` (at least 1)."""
    return _chunk_tokens(cache.num_kv_heads, group, dim, numba.get_num_threads())


def _chunk_tokens(kv: int, group: int, dim: int, threads: int) -> int:
    """Query tokens per kernel call so that its scratch fits ``SCRATCH_BYTES`` (at least 1).

    Per query token (``group`` rows per KV head): the partials, float32 (kv_heads x splits,
    rows, head_dim + 2); the kernel's accumulators, float32 (kv_heads, rows, head_dim) plus
    (rows, block) scores in each of at most ``threads`` running tasks; the chunk's queries
    and output, float32 (kv_heads, rows, head_dim) each, and the merge's float64 weights
    (kv_heads, rows, splits).
    """
    splits = 2 * threads
    per_token = (
        group
        * (4 * kv * splits * (dim + 2) + 4 * threads * (kv * dim + _FUSED_BLOCK) + 8 * kv * dim)
        + 8 * kv * splits * group
    )
    return max(1, SCRATCH_BYTES // per_token)


def _check_positions(view: CacheView, t_q: int, max_queries: int) -> None:
    """Raise unless the last ``t_q`` positions are held and their windows servable."""
    if view.held == 0:
        raise ValueError("the cache is empty: append keys and values before attention")
    end = view.appended
    first = end - view.held
    if t_q > end:
        raise ValueError(
            f"q has {t_q} query tokens but the cache holds {view.held}: the queries' own "
            "keys and values must be appended first"
        )
    if view.window is not None:
        # the first query's window starts at needed (0 early on): every position from there
        # must still be held
        needed = max(0, end - t_q - view.window + 1)
        if needed < first:
            raise ValueError(
                f"the query at position {end - t_q} needs keys from position "
                f"{needed}, but the windowed cache dropped everything before {first}: attend "
                f"each chunk right after appending it, in chunks of at most "
                f"{view.held - view.window + 1} tokens (KVCache max_queries={max_queries})"
            )


_MAX_BLOCK = 128  # tokens per kernel block (per-channel keys: a multiple of their chunk)
# With at most 4 query rows per KV head (a decode step at GQA 1-4) and keys after RoPE, the
# kernel's tiles read the codes themselves and its scratch goes unused: longer blocks then
# cost less per token (each block and head pays for its params, offsets and the softmax's
# rescaling), up to _FUSED_BLOCK tokens at head_dim 64 (half at 128) and as long as one
# block's codes over all KV heads fit L2 (the kernel touches a block's codes ahead of use).
# SmolLM2's shape at 8K, 2 threads, 16 caches cycled: q4 0.313 -> 0.277 ms, mlx(4) 0.429 ->
# 0.359; Llama-3-8B's q4 1.75 -> 1.50 ms; Llama-2-7B's q8 6.07 -> 5.53 (blocks of 128 there:
# 256 tokens of its 32 8-bit heads, 2 MB, were slower again). Not for keys before RoPE or
# per-channel values, which go through scratch (SmolLM2's per-channel values at 8K: 0.356
# -> 0.387 ms with blocks of 512).
_FUSED_BLOCK = 512
_FUSED_ROWS = 4


def _l2_bytes() -> int:
    """The CPU's L2 cache per core in bytes (Linux sysfs), else 512 KiB."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as file:
            text = file.read().strip().upper()
        return int(text[:-1]) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return 512 << 10


_BLOCK_BYTES = _l2_bytes()  # one block's codes over every KV head: at most this


def _block_tokens(view: CacheView, kv_heads: int, group_rows: int, dim: int) -> int:
    """Tokens per kernel block: a power of two, a multiple of a per-channel key chunk."""
    largest = _MAX_BLOCK if dim <= 64 else _MAX_BLOCK // 2  # keep the scratch in L1
    fused = (  # as the kernel decides: its key and value tiles read the codes (no scratch)
        group_rows <= _FUSED_ROWS
        and not view.k.rope_cos.shape[0]
        and not view.v.per_channel
        and dim % 64 == 0
    )
    if fused:
        token_bytes = kv_heads * dim * (view.k.bits + view.v.bits) // 8
        fits = 1 << max(0, (_BLOCK_BYTES // token_bytes).bit_length() - 1)
        longest = _FUSED_BLOCK if dim <= 64 else _FUSED_BLOCK // 2
        largest = max(largest, min(longest, fits))
    k_chunk = view.k.chunk
    return k_chunk * max(1, largest // k_chunk) if view.k.per_channel else largest


def _attend(view, queries, rotations, t_q, query_end, sinks, causal, start, threads, out) -> int:
    """Run the kernel for query rows (kv_heads, group * t_q, head_dim), group-major, whose
    tokens sit at positions query_end - t_q .. query_end - 1; writes ``out`` (same shape).
    Returns the kernel's count of rows whose scaled queries are not finite (0: done)."""
    q_signs, q_factor, v_signs, v_factor = rotations
    kv_heads, group_rows, dim = queries.shape
    end = view.appended
    first = end - view.held
    exact = view.k_sinks.shape[1]  # sink tokens held exactly: positions 0 .. exact - 1
    sink_logits, exact_from, merge = sinks, max(first, start), start < exact
    if merge:  # the kernel reads the codes after them; they join in its float64 merge
        sinks = _no_sinks(kv_heads, sinks.shape[1])
        start = exact
    lowest = max(first, start)
    window = 0 if view.window is None else view.window
    if window:
        lowest = max(lowest, query_end - t_q - window + 1)
    last = query_end - 1 if causal else end - 1
    block = _block_tokens(view, kv_heads, group_rows, dim)
    # walk only the blocks some row sees (no key before the lowest nor after the last)
    stop = max(last + 1, first + 1)
    origin = max(first, min(lowest, stop - 1)) // block * block
    n_blocks = -(-(stop - origin) // block)
    splits = max(1, min(n_blocks, 2 * threads)) if threads > 1 else 1
    head_groups = min(kv_heads, -(-2 * threads // splits)) if threads > 1 else 1
    tasks = kv_heads * splits
    part_max = np.empty((tasks, group_rows), np.float32)
    part_sum = np.empty((tasks, group_rows), np.float32)
    part_acc = np.empty((tasks, group_rows, dim), np.float32)
    return kernels.attention_blocks(
        queries, q_signs, q_factor, t_q, query_end, causal, window, max(first, start), first,
        stop, origin, block, splits, head_groups, tuple(view.k), tuple(view.v), sinks, merge,
        exact_from, exact, view.k_sinks, view.v_sinks, sink_logits, v_signs, v_factor,
        np.empty_like(queries), part_max, part_sum, part_acc, out,
    )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _no_sinks(kv_heads: int, group: int) -> np.ndarray:
    """float64 (kv_heads, group) of -inf: no sink logits (read-only)."""
    sinks = np.full((kv_heads, group), -np.inf)
    sinks.flags.writeable = False
    return sinks


@functools.lru_cache(maxsize=64)
def _signs(dim: int, seed: int) -> np.ndarray:
    """float32 (dim,) of +-1: the signs of ``hadamard_rotation(dim, seed)`` = diag(signs) H /
    sqrt(dim), from its first column (H's is all ones) (read-only)."""
    signs = np.sign(hadamard_rotation(dim, seed)[:, 0]).astype(np.float32)
    signs.flags.writeable = False
    return signs


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
    if array.dtype == np.float64:
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: reported later
            return array, np.ascontiguousarray(array, dtype=np.float32)
    queries = np.ascontiguousarray(array, dtype=np.float32)
    # a read-only array is another Numba type: a second compile of the kernel
    return array, queries if queries.flags.writeable else queries.copy()


def _raise_queries(original, queries: np.ndarray, k_scheme, scale: float) -> None:
    """ValueError for the first non-finite query value, or for an overflowing q * scale
    (rotated first when the keys are), naming its position."""
    with np.errstate(over="ignore", invalid="ignore"):
        converted = np.asarray(original, dtype=np.float32)
        scaled = queries
        if k_scheme.rotate:
            scaled = scaled @ hadamard_rotation(queries.shape[-1], k_scheme.seed)
        scaled = scaled * np.float32(scale)

    def at(index: int) -> str:
        head, token, channel = (int(i) for i in np.unravel_index(index, converted.shape))
        return f"head {head}, token {token}, channel {channel}"

    check_finite("q", converted, "queries must be finite", original, at=at)
    bad = np.argwhere(~np.isfinite(scaled))  # empty only if NumPy's sums stayed finite
    where = f" at head {int(bad[0][0])}, token {int(bad[0][1])}" if len(bad) else ""
    raise ValueError(
        f"q * scale overflows float32{where} (scale {scale!r}, largest |q| "
        f"{float(np.abs(converted).max()):.3g}); use a smaller scale or rescale q"
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
    values.flags.writeable = False  # as _no_sinks's: one kernel type, one compile
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
