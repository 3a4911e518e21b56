"""Decode attention on cold quantized caches against torch fp32 SDPA, for real model shapes.

Shapes (query heads, KV heads, head_dim): SmolLM2 (9, 3, 64), Llama-3-8B (32, 8, 128),
GPT-OSS-20B (64, 8, 64), Llama-2-7B (32, 32, 128); 1K, 8K and 32K cached tokens (Llama-2 at
16K instead of 32K, to stay in 24 GB); every preset scheme; one query token (t_q = 1).

Cold caches, as in a model: each case cycles over distinct caches, one per layer (up to 24),
enough that their float32 bytes exceed ``COLD_BYTES`` (192 MB, far beyond the 32 MB L3), for
kvq and for torch alike. Timing: a round times one sweep over the layers for every method in
turn (kvq schemes and torch interleaved in the same loop, so drift in a shared machine's load
hits all alike); the figure is the median over rounds of a sweep's time per layer. GB/s counts
the bytes each call reads (kvq: the cache's ``nbytes``; torch: the float32 K and V); GFLOP/s
counts 4 x Hq x tokens x head_dim per call.

Also: the fixed cost of one call at 128 tokens (target <= 20 us), and prefill chunks (t_q 16
to 512 against torch SDPA with the same bottom-right causal mask).

Targets (issue 14): every scheme and shape at most 0.5x torch at 8K and 32K and at most 1x
at 1K; GQA >= 4 at most 1/3 of torch at the longest length; per-call cost <= 20 us.

    python bench/bench_attention.py            # everything (about 15 min on 2 busy cores)
    python bench/bench_attention.py --quick    # 1K and 8K, fewer rounds, a smoke run
    python bench/bench_attention.py --shapes SmolLM2 --tokens 8192 --schemes q4 q8
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch and Numba share 2 cores
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, optional, publish, verdicts, versions

import kvq
from kvq.synthetic import kv_layer

SHAPES = {  # name -> (query heads, KV heads, head_dim, longest length)
    "SmolLM2": (9, 3, 64, 32768),
    "Llama-3-8B": (32, 8, 128, 32768),
    "GPT-OSS-20B": (64, 8, 64, 32768),
    "Llama-2-7B": (32, 32, 128, 16384),
}
SCHEMES = {  # QuantConfig() is q8
    "q8": kvq.QuantConfig.q8,
    "q4": kvq.QuantConfig.q4,
    "q3": kvq.QuantConfig.q3,
    "q2": kvq.QuantConfig.q2,
    "kivi2": lambda: kvq.QuantConfig.kivi(2),
    "mlx4": lambda: kvq.QuantConfig.mlx(4),
    "mlx8-g32": lambda: kvq.QuantConfig.mlx(8, 32),
    "original": kvq.QuantConfig.original,
    # keys held before RoPE (turned back in the kernel, after decoding)
    "q8+pre_rope": lambda: kvq.QuantConfig.q8(pre_rope=True),
    "q4+pre_rope": lambda: kvq.QuantConfig.q4(pre_rope=True),
    "q3+pre_rope": lambda: kvq.QuantConfig.q3(pre_rope=True),
    "q2+pre_rope": lambda: kvq.QuantConfig.q2(pre_rope=True),
}
# keys of per-channel widths (kvq.hf.calibrate_channels): the preset's values, keys at the mean
# width SmolLM2's calibrated maps take within the preset's budget
CHANNEL_SCHEMES = {
    "q4+channels": (kvq.QuantConfig.q4, 4.22),
    "q3+channels": (kvq.QuantConfig.q3, 3.22),
    "q2+channels": (kvq.QuantConfig.q2, 2.22),
}
SCHEMES |= dict.fromkeys(CHANNEL_SCHEMES)


def channel_config(name: str, kv_heads: int, dim: int) -> kvq.QuantConfig:
    """``name`` of CHANNEL_SCHEMES for KV heads of ``dim``: widths allocated over channel
    weights spread as SmolLM2's measured ones are (log-normal, two orders of magnitude), so
    every head holds several runs of widths as a calibrated layer does."""
    preset, mean = CHANNEL_SCHEMES[name]
    weights = np.random.default_rng(kv_heads * dim).lognormal(0.0, 2.0, (kv_heads, dim))
    widths = kvq.allocate_channel_bits(weights, mean)
    base = preset()
    k = kvq.Scheme(
        int(widths.max()), base.k.group_size, axis=-2, double_quant=True, search=True,
        channel_bits=widths,
    )  # fmt: skip
    return kvq.QuantConfig(k=k, v=base.v, sink_tokens=base.sink_tokens)


def new_cache(kv_heads: int, dim: int, name: str, **kwargs) -> kvq.KVCache:
    """A KVCache of scheme ``name``; pre_rope schemes get plain RoPE (theta 10000)."""
    rope = kvq.Rope.from_theta(10000.0, dim)
    if name in CHANNEL_SCHEMES:
        return kvq.KVCache(kv_heads, dim, channel_config(name, kv_heads, dim), **kwargs)
    return kvq.KVCache(kv_heads, dim, SCHEMES[name](), rope=rope, **kwargs)


COLD_BYTES = 192 << 20
MAX_LAYERS = 24
TORCH = "torch fp32 SDPA"


def layers_for(kv_heads: int, tokens: int, dim: int) -> int:
    """Distinct caches to cycle over so that their float32 K and V exceed COLD_BYTES."""
    per_layer = 2 * kv_heads * tokens * dim * 4
    return max(1, min(MAX_LAYERS, math.ceil(COLD_BYTES / per_layer)))


def sweep_medians(runs: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each method: each round runs every method's sweep over
    its layers in turn (one warm-up round first)."""
    times = {name: [] for name in runs}
    for round_ in range(rounds + 1):
        for name, calls in runs.items():
            start = time.perf_counter()
            for call in calls:
                call()
            if round_:
                times[name].append((time.perf_counter() - start) / len(calls))
    return {name: float(np.median(t)) for name, t in times.items()}


