"""kvq from several Python threads: separate objects give the serial results exactly, a shared
KVCache or MemoryPool stays consistent, and Numba's threading layer cannot crash the process
(workqueue launches are serialised; checked in a subprocess)."""

import copy
import gc
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pytest

import kvq
from kvq import _threads, kernels
from kvq.synthetic import kv_layer

THREADS = 4
CONFIGS = {
    "default": (kvq.QuantConfig.original(), None),
    "q4-window": (kvq.QuantConfig.q4(), 96),
    "kivi-residual": (kvq.QuantConfig.kivi(2, residual=16), None),
}


def parallel(function, items):
    """``[function(item) for item in items]``, run on THREADS threads at once."""
    parties = min(THREADS, len(items))
    barrier = threading.Barrier(parties)

    def run(indexed):
        index, item = indexed
        if index < parties:  # the first items start together, to overlap as much as possible
            barrier.wait(timeout=120)
        return function(item)

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(run, enumerate(items)))


def stored(cache: kvq.KVCache) -> list[np.ndarray]:
    """Every held array of a cache: codes and parameters of each held chunk, and residuals."""
    arrays = []
    for stream in (cache._k, cache._v):
        for key in sorted(stream.store):
            for c in range(stream.first_chunk, stream.chunks):
                arrays.append(stream.store[key][c % stream.slots].copy())
        arrays.append(stream.pending.copy())
    return arrays


def assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def fill(config, window, seed):
    """A cache fed 160 tokens of its own data in uneven steps, and what it stores."""
    k, v = kv_layer(4, 160, 64, seed=seed)
    cache = kvq.KVCache(4, 64, config, window=window)
    at = 0
    for step in [1, 7, 1, 40, 1, 1, 64, 45]:
        cache.append(k[:, at : at + step], v[:, at : at + step])
        at += step
    return cache, stored(cache), cache.keys(), cache.values()


# --- separate objects: concurrent equals serial, bit for bit -----------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_separate_caches_appended_concurrently_equal_serial(name):
    config, window = CONFIGS[name]
    seeds = list(range(2 * THREADS))
    serial = [fill(config, window, seed) for seed in seeds]
    concurrent = parallel(lambda seed: fill(config, window, seed), seeds)
    for (_, s_arrays, s_keys, s_values), (_, c_arrays, c_keys, c_values) in zip(
        serial, concurrent, strict=True
    ):
        assert_same(s_arrays, c_arrays)
        np.testing.assert_array_equal(s_keys, c_keys)
        np.testing.assert_array_equal(s_values, c_values)


def test_quantize_concurrently_equals_serial():
    rng = np.random.default_rng(5)
    schemes = [
        kvq.Scheme(8, 32),
        kvq.Scheme(4, 32, axis=-2, rotate=True, double_quant=True, search=True),
        kvq.Scheme(3, 64, scale_dtype="float16"),
        kvq.Scheme(2, 32, double_quant=True),
    ]
    jobs = [(rng.standard_normal((8, 512, 64), dtype=np.float32), s) for s in schemes * 2]

    def run(job):
        x, scheme = job
        qt = kvq.quantize(x, scheme=scheme)
        return qt.parts(), qt.dequantize()

    serial = [run(job) for job in jobs]
    for (s_parts, s_values), (c_parts, c_values) in zip(serial, parallel(run, jobs), strict=True):
        assert s_parts.keys() == c_parts.keys()
        for key in s_parts:
            np.testing.assert_array_equal(s_parts[key], c_parts[key])
        np.testing.assert_array_equal(s_values, c_values)


def test_blockwise_cache_concurrently_with_a_shared_pool_equals_serial():
    rng = np.random.default_rng(6)
    tensors = [rng.standard_normal((2, 8, 1000, 64), dtype=np.float32) for _ in range(8)]
    serial = [kvq.QuantizedKVCache.quantize(k, v, block_size=32) for k, v in tensors]
    pool = kvq.MemoryPool(64 << 20)

    def run(kv):
        cache = kvq.QuantizedKVCache.quantize(*kv, block_size=32, pool=pool)
        return cache.dequant_k(), cache.dequant_v(7, 90_000)

    results = parallel(run, tensors)
    for reference, (keys, values) in zip(serial, results, strict=True):
        np.testing.assert_array_equal(keys, reference.dequant_k())
        np.testing.assert_array_equal(values, reference.dequant_v(7, 90_000))
    del results
    gc.collect()
    assert pool.stats()["live"] == 0 and pool.stats()["in_use"] == 0


