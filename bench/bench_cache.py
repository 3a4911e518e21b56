"""Streaming KVCache figures: the cost of one decode-step append at 1K and 32K tokens, against
re-quantizing the whole cache, and nbytes against kvq.plan.

Targets (issue 5): appending one token at 32K context within 20% of appending at 1K, and at
least 10x cheaper than re-quantizing the cache; nbytes after N appends equal to the plan.
Also reported, with no target: a 32K-token prefill in one append, against quantizing the
same K and V as one tensor each (the append also validates, lays out and stores its chunks).

    python bench/bench_cache.py
    python bench/bench_cache.py --quick  # 1K and 4K tokens, 64 appends: a smoke run
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, publish, verdicts, versions

import kvq
from kvq.synthetic import kv_layer
from kvq.timing import median_seconds

HEADS, HEAD_DIM = 8, 64  # one GPT-OSS-20B full-attention layer
CONTEXTS = (1024, 32768)
STEPS = 256


def per_append_seconds(
    config: kvq.QuantConfig, context: int, k, v, steps: int = STEPS
) -> tuple[float, float]:
    """(median, mean) seconds of one single-token append after ``context`` tokens."""
    cache = kvq.KVCache(HEADS, HEAD_DIM, config)
    cache.append(k[:, :context], v[:, :context])
    times = []
    for t in range(steps):
        token = context + t
        start = time.perf_counter()
        cache.append(k[:, token : token + 1], v[:, token : token + 1])
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.mean(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1K and 4K tokens, 64 appends")
    args = parser.parse_args()
    contexts, steps = ((1024, 4096), 64) if args.quick else (CONTEXTS, STEPS)
    k, v = kv_layer(HEADS, max(contexts) + steps, HEAD_DIM, seed=0)
    configs = {
        "8-bit per token (original)": kvq.QuantConfig.original(),
        "q8 preset": kvq.QuantConfig.q8(),
        "q4 preset": kvq.QuantConfig.q4(),
        "kivi 2-bit, residual 128": kvq.QuantConfig.kivi(2),
    }
    rows, checks = [], []
    figures = {}  # check name -> (kvq figure, peer figure), for bench/run_all.py's summary
    small, big = min(contexts), max(contexts)
    for name, config in configs.items():
        appends = {n: per_append_seconds(config, n, k, v, steps) for n in contexts}
        requantize = median_seconds(
            lambda config=config: (
                config.k.quantize(k[:, :big]),
                config.v.quantize(v[:, :big]),
            ),
            repeats=3,
        )
        prefill = median_seconds(
            lambda config=config: kvq.KVCache(HEADS, HEAD_DIM, config).append(
                k[:, :big], v[:, :big]
            ),
            repeats=3,
        )
        ratio = appends[big][0] / appends[small][0]
        rows.append(
            [name]
            + [f"{appends[n][0] * 1e6:.0f} ({appends[n][1] * 1e6:.0f})" for n in contexts]
            + [f"{ratio:.2f}", f"{requantize * 1e3:.1f}", f"{requantize / appends[big][0]:.0f}"]
            + [f"{prefill * 1e3:.1f}", f"{prefill / requantize:.2f}"]
        )
        big_us, small_us = f"{appends[big][0] * 1e6:.0f} us", f"{appends[small][0] * 1e6:.0f} us"
        label = f"append at {big // 1024}K <= 1.2x append at {small // 1024}K"
        checks.append((f"{name}: {label}", ratio, "<=", 1.2))
        figures[checks[-1][0]] = (f"{big_us} at {big // 1024}K", f"{small_us} at {small // 1024}K")
        checks.append(
            (f"{name}: re-quantize >= 10x one append", requantize / appends[big][0], ">=", 10)
        )
        figures[checks[-1][0]] = (big_us, f"{requantize * 1e3:.1f} ms (re-quantize)")
        # nbytes against the plan after odd token counts
        model = kvq.ModelConfig(
            num_hidden_layers=2,
            num_attention_heads=64,
            num_key_value_heads=HEADS,
            head_dim=HEAD_DIM,
            hidden_size=2880,
            sliding_window=128,
            layer_types=("sliding_attention", "full_attention"),
        )
        for n in (1, 129, 4097):
            cache = kvq.ModelKVCache(model, config)
            for layer in range(2):
                cache.append(layer, k[:, :n], v[:, :n])
            planned = kvq.plan(model, n, config).total_bytes
            checks.append(
                (f"{name}: nbytes == plan at {n} tokens", cache.nbytes / planned, "==", 1)
            )
            figures[checks[-1][0]] = (f"{cache.nbytes:,} B", f"{planned:,} B (plan)")
    header = [
        "config",
        *[f"append at {n:,} (us, median (mean))" for n in contexts],
        f"{big // 1024}K / {small // 1024}K",
        f"re-quantize {big // 1024}K (ms)",
        "re-quantize / append",
        f"prefill {big // 1024}K in one append (ms)",
        "prefill / re-quantize",
    ]
    lines = [
        f"# bench_cache: one-token appends to a KVCache of {HEADS} KV heads x {HEAD_DIM} "
        f"(a GPT-OSS-20B full-attention layer), {steps} appends each",
        f"{machine()}; {versions()}",
        "",
        markdown_table(header, rows),
        "",
    ]
    lines += verdicts(checks)
    publish("bench_cache", lines, figures)


if __name__ == "__main__":
    main()
