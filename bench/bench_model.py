"""kvq inside a real LLM: SmolLM2-135M-Instruct's quality, decode speed and memory with kvq's
KVQCache against transformers' DynamicCache (float32, sdpa), QuantizedCache and the GGML and
MLX cache formats.

- Quality (issue 13): perplexity, delta-perplexity, mean KLD and top-1 agreement against the
  float32 DynamicCache on the same tokens, at contexts of 1,024 and 4,096 tokens of real text
  (kvq.hf.models.reference_text(): the GNU GPL-3 and GPL-2 texts of the OS), fed in chunks of
  64 tokens (kvq.hf.evaluate; --chunk 1 feeds one token per call, as generate does). kvq's
  presets (the default, QuantConfig(), is q8) and the original 8-bit per-token scheme;
  peers: GGML q8_0/q4_0/q4_1 with and without a Walsh-Hadamard rotation, MLX affine 4/8-bit
  at groups of 32 and 64, QuantizedCache with quanto and HQQ at 4 and 2 bits.
- Speed: decode ms/token at 1K, 4K and 8K tokens of context (every cache filled with random
  K/V by kvq.hf.evaluate.fill_cache, then single-token forward steps, one step of each cache
  per round so that a drifting machine shifts them alike; median), and the attention
  function's time per layer within a step; prefill time of 4K real tokens in one forward.
- Memory: cache bytes and process peak-RSS growth (VmHWM, reset through
  /proc/self/clear_refs) while filling the cache to 8K and decoding one step, each cache in
  a new process (which loads the model first).

Targets: decode at 8K with KVQCache q4 <= 0.67x DynamicCache, q8 <= 0.8x, q4 at least 10x
faster than QuantizedCache at 4 bits; at 1K q4 <= 1.1x DynamicCache; q8 top-1 >= 99%.

    python bench/bench_model.py
    python bench/bench_model.py --quick   # 256 tokens of quality, decode at 256/1K: a smoke run
    python bench/bench_model.py --skip-quality --decode 1024 8192 --prefill 256 --steps 3

Run time on the 2-core machine shared by several processes (load average about 9,
2026-12-01): --quick 25 min; the quality part at 1,024 tokens about 4 min per config (HQQ
2-bit 17 min). On the idle machine the same evening: the quality part at 4,096 tokens, all 22
configs, 21 min on one core (OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1); the speed part at 1K,
4K and 8K with a 4K prefill and 9 steps, 6 min.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, publish, verdicts, versions

# QuantConfig() (the default) is q8; "original" is the design's 8-bit per-token scheme
KVQ_QUALITY = ["q8", "q4", "q3", "q2", "original", "kivi2", "mlx4"]
# SmolLM2's maps of per-channel key widths (kvq.hf.calibrate_channels) at q4/q3/q2's budgets
KVQ_QUALITY += ["q4+channels+smollm2", "q3+channels+smollm2", "q2+channels+smollm2"]
# ... and with per-channel value widths too (kvq.hf.calibrate_channels(values=True))
KVQ_QUALITY += ["q4+channels+values+smollm2", "q3+channels+values+smollm2"]
PEER_QUALITY = [
    "q8_0",
    "q4_0",
    "q4_1",
    "q8_0+had",
    "q4_0+had",
    "q4_1+had",
    "mlx-4b-g32",
    "mlx-4b-g64",
    "mlx-8b-g32",
    "mlx-8b-g64",
    "quanto-4",
    "quanto-2",
    "hqq-4",
    "hqq-2",
]
QUICK_QUALITY = ["q8", "q4", "original", "q8_0", "q4_0+had", "mlx-4b-g64", "quanto-4"]
# speed: label -> cache kind
SPEED = {
    "DynamicCache fp32 (sdpa)": "float32",
    "QuantizedCache quanto 4-bit": "quanto-4",
    "KVQCache original (8-bit per token)": "original",
    "KVQCache q8 (the default)": "q8",
    "KVQCache q4": "q4",
    "KVQCache q4, keys before RoPE": "q4+pre_rope",
    "KVQCache q4, per-channel key widths (SmolLM2 map)": "q4+channels+smollm2",
    "KVQCache q4, per-channel key and value widths (SmolLM2 map)": "q4+channels+values+smollm2",
}


def make_cache(model, kind: str):
    """(fresh cache, attention implementation) for a speed kind."""
    from transformers.cache_utils import DynamicCache

    from kvq.hf.evaluate import resolve_configs

    if kind == "float32":
        return DynamicCache(config=model.config), "sdpa"
    (spec,) = resolve_configs([kind])
    return spec.make(model), spec.attn


@contextlib.contextmanager
def timed_attention(names: tuple[str, ...]):
    """Wrap the registered attention functions ``names``; yields a list that collects the
    seconds of each call."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    calls: list[float] = []
    originals = {n: ALL_ATTENTION_FUNCTIONS[n] for n in names if n in ALL_ATTENTION_FUNCTIONS}

    def wrap(function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = function(*args, **kwargs)
            calls.append(time.perf_counter() - start)
            return out

        return timed

    for name, function in originals.items():
        ALL_ATTENTION_FUNCTIONS[name] = wrap(function)
    try:
        yield calls
    finally:
        for name, function in originals.items():
            ALL_ATTENTION_FUNCTIONS[name] = function


def rss_reset() -> bool:
    """Reset this process's peak RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_kib(field: str) -> int:
    """VmRSS or VmHWM of this process in KiB (0 where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def forward(model, ids, cache):
    import torch

    with torch.inference_mode():
        return model(input_ids=ids, use_cache=True, cache=cache)


def decode_interleaved(model, kinds: dict[str, str], context: int, steps: int) -> dict:
    """label -> {ms per decode step, attention ms per layer, layers, cache bytes,
    rss_growth_mib (NaN: measured by :func:`rss_in_fresh_process`)} for every cache of
    ``kinds`` (label -> kind), each filled to ``context`` tokens and stepped in turn, one step
    of each per round: a drifting machine then shifts every cache alike. A cache that cannot be
    made is reported under label "skip:<label>" with its error."""
    import torch

    from kvq.hf.evaluate import cache_bytes, fill_cache

    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    token = torch.tensor([[42]])
    prepared, results = {}, {}
    for label, kind in kinds.items():
        try:
            cache, attn = make_cache(model, kind)
            model.set_attn_implementation(attn)
            fill_cache(model, cache, context)
            forward(model, token, cache)  # warm-up (compiles, allocates)
            prepared[label] = (cache, attn)
        except Exception as error:  # a missing backend is reported, not fatal
            results["skip:" + label] = f"{type(error).__name__}: {error}"
    times = {label: [] for label in prepared}
    attention = {label: [] for label in prepared}
    with timed_attention(("sdpa", "kvq")) as calls:
        for _ in range(steps):
            for label, (cache, attn) in prepared.items():
                if model.config._attn_implementation != attn:
                    model.set_attn_implementation(attn)
                calls.clear()
                start = time.perf_counter()
                forward(model, token, cache)
                times[label].append(time.perf_counter() - start)
                attention[label].append(sum(calls) / max(len(calls), 1))
    for label, (cache, _) in prepared.items():
        results[label] = {
            "ms": 1e3 * float(np.median(times[label])),
            "attention_ms_per_layer": 1e3 * float(np.median(attention[label])),
            "layers": layers,
            "cache_bytes": cache_bytes(cache),
            "rss_growth_mib": math.nan,
        }
    del prepared
    gc.collect()
    return results


def prefill_seconds(model, kind: str, ids) -> float:
    """Seconds of one forward over ``ids`` (1, t) into a fresh cache of ``kind``."""
    cache, attn = make_cache(model, kind)
    if model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)
    start = time.perf_counter()
    forward(model, ids, cache)
    seconds = time.perf_counter() - start
    del cache
    gc.collect()
    return seconds


def rss_in_fresh_process(kind: str, context: int) -> float:
    """Peak-RSS growth (MiB) of filling a ``kind`` cache to ``context`` and one decode step,
    measured in a new process (in this one, memory freed by earlier runs is reused)."""
    command = [sys.executable, __file__, "--memory-child", kind, str(context)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return float(json.loads(line)["rss_growth_mib"])
    return math.nan


def memory_child(kind: str, context: int) -> None:
    """--memory-child: load the model, fill a ``kind`` cache to ``context`` tokens and decode
    one step, and print the peak-RSS growth (MiB) over that as JSON."""
    import kvq.hf  # noqa: F401  (registers attention "kvq")
    from kvq.hf.models import load_model

    model, _ = load_model()
    gc.collect()
    reset = rss_reset()
    before = rss_kib("VmRSS")
    results = decode_interleaved(model, {kind: kind}, context, 1)
    if kind not in results:
        raise RuntimeError(results.get("skip:" + kind, kind))
    growth = (rss_kib("VmHWM") - before) / 1024 if reset else math.nan
    print(json.dumps({"rss_growth_mib": growth}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--contexts", type=int, nargs="+", help="quality contexts")
    parser.add_argument("--decode", type=int, nargs="+", help="decode contexts")
    parser.add_argument("--prefill", type=int, help="prefill tokens")
    parser.add_argument("--steps", type=int, help="timed decode steps per point")
    parser.add_argument("--configs", nargs="+", help="quality configs (default: all)")
    parser.add_argument(
        "--chunk",
        type=int,
        default=64,
        help="quality: tokens per forward call (default 64; 1 is decode order, as generate)",
    )
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument(
        "--memory-child", nargs=2, metavar=("KIND", "TOKENS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        return
    quick = args.quick
    contexts = args.contexts or ([256] if quick else [1024, 4096])
    decode_contexts = args.decode or ([256, 1024] if quick else [1024, 4096, 8192])
    prefill = args.prefill or (256 if quick else 4096)
    steps = args.steps or (3 if quick else 8)
    configs = args.configs or (QUICK_QUALITY if quick else KVQ_QUALITY + PEER_QUALITY)

    import torch

    import kvq.hf  # noqa: F401  (registers attention "kvq")
    from kvq.hf.evaluate import evaluate, token_ids
    from kvq.hf.models import load_model, reference_text, reference_text_source, smollm2_path

    started = time.perf_counter()
    model, tokenizer = load_model()
    load_s = time.perf_counter() - started
    text = reference_text()
    n_tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
    lines = [
        "# SmolLM2-135M-Instruct with kvq's KVQCache against transformers' caches",
        f"{machine()}; torch threads {torch.get_num_threads()}; "
        + versions("torch", "transformers", "optimum-quanto", "hqq", "mlx", "gguf"),
        f"model: {smollm2_path().name} (GGUF Q4_1 dequantized to float32), loaded in "
        f"{load_s:.1f} s; text: {reference_text_source()}, {n_tokens:,} tokens",
        "",
    ]
    figures: dict = {}
    checks = []
    timings = {"load_s": load_s}

    if not args.skip_quality:
        for context in contexts:
            t0 = time.perf_counter()
            rows = evaluate(model, tokenizer, text, configs, context=context, chunk=args.chunk)
            timings[f"quality_{context}_s"] = time.perf_counter() - t0
            lines += [
                f"## Quality at {context:,} tokens (chunks of {args.chunk}, against float32 "
                f"DynamicCache; {timings[f'quality_{context}_s']:.0f} s)",
                "",
                rows.table(),
                "",
            ]
            by_name = rows.by_name()
            if "kvq q8" in by_name and context == contexts[0]:
                top1 = by_name["kvq q8"].top1
                name = f"q8 top-1 agreement with float32 at {context} tokens"
                checks.append((name, top1, ">=", 0.99))
                figures[name] = [f"{100 * top1:.2f}%", "-"]

    if not args.skip_speed:
        ids = token_ids(tokenizer, text, prefill)
        results: dict[tuple[str, int], dict] = {}
        prefill_s: dict[str, float] = {}
        t0 = time.perf_counter()
        skipped: dict[str, str] = {}
        for context in decode_contexts:
            for label, figures_ in decode_interleaved(model, SPEED, context, steps).items():
                if label.startswith("skip:"):
                    skipped.setdefault(label[5:], figures_)
                else:
                    results[label, context] = figures_
        for label, kind in SPEED.items():
            if (label, decode_contexts[-1]) not in results:
                continue
            try:
                last_run = results[label, decode_contexts[-1]]
                last_run["rss_growth_mib"] = rss_in_fresh_process(kind, decode_contexts[-1])
                prefill_s[label] = prefill_seconds(model, kind, ids)
            except Exception as error:  # a missing backend is reported, not fatal
                skipped.setdefault(label, f"{type(error).__name__}: {error}")
        lines += [f"- SKIP {label}: {error}" for label, error in skipped.items()]
        model.set_attn_implementation("sdpa")
        timings["speed_s"] = time.perf_counter() - t0
        header = ["cache", *(f"decode at {c:,} (ms)" for c in decode_contexts)]
        header += [
            f"attention/layer at {decode_contexts[-1]:,} (ms)",
            f"prefill {prefill:,} (s)",
            f"cache at {decode_contexts[-1]:,} (MiB)",
            f"peak-RSS growth at {decode_contexts[-1]:,} (MiB)",
        ]
        table = []
        last = decode_contexts[-1]
        for label in SPEED:
            if (label, last) not in results:
                continue
            r = results[label, last]
            table.append(
                [
                    label,
                    *(f"{results[label, c]['ms']:.1f}" for c in decode_contexts),
                    f"{r['attention_ms_per_layer']:.3f}",
                    f"{prefill_s.get(label, math.nan):.2f}",
                    f"{r['cache_bytes'] / 2**20:.1f}",
                    f"{r['rss_growth_mib']:.0f}",
                ]
            )
        lines += [
            f"## Decode and prefill ({steps} timed steps per point, median, the caches stepped "
            f"in turn; cache filled with random K/V; {timings['speed_s']:.0f} s)",
            "",
            markdown_table(header, table),
            "",
        ]

        def ratio(a: str, b: str, context: int) -> float:
            if (a, context) in results and (b, context) in results:
                return results[a, context]["ms"] / results[b, context]["ms"]
            return math.nan

        base = "DynamicCache fp32 (sdpa)"
        first = decode_contexts[0]
        for label, op, target, context in (
            ("KVQCache q4", "<=", 0.67, last),
            ("KVQCache q8 (the default)", "<=", 0.8, last),
            ("KVQCache q4", "<=", 1.1, first),
        ):
            value = ratio(label, base, context)
            if not math.isnan(value):
                name = f"decode at {context} tokens: {label} / DynamicCache ms"
                checks.append((name, value, op, target))
                figures[name] = [
                    f"{results[label, context]['ms']:.1f} ms",
                    f"{results[base, context]['ms']:.1f} ms",
                ]
        value = ratio("QuantizedCache quanto 4-bit", "KVQCache q4", last)
        if not math.isnan(value):
            name = f"decode at {last} tokens: QuantizedCache 4-bit / KVQCache q4 ms"
            checks.append((name, value, ">=", 10.0))
            figures[name] = [
                f"{results['KVQCache q4', last]['ms']:.1f} ms",
                f"{results['QuantizedCache quanto 4-bit', last]['ms']:.1f} ms",
            ]

    timings["total_s"] = time.perf_counter() - started
    lines += [
        "## Targets",
        "",
        *verdicts(checks),
        "",
        "Run time: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
    ]
    publish("bench_model", lines, figures)


if __name__ == "__main__":
    main()
