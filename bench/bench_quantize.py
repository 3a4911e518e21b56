"""Quantize/dequantize throughput of kvq against np.copyto, x.copy(), NumPy, MLX and gguf.

One run, one machine: every figure below is measured in the same process on the same data,
interleaved and as medians over repeats, so ratios are what to read. Targets (issue 2):
  - kvq quantize of K and V (32M float32 each) <= 0.8x of ``k.copy(); v.copy()``;
  - kvq dequantize of the whole cache <= 0.8x of the same;
  - kvq quantize >= 5x the throughput of MLX's CPU ``mx.quantize`` (8 bits, group 32);
  - a new process importing kvq and quantizing a small array < 1 s with Numba's cache warm.

    python bench/bench_quantize.py            # 256 MB (64M values), about a minute
    python bench/bench_quantize.py --mb 16    # quick look
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gbps, machine, markdown_table, optional, publish, verdicts, versions

import kvq
from kvq.timing import interleaved_medians, median_seconds

GROUP = 32


def numpy_quantize(x2d: np.ndarray):
    """Plain NumPy, same scheme: per-row min/max, uint8 codes."""
    lowest = x2d.min(axis=1, keepdims=True)
    scale = (x2d.max(axis=1, keepdims=True) - lowest) / np.float32(255)
    inverse = np.divide(1, scale, out=np.zeros_like(scale), where=scale > 0)
    return np.rint((x2d - lowest) * inverse).astype(np.uint8), scale, lowest


def numpy_dequantize(codes, scale, lowest):
    return lowest + scale * codes.astype(np.float32)


FIRST_CALL = (
    "import time; t = time.perf_counter(); import numpy as np, kvq; "
    "x = np.linspace(-1, 1, 4096, dtype=np.float32); "
    "kvq.QuantizedKVCache.quantize(x, x).dequant_k(0, 100); "
    "print(time.perf_counter() - t)"
)


def first_call_seconds(cache_dir: str | None) -> float:
    """Wall time of a new process: import kvq + a small quantize and dequantize."""
    env = dict(os.environ)
    if cache_dir:
        env["NUMBA_CACHE_DIR"] = cache_dir
    result = subprocess.run(
        [sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True, check=True
    )
    return float(result.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="float32 MB in K and V together")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--peer-repeats", type=int, default=3)
    args = parser.parse_args()

    n = args.mb * 2**20 // 4 // 2 // GROUP * GROUP  # values per tensor
    rng = np.random.default_rng(0)
    k = rng.standard_normal(n, dtype=np.float32)
    v = rng.standard_normal(n, dtype=np.float32)
    total_bytes = k.nbytes + v.nbytes
    k_out, v_out = np.empty_like(k), np.empty_like(v)
    cache = kvq.QuantizedKVCache.quantize(k, v)

    times = interleaved_medians(
        {
            "k.copy(); v.copy()": lambda: (k.copy(), v.copy()),
            "np.copyto (existing output)": lambda: (np.copyto(k_out, k), np.copyto(v_out, v)),
            "kvq quantize": lambda: kvq.QuantizedKVCache.quantize(k, v),
            "kvq dequantize": lambda: (cache.dequant_k(), cache.dequant_v()),
            "kvq dequantize (out=)": lambda: (
                cache.dequant_k(out=k_out),
                cache.dequant_v(out=v_out),
            ),
        },
        repeats=args.repeats,
    )
    skipped = []

    k2d, v2d = k.reshape(-1, GROUP), v.reshape(-1, GROUP)
    numpy_codes = [numpy_quantize(k2d), numpy_quantize(v2d)]
    times["NumPy quantize"] = median_seconds(
        lambda: (numpy_quantize(k2d), numpy_quantize(v2d)), args.peer_repeats
    )
    times["NumPy dequantize"] = median_seconds(
        lambda: [numpy_dequantize(*q) for q in numpy_codes], args.peer_repeats
    )
    numpy_codes.clear()

    mx = optional("mlx.core")
    if mx is None:
        skipped.append("MLX (pip install mlx mlx-cpu)")
    else:
        mk, mv = mx.array(k.reshape(-1, 4096)), mx.array(v.reshape(-1, 4096))
        mx.eval(mk, mv)

        def mlx_quantize():
            out = [mx.quantize(a, group_size=GROUP, bits=8) for a in (mk, mv)]
            mx.eval(out)
            return out

        mq = mlx_quantize()
        times["MLX mx.quantize (CPU)"] = median_seconds(mlx_quantize, args.peer_repeats)

        def mlx_dequantize():
            out = [mx.dequantize(*q, group_size=GROUP, bits=8) for q in mq]
            mx.eval(out)

        times["MLX mx.dequantize (CPU)"] = median_seconds(mlx_dequantize, args.peer_repeats)
        del mk, mv, mq

    # issue 4: low-bit quantize throughput against MLX at the same bits and group size
    for bits in (4, 2):
        times[f"kvq quantize {bits}-bit"] = median_seconds(
            lambda bits=bits: (kvq.quantize(k, bits, GROUP), kvq.quantize(v, bits, GROUP)),
            args.peer_repeats,
        )
        if mx is not None:
            mk, mv = mx.array(k.reshape(-1, 4096)), mx.array(v.reshape(-1, 4096))

            def mlx_low(bits=bits, arrays=(mk, mv)):
                out = [mx.quantize(a, group_size=GROUP, bits=bits) for a in arrays]
                mx.eval(out)

            times[f"MLX mx.quantize {bits}-bit (CPU)"] = median_seconds(mlx_low, args.peer_repeats)
            del mk, mv

    gguf = optional("gguf")
    if gguf is None:
        skipped.append("gguf (pip install gguf)")
    else:
        q8 = gguf.GGMLQuantizationType.Q8_0
        kq, vq = gguf.quants.quantize(k2d, q8), gguf.quants.quantize(v2d, q8)
        times["gguf Q8_0 quantize"] = median_seconds(
            lambda: (gguf.quants.quantize(k2d, q8), gguf.quants.quantize(v2d, q8)),
            args.peer_repeats,
            warmup=0,
        )
        times["gguf Q8_0 dequantize"] = median_seconds(
            lambda: (gguf.quants.dequantize(kq, q8), gguf.quants.dequantize(vq, q8)),
            args.peer_repeats,
            warmup=0,
        )
        del kq, vq

    with tempfile.TemporaryDirectory() as cold_dir:
        cold = first_call_seconds(cold_dir)
        first_call_seconds(None)  # make sure the default cache is warm
        warm = float(np.median([first_call_seconds(None) for _ in range(3)]))

    copy = times["k.copy(); v.copy()"]
    rows = [
        [name, f"{t * 1e3:.1f}", f"{gbps(total_bytes, t):.2f}", f"{t / copy:.2f}"]
        for name, t in times.items()
    ]
    table = markdown_table(
        ["operation", "ms", "GB/s of float32", "time / (k.copy(); v.copy())"], rows
    )
    mlx_ratio = (
        times["MLX mx.quantize (CPU)"] / times["kvq quantize"]
        if "MLX mx.quantize (CPU)" in times
        else float("nan")
    )
    checks = [
        ("quantize <= 0.8x copy", times["kvq quantize"] / copy, "<=", 0.8),
        ("dequantize <= 0.8x copy", times["kvq dequantize"] / copy, "<=", 0.8),
        ("quantize >= 5x MLX mx.quantize", mlx_ratio, ">=", 5.0),
        *(
            (
                f"{bits}-bit quantize >= 5x MLX",
                times.get(f"MLX mx.quantize {bits}-bit (CPU)", float("nan"))
                / times[f"kvq quantize {bits}-bit"],
                ">=",
                5.0,
            )
            for bits in (4, 2)
        ),
        ("import + first call, warm cache < 1 s", warm, "<", 1.0),
    ]

    def ms(name: str) -> str:
        return f"{times[name] * 1e3:.1f} ms" if name in times else "-"

    figures = {  # check name -> (kvq figure, peer figure), for bench/run_all.py's summary
        checks[0][0]: (ms("kvq quantize"), f"{ms('k.copy(); v.copy()')} (copies)"),
        checks[1][0]: (ms("kvq dequantize"), f"{ms('k.copy(); v.copy()')} (copies)"),
        checks[2][0]: (ms("kvq quantize"), f"{ms('MLX mx.quantize (CPU)')} (MLX)"),
        checks[3][0]: (ms("kvq quantize 4-bit"), f"{ms('MLX mx.quantize 4-bit (CPU)')} (MLX)"),
        checks[4][0]: (ms("kvq quantize 2-bit"), f"{ms('MLX mx.quantize 2-bit (CPU)')} (MLX)"),
        checks[5][0]: (f"{warm:.2f} s", f"{cold:.2f} s cold cache"),
    }
    lines = [
        f"# bench_quantize: {args.mb} MB float32 (K and V, {n:,} values each), 8-bit, "
        f"blocks of {GROUP}",
        f"{machine()}; {versions('mlx', 'gguf')}; "
        f"medians of {args.repeats} (kvq, copies) / {args.peer_repeats} (peers)",
        "",
        table,
        "",
        f"New process, import kvq + first small quantize: {warm:.2f} s with Numba's cache "
        f"warm, {cold:.2f} s cold (compiling).",
        "",
    ]
    lines += verdicts(checks)
    if skipped:
        lines.append(f"- skipped peers: {', '.join(skipped)}")
    publish("bench_quantize", lines, figures)


if __name__ == "__main__":
    main()
