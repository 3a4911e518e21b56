"""``kvq demo``: quantize one GPT-OSS-20B layer's synthetic K/V and report error and speed."""

import time

import numpy as np

from kvq.cache import QuantizedKVCache, human_bytes
from kvq.synthetic import kv_layer
from kvq.timing import interleaved_medians


def run_demo(
    num_kv_heads: int = 8,
    tokens: int = 4096,
    head_dim: int = 64,
    group_size: int = 32,
    scale_dtype: str = "float32",
    repeats: int = 7,
) -> str:
    """Return the demo's report (also what ``kvq demo`` prints)."""
    k, v = kv_layer(num_kv_heads, tokens, head_dim)
    start = time.perf_counter()
    cache = QuantizedKVCache.quantize(k, v, group_size, scale_dtype)
    cache.dequant_k(0, 1)
    first_call = time.perf_counter() - start

    k_hat, v_hat = cache.dequant_k(), cache.dequant_v()
    k_out, v_out = np.empty(k.size, np.float32), np.empty(v.size, np.float32)
    times = interleaved_medians(
        {
            "quantize": lambda: QuantizedKVCache.quantize(k, v, group_size, scale_dtype),
            "dequantize": lambda: (cache.dequant_k(out=k_out), cache.dequant_v(out=v_out)),
            "copyto": lambda: (np.copyto(k_out, k.reshape(-1)), np.copyto(v_out, v.reshape(-1))),
        },
        repeats=repeats,
    )
    input_bytes = k.nbytes + v.nbytes

    def rate(name: str) -> str:
        gbps = input_bytes / times[name] / 1e9
        return f"{times[name] * 1e3:7.2f} ms  {gbps:6.1f} GB/s of float32"

    lines = [
        f"kvq demo: synthetic K/V of one GPT-OSS-20B layer, {num_kv_heads} KV heads x "
        f"{tokens} tokens x {head_dim}",
        f"  shape             {cache.shape} per tensor, {cache.size:,} values each",
        f"  scheme            uint8 codes, groups of {group_size}, {scale_dtype} scale and min",
        f"  stored            {human_bytes(cache.nbytes)} vs {human_bytes(input_bytes)} float32"
        f"  ->  {cache.compression_ratio():.2f}x",
    ]
    for name, x, x_hat, qb in (("K", k, k_hat, cache.k), ("V", v, v_hat, cache.v)):
        error = x_hat - x.reshape(-1)
        rms = float(np.sqrt(np.mean(error.astype(np.float64) ** 2)))
        rel = rms / float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
        lines.append(
            f"  {name} error           max {np.abs(error).max():.4g} "
            f"(largest scale/2 {float(qb.scales.max()) / 2:.4g}), RMS {rms:.4g} ({rel:.2%} of RMS)"
        )
    lines += [
        f"  quantize K+V      {rate('quantize')}  (allocating its output)",
        f"  dequantize K+V    {rate('dequantize')}  (into existing arrays, out=)",
        f"  np.copyto K+V     {rate('copyto')}  (into existing arrays: memory yardstick)",
        f"  first call        {first_call * 1e3:7.0f} ms  (JIT compile or Numba cache load)",
    ]
    return "\n".join(lines)
