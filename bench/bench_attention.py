"""Decode attention on the quantized cache against torch fp32 SDPA and MLX's quantized path.

GPT-OSS-20B decode shape: 64 query heads, 8 KV heads, head_dim 64, one query token.
Targets (issue 6): at 32,768 cached tokens, kvq at 8 and 4 bits each in at most 1/3 of the
time of torch fp32 ``scaled_dot_product_attention(..., enable_gqa=True)`` and at least 20x
faster than MLX's CPU quantized path (quantized_matmul, softmax, quantized_matmul, as mlx-lm
does it); at 4,096 tokens no slower than torch. Also prints achieved GB/s of cache read and
GFLOP/s beside the machine's read bandwidth measured in the same run.

    python bench/bench_attention.py               # 4096, 32768, 131072 tokens
    python bench/bench_attention.py --tokens 4096
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from numba import njit, prange

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch, MLX and Numba share 2 cores
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, optional, publish, verdicts, versions

import kvq
from kvq.synthetic import kv_layer
from kvq.timing import interleaved_medians, median_seconds

Q_HEADS, KV_HEADS, DIM = 64, 8, 64


@njit(parallel=True, cache=True, fastmath={"reassoc"})
def _read_sum(x):
    total = 0.0
    for i in prange(x.shape[0]):
        total += x[i]
    return total


def read_bandwidth() -> float:
    """GB/s of a parallel Numba read of 256 MB (the machine's read speed, this run)."""
    x = np.ones(64 * 2**20, np.float32)
    seconds = median_seconds(lambda: _read_sum(x), repeats=7)
    return x.nbytes / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch = optional("torch")
    mx = optional("mlx.core")
    bandwidth = read_bandwidth()
    rng = np.random.default_rng(0)
    rows, checks = [], []
    figures = {}  # check name -> (kvq figure, peer figure), for bench/run_all.py's summary
    for tokens in args.tokens:
        k, v = kv_layer(KV_HEADS, tokens, DIM, seed=1)
        q = rng.standard_normal((Q_HEADS, 1, DIM)).astype(np.float32)
        runs = {}
        caches = {
            "kvq 8-bit (q8)": kvq.QuantConfig.q8(),
            "kvq 4-bit (q4)": kvq.QuantConfig.q4(),
        }
        built = {}
        for name, config in caches.items():
            cache = kvq.KVCache(KV_HEADS, DIM, config, capacity=tokens)
            cache.append(k, v)
            kvq.attention(q, cache)  # compile / load
            built[name] = cache
            runs[name] = lambda cache=cache, q=q: kvq.attention(q, cache)
        if torch is not None:
            tq = torch.from_numpy(q).reshape(1, Q_HEADS, 1, DIM)
            tk = torch.from_numpy(k).reshape(1, KV_HEADS, tokens, DIM)
            tv = torch.from_numpy(v).reshape(1, KV_HEADS, tokens, DIM)
            sdpa = torch.nn.functional.scaled_dot_product_attention

            def torch_run(tq=tq, tk=tk, tv=tv, sdpa=sdpa):
                with torch.no_grad():
                    return sdpa(tq, tk, tv, enable_gqa=True)

            runs["torch fp32 SDPA"] = torch_run
        if mx is not None:
            for bits in (8, 4):
                qk = mx.quantize(mx.array(k[None]), group_size=32, bits=bits)
                qv = mx.quantize(mx.array(v[None]), group_size=32, bits=bits)
                mq = mx.array(q.reshape(1, KV_HEADS, Q_HEADS // KV_HEADS, 1, DIM))
                mx.eval(qk, qv, mq)

                def mlx_run(qk=qk, qv=qv, mq=mq, bits=bits):
                    keys = [a[:, :, None] for a in qk]
                    values = [a[:, :, None] for a in qv]
                    scores = mx.quantized_matmul(
                        mq * DIM**-0.5, *keys, transpose=True, group_size=32, bits=bits
                    )
                    weights = mx.softmax(scores, axis=-1, precise=True)
                    out = mx.quantized_matmul(
                        weights, *values, transpose=False, group_size=32, bits=bits
                    )
                    mx.eval(out)
                    return out

                runs[f"MLX {bits}-bit quantized path"] = mlx_run
        times = interleaved_medians(runs, repeats=args.repeats)
        flops = 4 * Q_HEADS * tokens * DIM
        torch_time = times.get("torch fp32 SDPA", float("nan"))
        for name, seconds in times.items():
            if name in built:
                read = built[name].nbytes
            elif name.startswith("torch"):
                read = k.nbytes + v.nbytes
            else:
                read = float("nan")
            rows.append(
                [
                    f"{tokens:,}",
                    name,
                    f"{seconds * 1e3:.2f}",
                    f"{read / seconds / 1e9:.1f}",
                    f"{flops / seconds / 1e9:.1f}",
                    f"{seconds / torch_time:.2f}",
                ]
            )
        for bits in (8, 4):
            ours = times[f"kvq {bits}-bit (q{bits})"]
            ours_ms, torch_ms = f"{ours * 1e3:.2f} ms", f"{torch_time * 1e3:.2f} ms (torch)"
            if tokens == 32768:
                checks.append((f"32K {bits}-bit <= 1/3 torch", ours / torch_time, "<=", 1 / 3))
                figures[checks[-1][0]] = (ours_ms, torch_ms)
                mlx_time = times.get(f"MLX {bits}-bit quantized path", float("nan"))
                checks.append((f"32K {bits}-bit >= 20x MLX", mlx_time / ours, ">=", 20))
                figures[checks[-1][0]] = (ours_ms, f"{mlx_time * 1e3:.1f} ms (MLX)")
            if tokens == 4096:
                checks.append((f"4K {bits}-bit no slower than torch", ours / torch_time, "<=", 1))
                figures[checks[-1][0]] = (ours_ms, torch_ms)
    lines = [
        f"# bench_attention: decode, {Q_HEADS} query heads, {KV_HEADS} KV heads, head_dim {DIM}",
        f"{machine()}; {versions('torch', 'mlx')}; medians of {args.repeats}",
        f"Machine read bandwidth (parallel Numba sum of 256 MB, this run): {bandwidth:.1f} GB/s",
        "",
        markdown_table(
            ["tokens", "method", "ms", "GB/s of cache read", "GFLOP/s", "time / torch"], rows
        ),
        "",
    ]
    lines += verdicts(checks)
    publish("bench_attention", lines, figures)


if __name__ == "__main__":
    main()