def torch_calls(torch, q: np.ndarray, layers: list, mask=None) -> list:
    """One SDPA call per layer's float32 (k, v), enable_gqa, as transformers' sdpa does."""
    heads, t_q, dim = q.shape
    tq = torch.from_numpy(q).reshape(1, heads, t_q, dim)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []
    for k, v in layers:
        tk = torch.from_numpy(k)[None]
        tv = torch.from_numpy(v)[None]

        def call(tk=tk, tv=tv):
            with torch.no_grad():
                return sdpa(tq, tk, tv, attn_mask=mask, enable_gqa=True)

        calls.append(call)
    return calls


def decode_cases(torch, shapes, tokens_list, schemes, rounds, rows, checks, figures) -> None:
    rng = np.random.default_rng(0)
    for shape in shapes:
        heads, kv_heads, dim, longest = SHAPES[shape]
        worst_at = {}
        for tokens in tokens_list:
            if tokens > longest:
                if tokens == max(tokens_list) and longest not in tokens_list:
                    tokens = longest  # Llama-2 at 16K instead of 32K
                else:
                    continue
            layers = layers_for(kv_heads, tokens, dim)
            k, v = kv_layer(kv_heads, tokens, dim, seed=1)
            q = rng.standard_normal((heads, 1, dim)).astype(np.float32)
            runs, nbytes = {}, {}
            for name in schemes:
                cache = new_cache(kv_heads, dim, name, capacity=tokens)
                cache.append(k, v)
                caches = [cache] + [copy.deepcopy(cache) for _ in range(layers - 1)]
                kvq.attention(q, cache)  # compile / load
                runs[name] = [lambda c=c, q=q: kvq.attention(q, c) for c in caches]
                nbytes[name] = cache.nbytes
            if torch is not None:
                fp32 = [(k, v)] + [(k.copy(), v.copy()) for _ in range(layers - 1)]
                runs[TORCH] = torch_calls(torch, q, fp32)
                nbytes[TORCH] = k.nbytes + v.nbytes
            times = sweep_medians(runs, rounds)
            torch_time = times.get(TORCH, float("nan"))
            flops = 4 * heads * tokens * dim
            for name, seconds in times.items():
                rows.append(
                    [
                        f"{tokens:,}",
                        f"{shape} {name}",
                        f"{seconds * 1e3:.3f}",
                        f"{seconds / torch_time:.2f}",
                        f"{nbytes[name] / seconds / 1e9:.1f}",
                        f"{flops / seconds / 1e9:.1f}",
                        str(layers),
                    ]
                )
            kvq_times = {n: t for n, t in times.items() if n != TORCH}
            worst = max(kvq_times, key=kvq_times.get)
            ratio = kvq_times[worst] / torch_time
            worst_at[tokens] = (worst, ratio)
            target = 1.0 if tokens <= 1024 else 0.5
            label = f"{shape} {tokens // 1024}K worst scheme <= {target:g}x torch"
            checks.append((label, ratio, "<=", target))
            figures[label] = (
                f"{kvq_times[worst] * 1e3:.3f} ms ({worst})",
                f"{torch_time * 1e3:.3f} ms",
            )
            print(f"  {shape} {tokens:,}: {layers} layers, worst {worst} {ratio:.2f}x", flush=True)
        if heads // kv_heads >= 4 and worst_at:
            tokens = max(worst_at)
            worst, ratio = worst_at[tokens]
            label = f"{shape} {tokens // 1024}K (GQA {heads // kv_heads}) worst <= 1/3 torch"
            checks.append((label, ratio, "<=", 1 / 3))
            figures[label] = (worst, "-")