def test_attention_concurrently_equals_serial():
    caches = [
        fill(CONFIGS[name][0], CONFIGS[name][1], seed)[0] for name in CONFIGS for seed in (1, 2)
    ]
    rng = np.random.default_rng(7)
    jobs = [(cache, rng.standard_normal((16, 1, 64), dtype=np.float32)) for cache in caches]
    jobs += [(caches[0], rng.standard_normal((8, 3, 64), dtype=np.float32)) for _ in range(4)]
    sinks = np.linspace(-1, 1, 16)

    def run(job):
        cache, q = job
        return kvq.attention(q, cache, sinks=sinks if q.shape[0] == 16 else None)

    serial = [run(job) for job in jobs]
    for _ in range(3):
        for s, c in zip(serial, parallel(run, jobs), strict=True):
            np.testing.assert_array_equal(s, c)


# --- one KVCache shared by threads: appends are serialised by its lock --------------------------


def tagged(tag: float, tokens: int = 1) -> np.ndarray:
    """(2, tokens, 64) of constant rows: per-token 8-bit groups store them exactly."""
    return np.broadcast_to(
        (tag + np.arange(tokens, dtype=np.float32) / 1000)[None, :, None], (2, tokens, 64)
    )


def test_shared_cache_appends_from_threads_are_atomic_and_complete():
    cache = kvq.KVCache(
        2, 64, kvq.QuantConfig.original()
    )  # 8-bit per token: constant rows come back exactly
    steps = 60

    def writer(thread):
        for step in range(steps):
            tokens = 1 + step % 3
            k = tagged(thread * 1000 + step, tokens)
            cache.append(k, -k)

    parallel(writer, list(range(THREADS)))
    total = THREADS * sum(1 + s % 3 for s in range(steps))
    assert len(cache) == cache.held == total
    keys, values = cache.keys(), cache.values()
    np.testing.assert_array_equal(values, -keys)
    ids = keys[0, :, 0].astype(np.float64)
    # every append lands whole (its tokens adjacent, in order), each thread's in its order
    seen = {thread: [] for thread in range(THREADS)}
    at = 0
    while at < total:
        thread, step = divmod(round(ids[at]), 1000)
        tokens = 1 + step % 3
        expected = (thread * 1000 + step + np.arange(tokens, dtype=np.float32) / 1000).astype(
            np.float32
        )
        np.testing.assert_array_equal(keys[0, at : at + tokens, 0], expected)
        seen[thread].append(step)
        at += tokens
    assert all(steps_seen == list(range(steps)) for steps_seen in seen.values())
    # and the cache is exactly what one thread appending in that order would have built
    serial = kvq.KVCache(2, 64, kvq.QuantConfig.original())
    at = 0
    while at < total:
        thread, step = divmod(round(ids[at]), 1000)
        k = tagged(thread * 1000 + step, 1 + step % 3)
        serial.append(k, -k)
        at += 1 + step % 3
    assert_same(stored(serial), stored(cache))


def test_append_and_attention_wait_for_the_cache_lock():
    cache = kvq.KVCache(2, 64, kvq.QuantConfig.q4())
    k, v = kv_layer(2, 40, 64, seed=3)
    cache.append(k, v)
    q = np.ones((4, 1, 64), np.float32)
    done = []
    with cache._lock:
        workers = [
            threading.Thread(target=lambda: done.append(cache.append(k[:, :1], v[:, :1]))),
            threading.Thread(target=lambda: done.append(kvq.attention(q, cache))),
        ]
        for worker in workers:
            worker.start()
        time.sleep(0.3)
        assert done == [] and len(cache) == 40  # both wait while the lock is held
    for worker in workers:
        worker.join(timeout=60)
    assert len(done) == 2 and len(cache) == 41


