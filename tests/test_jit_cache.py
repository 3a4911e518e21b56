"""Compiled kernels are cached on disk, and a second process loads them instead of compiling."""

import json
import os
import subprocess
import sys

PROBE = """
import json, numpy as np, kvq
from kvq import kernels
x = np.linspace(-1, 1, 100, dtype=np.float32)
kvq.QuantizedKVCache.quantize(x, x).dequant_k(3, 70)
stats = {}
for name, f in (("quantize", kernels.quantize_blocks), ("dequantize", kernels.dequantize_blocks)):
    stats[name] = {
        "hits": sum(f.stats.cache_hits.values()),
        "misses": sum(f.stats.cache_misses.values()),
    }
print(json.dumps(stats))
"""


def run_probe(cache_dir) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_second_process_loads_kernels_from_cache(tmp_path):
    first = run_probe(tmp_path)
    assert first["quantize"]["misses"] >= 1  # compiled and written
    assert any(tmp_path.rglob("*.nbi")), "no Numba cache index written"
    second = run_probe(tmp_path)
    for name in ("quantize", "dequantize"):
        assert second[name]["misses"] == 0, second
        assert second[name]["hits"] >= 1, second
