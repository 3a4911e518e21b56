"""Compiled kernels are cached on disk, and a second process loads them instead of compiling."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import kvq

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
stats["file"] = kvq.__file__
print(json.dumps(stats))
"""


def run_probe(cache_dir, package_root=None) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    if package_root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(package_root), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        cwd=package_root,  # "-c" puts the working directory first on sys.path
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_second_process_loads_kernels_from_cache_until_any_kernel_file_changes(tmp_path):
    """A copy of kvq: its second process loads the kernels; after an edit to a helper file
    (not the one the kernels are in), the next process compiles them again. Numba alone
    stamps a kernel with its own file only, and would load the old machine code."""
    package = tmp_path / "src"
    shutil.copytree(
        Path(kvq.__file__).parent, package / "kvq", ignore=shutil.ignore_patterns("__pycache__")
    )
    cache = tmp_path / "cache"
    first = run_probe(cache, package)
    assert Path(first["file"]).parent == package / "kvq", first
    assert first["quantize"]["misses"] >= 1  # compiled and written
    assert any(cache.rglob("*.nbi")), "no Numba cache index written"
    second = run_probe(cache, package)
    for name in ("quantize", "dequantize"):
        assert second[name]["misses"] == 0, second
        assert second[name]["hits"] >= 1, second
    helper = package / "kvq" / "kernels" / "_floatbits.py"
    helper.write_text(helper.read_text() + "\n# edited\n")
    third = run_probe(cache, package)
    for name in ("quantize", "dequantize"):
        assert third[name]["hits"] == 0, third
        assert third[name]["misses"] >= 1, third


def test_source_stamp_covers_every_kernel_file(tmp_path):
    from kvq.kernels._cache import source_stamp

    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text("x = 1\n")
    before = source_stamp(tmp_path)
    assert source_stamp(tmp_path) == before
    (tmp_path / "b.py").write_text("x = 2\n")
    assert source_stamp(tmp_path) != before


EVERY_CALL = """
import dataclasses, sys, numba, numpy as np, kvq
attention = sys.modules["kvq.attention"]
rng = np.random.default_rng(0)
Q = kvq.QuantConfig
configs = [Q(), Q.q3(), Q.kivi(2), Q.mlx(4), Q.original()]
configs.append(dataclasses.replace(Q.q4(), sink_tokens=0))
for config in configs:
    for kv_heads, group, dim in ((2, 1, 64), (1, 4, 128)):
        cache = kvq.KVCache(kv_heads, dim, config)
        k, v = rng.standard_normal((2, kv_heads, 300, dim)).astype(np.float32)
        cache.append(k, v)
        for t_q in (1, 3):
            q = rng.standard_normal((kv_heads * group, t_q, dim))
            q_read_only = q.astype(np.float32)
            q_read_only.flags.writeable = False
            sinks = rng.standard_normal(kv_heads * group)
            for serial, threads in ((1 << 62, 1), (-1, 1), (-1, numba.config.NUMBA_NUM_THREADS)):
                attention.SERIAL_WORK = serial
                numba.set_num_threads(threads)
                kvq.attention(q, cache)
                kvq.attention(q_read_only, cache, sinks=sinks, causal=False)
kvq.rotation.rotate(k, 3), kvq.rotation.unrotate(k, 3)
print("done")
"""


def test_attention_kernels_compile_once_for_every_scheme_and_call():
    """Every scheme, thread count, query dtype and flag runs one compiled kernel: each extra
    signature of the attention kernel is another cold compile of minutes (a uint64 task
    index, a literal True, a writeable sinks array each once cost one)."""
    result = subprocess.run([sys.executable, "-c", EVERY_CALL], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    from kvq import kernels
    from kvq.kernels import attention, sink_tokens

    functions = (
        kernels.attention_blocks,
        attention._attend_task,
        attention._token_rows,
        attention._decode_token_major,
        sink_tokens.merge_sink_tokens,
        kernels.rotate_rows,
    )
    for function in functions:
        # the cache index lists what every process compiled from this source (a callee
        # loaded with its caller's cached code never shows in its own dispatcher)
        found = [str(key[0]) for key in function._cache._cache_file._load_index()]
        assert len(found) == 1, (
            f"{function.__name__} compiled {len(found)} times (or its cache holds an older "
            "caller's: delete kvq's *.nbi and *.nbc):\n" + "\n".join(found)
        )