def test_readers_during_appends_see_consistent_states():
    config = kvq.QuantConfig.kivi(2, residual=8)
    cache = kvq.KVCache(2, 64, config, window=64)
    k, v = kv_layer(2, 600, 64, seed=4)
    cache.append(k[:, :64], v[:, :64])
    stop = threading.Event()
    problems = []

    def reader(_):
        q = np.random.default_rng(0).standard_normal((4, 1, 64), dtype=np.float32)
        while not stop.is_set():
            out = kvq.attention(q, cache)
            keys = cache.keys()
            stats = cache.stats()
            # values per token with residual 8 hold exactly the window; keys at least that
            if not np.isfinite(out).all() or keys.shape != (2, 64, 64):
                problems.append((out, keys.shape))
            if stats["held"] != 64 or not 64 <= stats["k_quantized"] + stats["k_residual"] < 96:
                problems.append(stats)

    with ThreadPoolExecutor(2) as pool:
        readers = [pool.submit(reader, i) for i in range(2)]
        for t in range(64, 600):
            cache.append(k[:, t : t + 1], v[:, t : t + 1])
        stop.set()
        for r in readers:
            r.result()
    assert problems == []
    serial = kvq.KVCache(2, 64, config, window=64)
    for t in range(600):
        serial.append(k[:, t : t + 1], v[:, t : t + 1])
    assert_same(stored(serial), stored(cache))


def test_copies_get_their_own_lock():
    cache, arrays, keys, _ = fill(kvq.QuantConfig.q4(), 96, seed=9)
    for clone in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert clone._lock is not cache._lock
        np.testing.assert_array_equal(clone.keys(), keys)
        assert_same(stored(clone), arrays)
        clone.append(*kv_layer(4, 1, 64, seed=1))
        assert len(clone) == len(cache) + 1


# --- MemoryPool shared by threads ---------------------------------------------------------------


def test_pool_shared_by_threads_stays_exact():
    pool = kvq.MemoryPool(32 << 20)
    empty = pool.stats()

    def churn(seed):
        rng = np.random.default_rng(seed)
        live, bad = [], 0
        for i in range(3000):
            if live and (len(live) > 20 or rng.random() < 0.5):
                array, tag = live.pop(int(rng.integers(len(live))))
                bad += not (array == tag).all()
                pool.release(array)
            else:
                try:
                    array = pool.acquire(int(rng.integers(1, 20_000)), np.uint8)
                except kvq.PoolExhausted:
                    continue
                tag = (seed * 7 + i) % 251
                array[:] = tag  # arrays that overlapped would overwrite each other's tags
                live.append((array, tag))
        for array, tag in live:
            bad += not (array == tag).all()
            pool.release(array)
        return bad

    assert parallel(churn, list(range(THREADS))) == [0] * THREADS
    final = pool.stats()
    assert {k: final[k] for k in final if k != "peak"} == {
        k: empty[k] for k in empty if k != "peak"
    }


def test_pool_backed_caches_in_threads_equal_serial_and_return_storage():
    pool = kvq.MemoryPool(16 << 20)
    config = kvq.QuantConfig.q4()

    def run(seed):
        k, v = kv_layer(2, 130, 64, seed=seed)
        cache = kvq.KVCache(2, 64, config, pool=pool)  # grows from the pool
        for t in range(130):
            cache.append(k[:, t : t + 1], v[:, t : t + 1])
        return cache.keys(), cache.values()

    serial = []
    for seed in range(THREADS):
        k, v = kv_layer(2, 130, 64, seed=seed)
        plain = kvq.KVCache(2, 64, config)
        plain.append(k, v)
        serial.append((plain.keys(), plain.values()))
    for (sk, sv), (ck, cv) in zip(serial, parallel(run, list(range(THREADS))), strict=True):
        np.testing.assert_array_equal(sk, ck)
        np.testing.assert_array_equal(sv, cv)
    gc.collect()
    assert pool.stats()["live"] == 0


# --- Numba's threading layer --------------------------------------------------------------------


def test_this_process_uses_a_thread_safe_layer_without_wrappers():
    kvq.quantize(np.ones(64, np.float32))
    layer = numba.threading_layer()
    assert _threads.LAYER == layer
    if layer in _threads.SAFE_LAYERS:
        assert not _threads.SERIALISE
        assert isinstance(kernels.quantize_blocks, numba.core.registry.CPUDispatcher)