def overhead_cases(shapes, schemes, rounds, rows, checks, figures) -> None:
    """Median time of one call at 128 tokens (warm: it is the fixed cost that matters)."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for shape in shapes:
        heads, kv_heads, dim, _ = SHAPES[shape]
        k, v = kv_layer(kv_heads, 128, dim, seed=1)
        q = rng.standard_normal((heads, 1, dim)).astype(np.float32)
        for name in schemes:
            cache = new_cache(kv_heads, dim, name)
            cache.append(k, v)
            kvq.attention(q, cache)
            samples = []
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(20):
                    kvq.attention(q, cache)
                samples.append((time.perf_counter() - start) / 20)
            us = float(np.median(samples)) * 1e6
            worst = max(worst, us)
            rows.append([shape, name, f"{us:.1f}"])
    label = "per-call cost at 128 tokens <= 20 us (worst case)"
    checks.append((label, worst, "<=", 20))
    figures[label] = (f"{worst:.1f} us", "-")


def prefill_cases(torch, shapes, schemes, context, chunks, rounds, rows, checks, figures) -> None:
    """t_q queries at the cache's last t_q positions, causal, against SDPA with that mask."""
    rng = np.random.default_rng(0)
    for shape in shapes:
        heads, kv_heads, dim, _ = SHAPES[shape]
        k, v = kv_layer(kv_heads, context, dim, seed=1)
        caches = {}
        for name in schemes:
            cache = new_cache(kv_heads, dim, name, capacity=context)
            cache.append(k, v)
            caches[name] = cache
        for t_q in chunks:
            q = rng.standard_normal((heads, t_q, dim)).astype(np.float32)
            runs = {name: [lambda c=c, q=q: kvq.attention(q, c)] for name, c in caches.items()}
            if torch is not None:
                rows_at = torch.arange(context - t_q, context)[:, None]
                mask = torch.arange(context)[None, :] <= rows_at
                runs[TORCH] = torch_calls(torch, q, [(k, v)], mask)
            for calls in runs.values():
                calls[0]()  # compile / load
            times = sweep_medians(runs, rounds)
            torch_time = times.get(TORCH, float("nan"))
            flops = 4 * heads * t_q * context * dim  # masked half not discounted
            for name, seconds in times.items():
                rows.append(
                    [
                        shape,
                        f"{t_q}",
                        name,
                        f"{seconds * 1e3:.2f}",
                        f"{seconds / torch_time:.2f}",
                        f"{flops / seconds / 1e9:.1f}",
                    ]
                )
            kvq_times = {n: t for n, t in times.items() if n != TORCH}
            worst = max(kvq_times, key=kvq_times.get)
            label = f"prefill {shape} t_q {t_q} at {context // 1024}K worst <= 1x torch"
            checks.append((label, kvq_times[worst] / torch_time, "<=", 1.0))
            figures[label] = (
                f"{kvq_times[worst] * 1e3:.2f} ms ({worst})",
                f"{torch_time * 1e3:.2f} ms",
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1K and 8K, 3 rounds: a smoke run")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (median)")
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--no-decode", action="store_true")
    args = parser.parse_args()
    tokens = args.tokens or ([1024, 8192] if args.quick else [1024, 8192, 32768])
    rounds = args.rounds or (3 if args.quick else 7)
    torch = optional("torch")
    if torch is None:
        print("- SKIP torch comparisons: torch is not installed")
    rows, overhead_rows, prefill_rows, checks, figures = [], [], [], [], {}
    started = time.perf_counter()
    if not args.no_decode:
        decode_cases(torch, args.shapes, tokens, args.schemes, rounds, rows, checks, figures)
    overhead_cases(args.shapes, args.schemes, rounds, overhead_rows, checks, figures)
    if not args.no_prefill:
        context = 2048 if args.quick else 4096
        chunks = [16, 128] if args.quick else [16, 128, 512]
        prefill_shapes = [s for s in ("SmolLM2", "Llama-3-8B") if s in args.shapes]
        prefill_schemes = [s for s in ("q8", "q4", "original") if s in args.schemes]
        prefill_cases(
            torch, prefill_shapes, prefill_schemes, context, chunks, rounds, prefill_rows,
            checks, figures,
        )  # fmt: skip
    import numba

    lines = [
        "# bench_attention: decode attention on cold caches, kvq against torch fp32 SDPA",
        f"{machine()}; {versions('torch')}; {numba.get_num_threads()} Numba threads; "
        f"medians of {rounds} rounds, kvq and torch interleaved; "
        f"{time.perf_counter() - started:.0f} s",
        "",
    ]
    if rows:
        lines += [
            "Decode, t_q = 1 (ms per call; layers: distinct caches cycled per round)",
            "",
            markdown_table(
                ["tokens", "method", "ms", "time / torch", "GB/s read", "GFLOP/s", "layers"],
                rows,
            ),
            "",
        ]
    lines += [
        "Per-call cost at 128 tokens (warm, median of 20-call batches)",
        "",
        markdown_table(["shape", "scheme", "us per call"], overhead_rows),
        "",
    ]
    if prefill_rows:
        lines += [
            "Prefill chunks: t_q queries at the last t_q positions, causal (torch: the same "
            "bottom-right mask), one warm cache",
            "",
            markdown_table(
                ["shape", "t_q", "method", "ms", "time / torch", "GFLOP/s (unmasked)"],
                prefill_rows,
            ),
            "",
        ]
    lines += verdicts(checks)
    publish("bench_attention", lines, figures)


if __name__ == "__main__":
    main()
