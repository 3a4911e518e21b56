"""Per-channel code widths (``Scheme.channel_bits``) chosen from how much each channel's
error costs.

A key channel's quantization error reaches the attention scores multiplied by the query's
value in that channel: with per-channel groups of min/max codes, a score's error variance is
about ``sum_c E[q_c^2] * E[range_c^2] / (12 * (2**w_c - 1)**2)``. Query energy and key range
vary by two orders of magnitude across a model's channels (SmolLM2-135M), so spending the
bits where ``E[q_c^2] * E[range_c^2]`` is large cuts the error far more than one width for
all: :func:`channel_weights` measures that weight from sample queries and keys,
:func:`allocate_channel_bits` gives each channel a width for a mean budget.
"""

from __future__ import annotations

import heapq

import numpy as np

from kvq._validate import check_int
from kvq.scheme import CHANNEL_BITS

#: Channels given a width together: each head's channels, sorted by weight, in runs of this
#: many (the second-level super-groups of double_quant, which then hold one width each).
RUN_CHANNELS = 8


def channel_weights(queries, keys, group_size: int = 32, first: int = 0) -> np.ndarray:
    """float64 (kv_heads, head_dim): each key channel's weight, E[q^2] over the query heads
    of its KV head and the tokens, times E[(max - min)^2] over its ``group_size``-token
    groups, from positions ``first`` on (leave out exact sink tokens).

    queries: (num_q_heads, t, head_dim), as attention meets them (RoPE applied, scaled or
    not: a constant factor per layer); keys: (num_kv_heads, t, head_dim) likewise; float
    arrays, finite; num_q_heads a multiple of num_kv_heads.
    """
    q = _sample("queries", queries)
    k = _sample("keys", keys)
    group_size = check_int("group_size", group_size)
    first = check_int("first", first, 0)
    heads, tokens, dim = q.shape
    kv_heads = k.shape[0]
    if k.shape[1:] != (tokens, dim) or heads % kv_heads:
        raise ValueError(
            f"queries {q.shape} and keys {k.shape} must share tokens and head_dim, with query "
            "heads a multiple of KV heads"
        )
    usable = (tokens - first) // group_size * group_size
    if usable < group_size:
        raise ValueError(
            f"keys hold {tokens - first} tokens from position {first}: at least one group of "
            f"{group_size} is needed"
        )
    energy = (q[:, first:] ** 2).reshape(kv_heads, heads // kv_heads, -1, dim).mean(axis=(1, 2))
    grouped = k[:, first : first + usable].reshape(kv_heads, -1, group_size, dim)
    spread = ((grouped.max(axis=2) - grouped.min(axis=2)) ** 2).mean(axis=1)
    return energy * spread


def value_channel_weights(values, out_weight, group_size: int = 32, first: int = 0) -> np.ndarray:
    """float64 (kv_heads, head_dim): each value channel's weight for per-channel value groups,
    the squared norm of the output projection's columns that read it (summed over the query
    heads of its KV head) times E[(max - min)^2] over its ``group_size``-token groups, from
    positions ``first`` on. A value channel's error reaches the layer's output through those
    columns, so this is the key weights' counterpart (:func:`channel_weights`).

    values: (num_kv_heads, t, head_dim) float, finite; out_weight: (hidden, num_q_heads *
    head_dim), the output projection as ``torch.nn.Linear`` holds it (``o_proj.weight``),
    whose columns run query head by query head, each head_dim wide.
    """
    v = _sample("values", values)
    w = np.asarray(out_weight)
    if w.dtype.kind != "f" or w.ndim != 2:
        raise ValueError(
            f"out_weight must be a 2-D float array (hidden, heads * head_dim), got {w.dtype} "
            f"{w.shape}"
        )
    group_size = check_int("group_size", group_size)
    first = check_int("first", first, 0)
    kv_heads, tokens, dim = v.shape
    if w.shape[1] % (kv_heads * dim):
        raise ValueError(
            f"out_weight has {w.shape[1]} columns, not a multiple of {kv_heads} KV heads x "
            f"head_dim {dim}"
        )
    usable = (tokens - first) // group_size * group_size
    if usable < group_size:
        raise ValueError(
            f"values hold {tokens - first} tokens from position {first}: at least one group "
            f"of {group_size} is needed"
        )
    columns = (w.astype(np.float64) ** 2).sum(axis=0).reshape(kv_heads, -1, dim).sum(axis=1)
    if not np.all(np.isfinite(columns)):
        raise ValueError("out_weight must be finite")
    grouped = v[:, first : first + usable].reshape(kv_heads, -1, group_size, dim)
    spread = ((grouped.max(axis=2) - grouped.min(axis=2)) ** 2).mean(axis=1)
    return columns * spread


def allocate_channel_bits(weights, mean_bits: float, widths=CHANNEL_BITS) -> np.ndarray:
    """int64 widths, shaped like ``weights`` (..., head_dim), whose mean is at most
    ``mean_bits``, that least the summed ``weights / (2**width - 1)**2``.

    Over the whole array (every layer and head: a layer whose keys matter more gets more
    bits): each head's channels (the last axis), sorted by weight, are taken in runs of
    :data:`RUN_CHANNELS`; every run starts at the narrowest width and the run whose next
    width saves the most error per bit is widened, until the budget is spent (greedy, exact
    for this convex cost). ``widths``: the widths allowed, a subset of
    ``kvq.scheme.CHANNEL_BITS``.
    """
    w = np.asarray(weights, np.float64)
    if w.ndim < 1 or w.shape[-1] % RUN_CHANNELS or not w.size:
        raise ValueError(
            f"weights must end in channels of a multiple of {RUN_CHANNELS}, got shape {w.shape}"
        )
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise ValueError("weights must be finite and non-negative")
    allowed = sorted({int(x) for x in widths})
    if not allowed or any(x not in CHANNEL_BITS for x in allowed):
        raise ValueError(f"widths must be taken from {CHANNEL_BITS}, got {tuple(widths)}")
    mean_bits = float(mean_bits)
    if not allowed[0] <= mean_bits:
        raise ValueError(f"mean_bits {mean_bits} is below the narrowest width {allowed[0]}")
    rows = w.reshape(-1, w.shape[-1])
    order = np.argsort(-rows, axis=1, kind="stable")
    runs = np.take_along_axis(rows, order, axis=1).reshape(rows.shape[0], -1, RUN_CHANNELS)
    run_weights = runs.sum(axis=2).reshape(-1)
    levels = _greedy(run_weights, allowed, (mean_bits - allowed[0]) * rows.size)
    chosen = np.array(allowed, np.int64)[levels].reshape(rows.shape[0], -1)
    out = np.empty(rows.shape, np.int64)
    np.put_along_axis(out, order, np.repeat(chosen, RUN_CHANNELS, axis=1), axis=1)
    return out.reshape(w.shape)


def _greedy(weights: np.ndarray, allowed: list[int], budget: float) -> np.ndarray:
    """Index into ``allowed`` per run of RUN_CHANNELS channels: the widening with the most
    error saved per bit first, while its bits fit ``budget`` (bits above the narrowest)."""

    def cost(weight: float, level: int) -> float:
        return weight / ((1 << allowed[level]) - 1) ** 2

    levels = np.zeros(weights.size, np.int64)
    heap = []

    def offer(run: int) -> None:
        level = levels[run]
        if level + 1 < len(allowed):
            extra = (allowed[level + 1] - allowed[level]) * RUN_CHANNELS
            saved = cost(weights[run], level) - cost(weights[run], level + 1)
            heapq.heappush(heap, (-saved / extra, run, extra))

    for run in range(weights.size):
        offer(run)
    left = budget + 1e-9
    while heap:
        _, run, extra = heapq.heappop(heap)
        if extra > left:
            continue
        left -= extra
        levels[run] += 1
        offer(run)
    return levels


def _sample(name: str, x) -> np.ndarray:
    array = np.asarray(x)
    if array.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {array.dtype}")
    if array.ndim != 3:
        raise ValueError(f"{name} must have shape (heads, tokens, head_dim), got {array.shape}")
    values = array.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite")
    return values