@pytest.mark.parametrize(
    ("requested", "loadable", "expected"),
    [
        ("default", {"tbb", "omp", "workqueue"}, ("threadsafe", "tbb")),
        ("default", {"omp", "workqueue"}, ("threadsafe", "omp")),
        ("default", {"workqueue"}, ("default", "workqueue")),
        ("DEFAULT", set(), ("default", None)),
        ("workqueue", {"omp", "workqueue"}, ("workqueue", "workqueue")),
        ("omp", {"workqueue"}, ("omp", None)),
        ("threadsafe", {"workqueue"}, ("threadsafe", None)),
        ("safe", {"tbb", "omp"}, ("safe", "tbb")),
    ],
)
def test_layer_choice(requested, loadable, expected):
    assert _threads.choose(requested, ("tbb", "omp", "workqueue"), loadable.__contains__) == (
        expected
    )


def test_layer_choice_follows_numba_priority_without_a_safe_layer():
    choice = _threads.choose("default", ("workqueue", "omp", "tbb"), {"workqueue"}.__contains__)
    assert choice == ("default", "workqueue")
    # with a safe layer loadable, kvq asks for it even when workqueue comes first
    choice = _threads.choose("default", ("workqueue", "omp", "tbb"), lambda layer: True)
    assert choice == ("threadsafe", "tbb")


def test_serialised_kernel_holds_the_lock_and_forwards_attributes():
    wrapped = _threads.serialised(kernels.dequantize_blocks, force=True)
    assert wrapped.py_func is kernels.dequantize_blocks.py_func
    assert _threads.serialised(len) is len or _threads.SERIALISE
    codes = np.arange(64, dtype=np.uint8)
    out = np.empty(64, np.float32)
    finished = []

    def call():
        wrapped(codes, np.ones(2, np.float32), np.zeros(2, np.float32), 32, out)
        finished.append(True)

    with _threads.KERNEL_LOCK:
        worker = threading.Thread(target=call)
        worker.start()
        time.sleep(0.2)
        assert finished == []
    worker.join(timeout=60)
    assert finished == [True]
    np.testing.assert_array_equal(out, np.arange(64, dtype=np.float32))


def test_small_appends_run_on_the_calling_thread_only():
    before = numba.get_num_threads()
    assert _threads.on_calling_thread(numba.get_num_threads) == 1
    assert numba.get_num_threads() == before
    with pytest.raises(ZeroDivisionError):
        _threads.on_calling_thread(lambda: 1 / 0)
    assert numba.get_num_threads() == before
    inside = []

    def other_thread():
        inside.append(numba.get_num_threads())

    def check():
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        return numba.get_num_threads()

    assert _threads.on_calling_thread(check) == 1
    assert inside == [numba.config.NUMBA_NUM_THREADS]  # the count is per thread


WORKQUEUE_PROBE = textwrap.dedent(
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numba
    import numpy as np

    import kvq
    from kvq import _threads, kernels

    assert _threads.SERIALISE and _threads.LAYER == "workqueue", _threads.LAYER
    for name in kernels.__all__:  # every parallel kernel, wherever it is called from
        kernel = getattr(kernels, name)
        if getattr(kernel, "targetoptions", {}).get("parallel") or hasattr(kernel, "py_func"):
            assert isinstance(kernel, _threads.SerialisedKernel), name
    from kvq.formats import ggml_dequantize, ggml_quantize

    rng = np.random.default_rng(0)
    tensors = [rng.standard_normal((8, 256, 64), dtype=np.float32) for _ in range(8)]
    queries = rng.standard_normal((16, 1, 64), dtype=np.float32)

    def work(i):
        x = tensors[i]
        out = [kvq.quantize(x, bits=4, axis=-2, rotate=True, double_quant=True).dequantize()]
        cache = kvq.KVCache(8, 64, kvq.QuantConfig.q4())
        cache.append(x[:, :200], x[:, :200])
        for t in range(200, 256):
            cache.append(x[:, t : t + 1], x[:, t : t + 1])
        out.append(kvq.attention(queries, cache))
        out.append(kvq.QuantizedKVCache.quantize(x, x).dequant_k())
        out.append(ggml_dequantize(ggml_quantize(x, "q4_1"), "q4_1", x.shape))
        return out

    serial = [work(i) for i in range(8)]
    barrier = threading.Barrier(4)

    def together(i):
        barrier.wait() if i < 4 else None
        return work(i)

    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            for a, b in zip(serial, pool.map(together, range(8))):
                for x, y in zip(a, b):
                    assert np.array_equal(x, y)
    print("OK", numba.threading_layer())
    """
)


def test_workqueue_layer_is_serialised_and_never_aborts():
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    result = subprocess.run(
        [sys.executable, "-c", WORKQUEUE_PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "OK workqueue"
