"""Long runs: memory stays flat and values stay right over a million single-token appends.

A windowed KVCache (one GPT-OSS-20B-like layer: 8 KV heads x 64, window 4096) receives one
token per step. RSS is read after a warm-up and at the end (target: under 5% growth after
the warm-up). At the end the held tokens must:

- equal, bit for bit, a fresh cache fed the same tokens in one append (codes never drift);
- lie within the documented error bound of the tokens appended (schemes with float32 scales
  and no search, rotation or second-level scales; otherwise the relative error is shown);
- give kvq.attention within 1e-5 of kvq.attention_reference on the dequantized cache.

Then a MemoryPool churns through random acquire/release: its stats must return to those of
an empty pool, and RSS must not grow.

    python bench/long_run.py [--appends 1000000] [--window 4096] [--config default]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, save, verdicts, versions

import kvq

HEADS, HEAD_DIM, Q_HEADS = 8, 64, 64  # GPT-OSS-20B: 8 KV heads of 64, 64 query heads
CONFIGS = {
    "default": kvq.QuantConfig,
    "q8": kvq.QuantConfig.q8,
    "q4": kvq.QuantConfig.q4,
    "kivi": kvq.QuantConfig.kivi,
}
GROWTH_TARGET = 0.05
ATTENTION_TOLERANCE = 1e-5


def rss_bytes() -> int:
    """Resident set size of this process now (from /proc/self/statm; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class Tokens:
    """Deterministic K/V tokens, one per call, remembering the last ``keep`` of them.

    Keys carry a few outlier channels (5-20x), as real keys do; values are Gaussian. Tokens
    are drawn in batches so that drawing costs little beside an append.
    """

    def __init__(self, heads: int, head_dim: int, keep: int, seed: int = 0, batch: int = 1024):
        self.rng = np.random.default_rng(seed)
        self.heads, self.head_dim, self.keep, self.batch = heads, head_dim, keep, batch
        self.channel_scale = np.ones((heads, 1, head_dim), np.float32)
        for h in range(heads):
            channels = self.rng.choice(head_dim, max(1, head_dim // 16), replace=False)
            self.channel_scale[h, 0, channels] = self.rng.uniform(5, 20, channels.size)
        self.ring = np.zeros((2, heads, keep, head_dim), np.float32)
        self.drawn = 0
        self.block = np.empty((0, 2, heads, 1, head_dim), np.float32)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """The next token's k and v, each C-contiguous float32 (heads, 1, head_dim)."""
        at = self.drawn % self.batch
        if at == 0:
            shape = (self.batch, 2, self.heads, 1, self.head_dim)
            self.block = self.rng.standard_normal(shape, dtype=np.float32)
            self.block[:, 0] *= self.channel_scale
        k, v = self.block[at, 0], self.block[at, 1]
        slot = self.drawn % self.keep
        self.ring[0, :, slot] = k[:, 0]
        self.ring[1, :, slot] = v[:, 0]
        self.drawn += 1
        return k, v

    def last(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the k and v tokens at absolute positions ``[start, end)``."""
        if not self.drawn - self.keep <= start <= end <= self.drawn:
            raise IndexError(
                f"positions [{start}, {end}) are not among the last {self.keep} of "
                f"{self.drawn} tokens"
            )
        slots = np.arange(start, end) % self.keep
        return self.ring[0][:, slots], self.ring[1][:, slots]


def stream(cache: kvq.KVCache, tokens: Tokens, appends: int, warmup: int, samples: int = 20):
    """Append ``appends`` tokens one at a time; return timings and RSS figures."""
    marks = set(np.linspace(warmup, appends, samples + 1).astype(int).tolist())
    trace: list[tuple[int, int]] = []
    rss_start, rss_warm = rss_bytes(), None
    in_append = 0.0
    start = time.perf_counter()
    for i in range(1, appends + 1):
        k, v = tokens.next()
        t0 = time.perf_counter()
        cache.append(k, v)
        in_append += time.perf_counter() - t0
        if i == warmup:
            rss_warm = rss_bytes()
        if i in marks:
            trace.append((i, rss_bytes()))
    wall = time.perf_counter() - start
    rss_end = rss_bytes()
    rss_warm = rss_end if rss_warm is None else rss_warm
    return {
        "appends": appends,
        "warmup": warmup,
        "wall_s": wall,
        "appends_per_s": appends / wall,
        "append_us": 1e6 * in_append / appends,
        "rss_start": rss_start,
        "rss_warm": rss_warm,
        "rss_end": rss_end,
        "rss_max": max([rss_end, rss_warm, *(r for _, r in trace)]),
        "growth": (rss_end - rss_warm) / rss_warm,
        "trace": trace,
    }


def _bound_check(scheme: kvq.Scheme, truth, got, truth_start: int, held_start: int, exact: int):
    """(elements outside the documented bound, largest error / bound) for held tokens.

    ``truth`` starts at absolute position ``truth_start`` (group-aligned for per-channel
    groups); ``got`` holds positions from ``held_start``; its last ``exact`` tokens are the
    float32 residual and must be exact. None when the scheme has no plain bound.
    """
    plain = scheme.scale_dtype == "float32" and not (
        scheme.search or scheme.rotate or scheme.double_quant
    )
    if not plain:
        return None
    g = scheme.group_size
    x = truth.astype(np.float64)
    heads, tokens, dim = x.shape
    if scheme.axis in (-1, 2):  # groups along head_dim, per token
        pad = -dim % g
        grid = np.pad(x, ((0, 0), (0, 0), (0, pad)), mode="edge").reshape(heads, tokens, -1, g)
        lo, hi = grid.min(-1), grid.max(-1)
        big = np.abs(grid).max(-1)
        spread = lambda a: np.repeat(a, g, axis=-1)[..., :dim]  # noqa: E731
    else:  # groups along tokens, per channel, aligned to absolute positions
        pad = -tokens % g
        grid = np.pad(x, ((0, 0), (0, pad), (0, 0)), mode="edge").reshape(heads, -1, g, dim)
        lo, hi = grid.min(2), grid.max(2)
        big = np.abs(grid).max(2)
        spread = lambda a: np.repeat(a, g, axis=1)[:, :tokens]  # noqa: E731
    bound = spread((hi - lo) / scheme.max_code / 2 + 1e-6 * big) + 2.0**-140
    error = np.abs(got.astype(np.float64) - x[:, held_start - truth_start :])
    bound = bound[:, held_start - truth_start :]
    if exact:
        bound[:, -exact:] = 0.0
    return int((error > bound).sum()), float((error / np.where(bound > 0, bound, 1)).max())


def check_cache(cache: kvq.KVCache, tokens: Tokens, seed: int = 1) -> dict:
    """Compare what ``cache`` holds with the tokens appended (see the module docstring)."""
    positions = cache.positions
    first, end = int(positions[0]), int(positions[-1]) + 1
    keys, values = cache.keys(), cache.values()
    stats = cache.stats()
    # a fresh cache fed from a position where both streams' chunks start sees the same chunks
    align = math.lcm(stats["k_chunk_tokens"], stats["v_chunk_tokens"])
    for scheme in (cache.config.k, cache.config.v):
        if scheme.axis in (-2, 1):
            align = math.lcm(align, scheme.group_size)
    origin = first // align * align
    k_truth, v_truth = tokens.last(origin, end)
    config = cache.config  # fed from ``origin``, its first tokens are no sink tokens
    fresh_config = config if origin == 0 else dataclasses.replace(config, sink_tokens=0)
    fresh = kvq.KVCache(cache.num_kv_heads, cache.head_dim, fresh_config)
    fresh.append(k_truth, v_truth)
    same = bool(
        np.array_equal(fresh.keys(first - origin), keys)
        and np.array_equal(fresh.values(first - origin), values)
    )
    result = {"held": len(positions), "first": first, "end": end, "same_as_fresh": same}
    for name, truth, got, exact in (
        ("k", k_truth, keys, stats["k_residual"]),
        ("v", v_truth, values, stats["v_residual"]),
    ):
        scheme = getattr(cache.config, name)
        result[f"{name}_bound"] = _bound_check(scheme, truth, got, origin, first, exact)
        part = truth[:, first - origin :]
        result[f"{name}_rel"] = float(np.linalg.norm(got - part) / np.linalg.norm(part))
    rng = np.random.default_rng(seed)
    q_heads = cache.num_kv_heads * (Q_HEADS // HEADS)
    q = rng.standard_normal((q_heads, 1, cache.head_dim), dtype=np.float32)
    sinks = rng.standard_normal(q_heads)
    out = kvq.attention(q, cache, sinks=sinks)
    ref = kvq.attention_reference(q, keys, values, sinks=sinks, window=cache.window)
    result["attention_rel"] = float(np.abs(out - ref).max() / np.abs(ref).max())
    return result


def pool_churn(operations: int, capacity: int = 64 << 20, max_live: int = 64, seed: int = 0):
    """Random acquire/release on one MemoryPool; each array is tagged and checked on release
    (overlapping arrays would clobber tags). Returns counts, RSS and the final stats."""
    pool = kvq.MemoryPool(capacity)
    empty = pool.stats()
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(0, math.log(512 << 10), operations)).astype(np.int64)
    dtypes = [np.uint8, np.float16, np.float32, np.float64]
    choices = rng.integers(0, 1 << 30, (operations, 2))
    live: list[tuple[np.ndarray, int]] = []
    exhausted = corrupted = 0
    warm = operations // 10
    rss_warm = rss_bytes()
    start = time.perf_counter()
    for i in range(operations):
        if i == warm:
            rss_warm = rss_bytes()
        size, (pick, dtype_pick) = int(sizes[i]), choices[i]
        if live and (len(live) >= max_live or pick % 2):
            array, tag = live.pop(int(pick) % len(live))
            flat = array.reshape(-1).view(np.uint8)
            corrupted += flat.size > 0 and not (flat[0] == tag and flat[-1] == tag)
            pool.release(array)
            continue
        dtype = np.dtype(dtypes[int(dtype_pick) % len(dtypes)])
        try:
            array = pool.acquire((max(1, size // dtype.itemsize),), dtype)
        except kvq.PoolExhausted:
            exhausted += 1
            continue
        tag = i % 251
        flat = array.reshape(-1).view(np.uint8)
        flat[0] = flat[-1] = tag
        live.append((array, tag))
    for array, tag in live:
        flat = array.reshape(-1).view(np.uint8)
        corrupted += not (flat[0] == tag and flat[-1] == tag)
        pool.release(array)
    wall = time.perf_counter() - start
    final = pool.stats()
    rss_end = rss_bytes()
    return {
        "operations": operations,
        "ops_per_s": operations / wall,
        "exhausted": exhausted,
        "corrupted": int(corrupted),
        "empty_again": {k: v for k, v in final.items() if k != "peak"}
        == {k: v for k, v in empty.items() if k != "peak"},
        "stats": final,
        "rss_warm": rss_warm,
        "rss_end": rss_end,
        "growth": (rss_end - rss_warm) / rss_warm,
    }


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=1_000_000)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default")
    parser.add_argument("--warmup", type=int, default=None, help="appends before the RSS base")
    parser.add_argument("--pool-ops", type=int, default=200_000)
    args = parser.parse_args(argv)
    config = CONFIGS[args.config]()
    warmup = args.warmup or min(args.appends, max(50_000, 4 * args.window))
    cache = kvq.KVCache(HEADS, HEAD_DIM, config, window=args.window)
    stats = cache.stats()
    keep = args.window + 4 * max(stats["k_chunk_tokens"], stats["v_chunk_tokens"], 32)
    tokens = Tokens(HEADS, HEAD_DIM, keep + config.residual)
    print(f"long run: {machine()}; {versions()}")
    print(
        f"KVCache({HEADS} heads x {HEAD_DIM}, window {args.window}, {args.config}: K "
        f"{config.k.describe()}, V {config.v.describe()}), {args.appends:,} single-token "
        f"appends, RSS base after {warmup:,}"
    )
    run = stream(cache, tokens, args.appends, warmup)
    for at, rss in run["trace"]:
        print(f"  after {at:>10,} appends  RSS {_mib(rss)}")
    check = check_cache(cache, tokens)
    churn = pool_churn(args.pool_ops)
    lines = [
        f"appends            {run['appends']:,} in {run['wall_s']:.1f} s: "
        f"{run['appends_per_s']:,.0f} appends/s (append itself {run['append_us']:.1f} us)",
        f"RSS                {_mib(run['rss_start'])} before, {_mib(run['rss_warm'])} after "
        f"warm-up -> {_mib(run['rss_end'])} "
        f"at the end ({100 * run['growth']:+.2f}%), max {_mib(run['rss_max'])}",
        f"held               {check['held']} tokens, positions {check['first']:,}.."
        f"{check['end'] - 1:,}; codes equal a fresh cache: {check['same_as_fresh']}",
        f"error bound        K {_bound_text(check['k_bound'])}, V {_bound_text(check['v_bound'])}"
        f"; relative L2 K {check['k_rel']:.3g}, V {check['v_rel']:.3g}",
        f"attention          relative error {check['attention_rel']:.2e} against the reference",
        f"pool churn         {churn['operations']:,} ops, {churn['ops_per_s']:,.0f} ops/s, "
        f"{churn['exhausted']} exhausted, {churn['corrupted']} corrupted, back to empty: "
        f"{churn['empty_again']}, RSS {_mib(churn['rss_warm'])} -> {_mib(churn['rss_end'])} "
        f"({100 * churn['growth']:+.2f}%)",
    ]
    checks = [
        ("RSS growth after warm-up (%)", 100 * run["growth"], "<", 100 * GROWTH_TARGET),
        ("held codes differ from a fresh cache", float(not check["same_as_fresh"]), "==", 0),
        ("elements outside the bound", _outside(check), "==", 0),
        ("attention relative error", check["attention_rel"], "<=", ATTENTION_TOLERANCE),
        ("pool not back to empty", float(not churn["empty_again"]), "==", 0),
        ("pool arrays corrupted", churn["corrupted"], "==", 0),
        ("pool RSS growth (%)", 100 * churn["growth"], "<", 100 * GROWTH_TARGET),
    ]
    report = "\n".join([*lines, *verdicts(checks)])
    print(report)
    save("long_run.md", f"python bench/long_run.py {' '.join(argv or sys.argv[1:])}\n\n{report}")
    return 0 if all("PASS" in line for line in verdicts(checks)) else 1


def _bound_text(bound) -> str:
    if bound is None:
        return "n/a (scheme has no plain bound)"
    outside, ratio = bound
    return f"{outside} outside (largest error {ratio:.3f} x bound)"


def _outside(check: dict) -> float:
    return float(sum(b[0] for b in (check["k_bound"], check["v_bound"]) if b is not None))


if __name__ == "__main__":
    sys.exit(main())
