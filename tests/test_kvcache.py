"""KVCache, ModelKVCache and plan: streaming appends, windows, memory figures."""

import copy
import gc
import pickle

import numpy as np
import pytest

import kvq
from kvq.kvcache import chunk_tokens
from kvq.synthetic import kv_layer

CONFIGS = {
    "original-8bit": kvq.QuantConfig.original(),
    "default-q8": kvq.QuantConfig(),
    "q4": kvq.QuantConfig.q4(),
    "kivi2-residual": kvq.QuantConfig.kivi(2, residual=16),
    "q3-rotated": kvq.QuantConfig(
        k=kvq.Scheme(3, 32, axis=-2, rotate=True, seed=5), v=kvq.Scheme(3, 64, rotate=True, seed=5)
    ),
    "f16-per-token-residual": kvq.QuantConfig(
        k=kvq.Scheme(4, 32, scale_dtype="float16"), v=kvq.Scheme(8, 32), residual=3
    ),
}


@pytest.fixture(scope="module")
def layer():
    return kv_layer(4, 203, 64, seed=11)


def feed(cache, k, v, steps):
    """Append k, v split at ``steps`` (token counts)."""
    at = 0
    for step in steps:
        cache.append(k[:, at : at + step], v[:, at : at + step])
        at += step
    assert at == k.shape[1]


def same_stored(a: kvq.KVCache, b: kvq.KVCache):
    for stream in ("_k", "_v"):
        sa, sb = getattr(a, stream), getattr(b, stream)
        assert (sa.chunks, sa.first_chunk, sa.appended) == (sb.chunks, sb.first_chunk, sb.appended)
        for key in sa.store:
            for c in range(sa.first_chunk, sa.chunks):
                np.testing.assert_array_equal(
                    sa.store[key][c % sa.slots], sb.store[key][c % sb.slots]
                )
        np.testing.assert_array_equal(sa.pending, sb.pending)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("window", [None, 50])
def test_append_by_one_equals_append_all(layer, name, window):
    k, v = layer
    config = CONFIGS[name]
    whole = kvq.KVCache(4, 64, config, window=window)
    whole.append(k, v)
    one = kvq.KVCache(4, 64, config, window=window)
    feed(one, k, v, [1] * 203)
    mixed = kvq.KVCache(4, 64, config, window=window)
    feed(mixed, k, v, [5, 1, 60, 7, 1, 1, 128])
    for other in (one, mixed):
        same_stored(whole, other)  # identical codes, scales and mins, across flushes and wraps
        np.testing.assert_array_equal(whole.keys(), other.keys())
        np.testing.assert_array_equal(whole.values(), other.values())
        assert whole.nbytes == other.nbytes
        np.testing.assert_array_equal(whole.positions, other.positions)


@pytest.mark.parametrize("name", CONFIGS)
def test_values_are_close_and_ranges_cross_boundaries(layer, name):
    k, v = layer
    cache = kvq.KVCache(4, 64, CONFIGS[name])
    feed(cache, k, v, [100, 3, 100])
    assert len(cache) == cache.held == 203
    full_k, full_v = cache.keys(), cache.values()
    assert full_k.shape == (4, 203, 64) and full_k.dtype == np.float32
    rel = np.linalg.norm(full_v - v) / np.linalg.norm(v)
    assert rel < {8: 0.01, 4: 0.15, 3: 0.3, 2: 0.6}[cache.config.v.bits]
    chunk = cache._k.chunk
    for start, end in [(0, 1), (chunk - 1, chunk + 1), (31, 97), (150, 203), (202, 203), (7, 7)]:
        np.testing.assert_array_equal(cache.keys(start, end), full_k[:, start:end])
        np.testing.assert_array_equal(cache.values(start, end), full_v[:, start:end])


def test_residual_tokens_stay_exact(layer):
    k, v = layer
    config = kvq.QuantConfig.kivi(2, residual=16)
    cache = kvq.KVCache(4, 64, config)
    feed(cache, k, v, [1] * 203)
    stats = cache.stats()
    assert stats["k_chunk_tokens"] == 32 and stats["v_chunk_tokens"] == 1
    # keys: chunks of 32 once 16 + 32 wait; values: one token at a time past the residual 16
    assert stats["k_residual"] == 203 - (203 - 16) // 32 * 32 == 43
    assert stats["v_residual"] == 16
    np.testing.assert_array_equal(cache.keys(203 - 43), k[:, 203 - 43 :])
    np.testing.assert_array_equal(cache.values(187), v[:, 187:])


def test_sliding_window_ring_wraps_many_times():
    k, v = kv_layer(2, 1000, 64, seed=2)
    config = kvq.QuantConfig.q4()
    cache = kvq.KVCache(2, 64, config, window=128)
    reference = kvq.KVCache(2, 64, config)
    for start in range(0, 1000, 7):
        cache.append(k[:, start : start + 7], v[:, start : start + 7])
        reference.append(k[:, start : start + 7], v[:, start : start + 7])
    assert len(cache) == 1000
    assert 128 <= cache.held <= 128 + 32 - 1
    positions = cache.positions
    np.testing.assert_array_equal(positions, np.arange(1000 - cache.held, 1000))
    # the ring holds exactly what an unbounded cache holds for those positions
    np.testing.assert_array_equal(cache.keys(), reference.keys(int(positions[0])))
    np.testing.assert_array_equal(cache.values(), reference.values(int(positions[0])))
    assert cache._k.chunks > 3 * cache._k.slots  # wrapped around many times
    assert cache.nbytes < reference.nbytes / 5


def test_growth_is_geometric_and_capacity_is_fixed(layer):
    k, v = layer
    cache = kvq.KVCache(4, 64)
    slots = []
    for t in range(203):
        cache.append(k[:, t : t + 1], v[:, t : t + 1])
        slots.append(cache._v.slots)
    assert len(set(slots)) <= 6  # 16, 32, 64, 128, 256
    fixed = kvq.KVCache(4, 64, capacity=100)
    fixed.append(k[:, :90], v[:, :90])
    reserved = fixed.stats()["reserved_nbytes"]
    before = fixed.keys()
    with pytest.raises(kvq.CapacityError, match="capacity of 100 tokens"):
        fixed.append(k[:, 90:101], v[:, 90:101])
    assert issubclass(kvq.CapacityError, ValueError)
    assert len(fixed) == 90 and fixed.stats()["reserved_nbytes"] == reserved
    np.testing.assert_array_equal(fixed.keys(), before)
    fixed.append(k[:, 90:100], v[:, 90:100])
    assert len(fixed) == 100


@pytest.mark.parametrize(
    ("k_shape", "dtype", "error", "message"),
    [
        ((3, 1, 64), np.float32, ValueError, r"k must have shape \(4, 't', 64\)"),
        ((4, 1, 32), np.float32, ValueError, "k must have shape"),
        ((4, 0, 64), np.float32, ValueError, "at least one token"),
        ((4, 64), np.float32, ValueError, "k must have shape"),
        ((4, 1, 64), np.int32, TypeError, "k must hold float16, float32 or float64"),
    ],
)
def test_bad_appends_leave_cache_unchanged(layer, k_shape, dtype, error, message):
    k, v = layer
    cache = kvq.KVCache(4, 64, kvq.QuantConfig.q4())
    cache.append(k[:, :40], v[:, :40])
    before = (len(cache), cache.nbytes, cache.keys().copy(), cache.values().copy())
    with pytest.raises(error, match=message):
        cache.append(np.zeros(k_shape, dtype), np.zeros((4, 1, 64), np.float32))
    after = (len(cache), cache.nbytes, cache.keys(), cache.values())
    assert before[:2] == after[:2]
    np.testing.assert_array_equal(before[2], after[2])
    np.testing.assert_array_equal(before[3], after[3])


def test_nonfinite_append_names_position_and_changes_nothing(layer):
    k, v = layer
    cache = kvq.KVCache(4, 64)
    cache.append(k[:, :10], v[:, :10])
    bad = v[:, 10:13].copy()
    bad[2, 1, 5] = np.nan
    with pytest.raises(ValueError, match=r"v has nan at head 2, token 1 \(position 11\)"):
        cache.append(k[:, 10:13], bad)
    assert len(cache) == 10
    with pytest.raises(ValueError, match="same shape"):
        cache.append(k[:, 10:13], v[:, 10:12])
    assert len(cache) == 10 and cache._k.appended == cache._v.appended == 10


def test_constructor_arguments():
    with pytest.raises(ValueError, match="num_kv_heads must be >= 1, got 0"):
        kvq.KVCache(0, 64)
    with pytest.raises(TypeError, match="head_dim must be an integer"):
        kvq.KVCache(8, 64.0)
    with pytest.raises(ValueError, match="capacity or window"):
        kvq.KVCache(8, 64, capacity=10, window=10)
    with pytest.raises(TypeError, match="QuantConfig"):
        kvq.KVCache(8, 64, config=kvq.Scheme())
    with pytest.raises(ValueError, match="axis must be -1"):
        kvq.KVCache(8, 64, kvq.QuantConfig(k=kvq.Scheme(axis=0)))
    with pytest.raises(ValueError, match="power of two"):
        kvq.KVCache(8, 48, kvq.QuantConfig(k=kvq.Scheme(rotate=True)))


def test_range_errors(layer):
    k, v = layer
    cache = kvq.KVCache(4, 64)
    cache.append(k[:, :10], v[:, :10])
    with pytest.raises(IndexError, match="outside the 10 tokens held"):
        cache.keys(5, 11)
    with pytest.raises(TypeError, match="integers"):
        cache.values(0.5)


def test_pool_backed_cache_returns_storage(layer):
    k, v = layer
    k, v = k[:, :100], v[:, :100]
    pool = kvq.MemoryPool(8 << 20)
    cache = kvq.KVCache(4, 64, kvq.QuantConfig.q4(), pool=pool)
    feed(cache, k, v, [1] * 100)  # grows from the pool
    assert pool.stats()["live"] == 10  # 5 parts per stream (codes, sub-codes, super-scales)
    plain = kvq.KVCache(4, 64, kvq.QuantConfig.q4())
    feed(plain, k, v, [100])
    np.testing.assert_array_equal(cache.keys(), plain.keys())
    del cache
    gc.collect()
    assert pool.stats()["live"] == 0


def test_chunk_tokens():
    assert chunk_tokens(kvq.Scheme(8, 32, axis=-1), 8, 64) == 1
    assert chunk_tokens(kvq.Scheme(4, 32, axis=-2), 8, 64) == 32
    assert chunk_tokens(kvq.Scheme(3, 32, axis=-1), 1, 4) == 2  # 12 bits -> 2 tokens = 3 bytes
    assert chunk_tokens(kvq.Scheme(4, 32, axis=-1, double_quant=True), 1, 64) == 4


# --- ModelKVCache and plan ---------------------------------------------------------------


def small_model(**changes):
    fields = dict(
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        hidden_size=512,
        sliding_window=64,
        layer_types=("sliding_attention", "full_attention") * 2,
    )
    return kvq.ModelConfig(**{**fields, **changes})


@pytest.mark.parametrize("config", [None, kvq.QuantConfig.q4(), kvq.QuantConfig.kivi(2)])
@pytest.mark.parametrize("tokens", [1, 63, 64, 65, 200, 517])
@pytest.mark.parametrize("max_queries", [1, 33])
def test_model_cache_nbytes_equals_plan(config, tokens, max_queries):
    model = small_model()
    k, v = kv_layer(2, tokens, 64, seed=tokens)
    cache = kvq.ModelKVCache(model, config or kvq.QuantConfig(), max_queries=max_queries)
    for layer in range(4):
        cache.append(layer, k, v)
    expected = kvq.plan(model, tokens, config or kvq.QuantConfig(), max_queries=max_queries)
    assert cache.nbytes == expected.total_bytes
    assert cache[0].held >= min(tokens, 64 + max_queries - 1)
    np.testing.assert_array_equal(cache[0].positions, np.arange(tokens - cache[0].held, tokens))
    assert cache[0].window == 64 and cache[1].window is None
    assert cache[0].held >= min(tokens, 64) and cache[1].held == tokens
    assert "total" in cache.table() and len(cache.stats()) == 4


def test_plan_gpt_oss_20b_by_hand():
    model = kvq.ModelConfig.gpt_oss_20b()
    for context in (1, 128, 4096, 32768, 131072):
        p = kvq.plan(model, context, "bf16")
        full = 12 * context * 2 * 8 * 64 * 2  # layers x tokens x K,V x heads x dim x bf16
        sliding = 12 * min(context, 128) * 2 * 8 * 64 * 2
        assert p.total_bytes == p.bf16_bytes == full + sliding
        assert p.float32_bytes == 2 * p.bf16_bytes
        assert p.by_type == {"full_attention": full, "sliding_attention": sliding}
    assert kvq.plan(model, 131072, "bf16").total_bytes == 3 * 2**30 + 3 * 2**20  # 3 GiB + 3 MiB
    assert kvq.plan(model, 4096, "bf16").per_token_bytes == 24 * 1024  # 24 KiB per token
    float32 = kvq.plan(model, 4096, "float32")
    assert float32.total_bytes == float32.float32_bytes == 2 * (12 * 4096 + 12 * 128) * 2048


def test_plan_quantized_gpt_oss_by_hand():
    model = kvq.ModelConfig.gpt_oss_20b()
    config = kvq.QuantConfig.kivi(2, residual=128)  # K chunks of 32, V chunks of 1
    context = 4096
    per_token_group = 8 * 64  # heads x dim values per token
    k_chunks = (context - 128) // 32
    k_bytes = k_chunks * (32 * per_token_group * 2 // 8 + 8 * 64 * 2 * 2)
    k_bytes += (context - k_chunks * 32) * per_token_group * 4
    v_chunks = context - 128
    v_bytes = v_chunks * (per_token_group * 2 // 8 + 8 * 2 * 2 * 2) + 128 * per_token_group * 4
    full = 12 * (k_bytes + v_bytes)
    p = kvq.plan(model, context, config)
    assert p.by_type["full_attention"] == full
    # sliding layers hold their window: 128 tokens sit in the residual, nothing quantized
    assert p.by_type["sliding_attention"] == 12 * 2 * 128 * per_token_group * 4


def test_plan_llama_style_config():
    model = kvq.ModelConfig(
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        hidden_size=4096,
    )
    p = kvq.plan(model, 8192, "bf16")
    assert p.total_bytes == 32 * 8192 * 2 * 8 * 128 * 2 == 2**30
    q8 = kvq.plan(model, 8192, kvq.QuantConfig.q8())
    # 8-bit keys at 8.5 bits, values at 8.25 (groups of 64), plus one float32 sink token
    sinks = 32 * 2 * 8 * 128 * 4
    assert q8.total_bytes == pytest.approx(p.total_bytes * 8.375 / 16 + sinks, rel=1e-9)


def test_config_none_means_the_default_everywhere():
    """None is QuantConfig() (= q8) in plan, KVCache and ModelKVCache alike."""
    model = small_model()
    assert kvq.QuantConfig() == kvq.QuantConfig.q8()
    assert kvq.plan(model, 100).total_bytes == kvq.plan(model, 100, kvq.QuantConfig()).total_bytes
    assert kvq.plan(model, 100).config == kvq.QuantConfig.q8()
    assert kvq.KVCache(2, 64).config == kvq.QuantConfig.q8()
    assert kvq.ModelKVCache(model).config == kvq.QuantConfig.q8()
    with pytest.raises(ValueError, match="bf16"):
        kvq.plan(model, 100, "int8")


def test_plan_arguments():
    with pytest.raises(ValueError, match="context_len must be >= 0"):
        kvq.plan(small_model(), -1)
    with pytest.raises(TypeError, match="ModelConfig"):
        kvq.plan({}, 10)


def test_plan_command(capsys):
    from kvq.cli import main

    assert main(["plan", "--context", "4096", "131072", "--bits", "16", "4"]) == 0
    out = capsys.readouterr().out
    assert "12 full, 12 sliding, window 128" in out
    assert "3.00 GiB" in out and "99.00 MiB" in out
    assert main(["plan", "--bits", "5"]) == 2
    assert "bits must be one of" in capsys.readouterr().err


def test_prefill_quantizes_whole_runs_of_chunks_as_one_tensor():
    """A long append quantizes all the chunks it completes in one call; chunk_tokens makes
    each chunk's codes, groups and super-blocks start on their own byte, so the batch's parts
    are the chunks' parts end to end, as one-token appends store them (1 KV head: V chunks
    of 4 tokens, so 8 second-level groups fill a super-block)."""
    k, v = kv_layer(1, 70, 64, seed=3)
    for config in (kvq.QuantConfig.q4(), kvq.QuantConfig.q8(), kvq.QuantConfig.kivi(2)):
        whole = kvq.KVCache(1, 64, config)
        assert whole._k.batchable and whole._v.batchable
        whole.append(k, v)
        one = kvq.KVCache(1, 64, config)
        feed(one, k, v, [1] * 70)
        same_stored(whole, one)


@pytest.mark.parametrize("k_axis, v_axis", [(1, 2), (-2, -1)])
def test_positive_axes_group_as_their_negative_twins(k_axis, v_axis):
    """axis=1/2 name the tokens/head_dim of (heads, tokens, head_dim) chunks, also when a
    prefill quantizes several chunks as one 4-D batch (32 heads: chunk length != heads)."""
    k, v = kv_layer(32, 96, 8, seed=5)
    config = kvq.QuantConfig(k=kvq.Scheme(4, 32, axis=k_axis), v=kvq.Scheme(4, 8, axis=v_axis))
    twin = kvq.QuantConfig(k=kvq.Scheme(4, 32, axis=-2), v=kvq.Scheme(4, 8, axis=-1))
    whole = kvq.KVCache(32, 8, config)
    whole.append(k, v)
    one = kvq.KVCache(32, 8, twin)
    feed(one, k, v, [1] * 96)
    same_stored(whole, one)
    np.testing.assert_array_equal(whole.keys(), one.keys())
    q = np.random.default_rng(0).standard_normal((32, 1, 8)).astype(np.float32)
    kvq.testing.assert_attention_close(
        kvq.attention(q, whole),
        kvq.attention_reference(q, whole.keys(), whole.values()),
        rtol=1e-5,
    )


def test_per_layer_configs_in_model_cache_and_plan():
    model = small_model()

    def choose(layer, kind):
        return kvq.QuantConfig.q4() if kind == "full_attention" else kvq.QuantConfig(residual=3)

    cache = kvq.ModelKVCache(model, choose)
    k, v = kv_layer(2, 90, 64, seed=3)
    for layer in range(4):
        cache.append(layer, k, v)
    assert cache[1].config == kvq.QuantConfig.q4() and cache[0].config.residual == 3
    assert cache.nbytes == kvq.plan(model, 90, choose).total_bytes
    assert "per-layer" in kvq.plan(model, 90, choose).table()
    with pytest.raises(TypeError, match=r"config\(0, 'sliding_attention'\) must return"):
        kvq.ModelKVCache(model, lambda layer, kind: "q4")


# --- a windowed cache serves a prefill chunk (max_queries) -------------------------------------


@pytest.mark.parametrize("name", ["original-8bit", "q4", "kivi2-residual"])
def test_windowed_cache_serves_chunks_of_max_queries(layer, name):
    """Append chunks of 40 tokens to a window-16 cache built with max_queries=40, attending
    each right after its append: every query sees its whole window (checked against the
    float64 reference over an unwindowed twin, which holds the same chunks' codes)."""
    k, v = layer
    config = CONFIGS[name]
    cache = kvq.KVCache(4, 64, config, window=16, max_queries=40)
    twin = kvq.KVCache(4, 64, config)
    q = np.random.default_rng(5).standard_normal((8, 203, 64)).astype(np.float32)
    for lo in range(0, 203, 40):
        hi = min(203, lo + 40)
        cache.append(k[:, lo:hi], v[:, lo:hi])
        twin.append(k[:, lo:hi], v[:, lo:hi])
        out = kvq.attention(q[:, lo:hi], cache)
        ref = kvq.attention_reference(q[:, lo:hi], twin.keys(), twin.values(), window=16)
        assert float(np.abs(out - ref).max() / np.abs(ref).max()) <= 1e-5
        assert cache.held >= min(hi, 16 + 40 - 1)
    assert cache.held < 203  # the ring dropped what no query can see
    expected = sum(
        kvq.kvcache.stream_bytes(s, 4, 64, 203, config.residual, 16, 40)
        for s in (config.k, config.v)
    )
    assert cache.nbytes == expected
    # without max_queries, the chunk's first queries would miss part of their window
    short = kvq.KVCache(4, 64, config, window=16)
    short.append(k[:, :120], v[:, :120])
    with pytest.raises(ValueError, match="max_queries=1"):
        kvq.attention(q[:, 80:120], short)
    with pytest.raises(ValueError, match="max_queries must be >= 1"):
        kvq.KVCache(4, 64, config, window=16, max_queries=0)


# --- truncate (transformers' crop) ---------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_truncate_is_exact_or_refused(layer, name):
    k, v = layer
    config = CONFIGS[name]
    for length in (0, 1, 31, 32, 33, 100, 150):
        cache = kvq.KVCache(4, 64, config)
        cache.append(k[:, :150], v[:, :150])
        fewer = kvq.KVCache(4, 64, config)
        if length:
            fewer.append(k[:, :length], v[:, :length])
        before = (cache.keys(), cache.values(), cache.nbytes)
        try:
            cache.truncate(length)
        except ValueError as error:
            assert "quantized together" in str(error)
            np.testing.assert_array_equal(cache.keys(), before[0])
            assert len(cache) == 150 and cache.nbytes == before[2]
            continue
        same_stored(cache, fewer)
        counts = ("appended", "held", "k_quantized", "v_quantized", "k_residual", "nbytes")
        assert [cache.stats()[c] for c in counts] == [fewer.stats()[c] for c in counts]
        np.testing.assert_array_equal(cache.keys(), before[0][:, :length])
        cache.append(k[:, length:160], v[:, length:160])  # and appends on
        longer = kvq.KVCache(4, 64, config)
        longer.append(k[:, :160], v[:, :160])
        same_stored(cache, longer)
    # per-token schemes without a residual truncate anywhere
    if name == "original-8bit":
        cache = kvq.KVCache(4, 64, config)
        cache.append(k, v)
        cache.truncate(77)
        assert len(cache) == 77


def test_truncate_refuses_what_the_window_dropped(layer):
    k, v = layer
    cache = kvq.KVCache(4, 64, kvq.QuantConfig.original(), window=16, max_queries=4)
    cache.append(k[:, :19], v[:, :19])
    cache.truncate(17)  # nothing dropped yet (19 + 4 - 1 tokens kept)
    assert len(cache) == cache.held == 17
    cache.append(k[:, 17:100], v[:, 17:100])
    # as transformers' sliding layers, a full window cannot roll back: 99 tokens would
    # hold position 80, which the ring already dropped
    with pytest.raises(ValueError, match="window already dropped"):
        cache.truncate(99)
    with pytest.raises(ValueError, match="exceeds the 100 tokens"):
        cache.truncate(101)
    with pytest.raises(ValueError, match="length must be >= 0"):
        cache.truncate(-1)
    assert len(cache) == 100 and int(cache.positions[0]) == 81


# --- copies ------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy])
def test_copies_are_deep(layer, how):
    k, v = layer
    cache = kvq.KVCache(4, 64, kvq.QuantConfig.q4())
    cache.append(k[:, :70], v[:, :70])
    twin = how(cache)
    assert twin._lock is not cache._lock
    assert twin._k.store["codes"] is not cache._k.store["codes"]
    same_stored(twin, cache)
    twin.append(k[:, 70:], v[:, 70:])
    assert len(cache) == 70 and len(twin) == 203
    reference = kvq.KVCache(4, 64, kvq.QuantConfig.q4())
    reference.append(k[:, :70], v[:, :70])
    same_stored(cache, reference)  # the original did not move


def test_pool_backed_copies_take_storage_from_the_pool(layer):
    k, v = layer
    pool = kvq.MemoryPool(1 << 22)
    cache = kvq.KVCache(4, 64, kvq.QuantConfig.q4(), pool=pool, window=32)
    cache.append(k[:, :100], v[:, :100])
    live = pool.stats()["live"]
    twin = copy.copy(cache)
    assert pool.stats()["live"] == 2 * live
    assert twin.pool is pool and twin._k.pool is pool
    same_stored(twin, cache)
    before = cache.keys()
    twin.append(k[:, 100:140], v[:, 100:140])
    np.testing.assert_array_equal(cache.keys(), before)
    assert len(cache) == 100 and len(twin) == 140
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(cache)
    model_copy = copy.deepcopy(kvq.ModelKVCache(small_model(), pool=pool))
    assert model_copy[0].pool is pool
    del twin, model_copy
    gc.collect()
    assert pool.stats()["live"] == live


def test_check_append_raises_what_append_would(layer):
    k, v = layer
    config = kvq.QuantConfig(
        k=kvq.Scheme(8, 32, axis=-2, scale_dtype="float16", rotate=True), v=kvq.Scheme()
    )
    cache = kvq.KVCache(4, 64, config)
    cache.append(k[:, :10], v[:, :10])
    big = k[:, 10:12].copy()
    big[1, 0, :] = 60000.0  # storable as is, beyond +-65504 once rotated
    bad_nan = v[:, 10:12].copy()
    bad_nan[2, 1, 5] = np.nan
    for args in ((big, v[:, 10:12]), (k[:, 10:12], bad_nan), (k[:, 10:12], v[:, 10:13])):
        with pytest.raises(ValueError) as expected:
            cache.append(*args)
        with pytest.raises(ValueError) as checked:
            cache.check_append(*args)
        assert str(checked.value) == str(expected.value)
    assert len(cache) == 10
    cache.check_append(k[:, 10:12], v[:, 10:12])
    assert len(cache) == 10


@pytest.mark.parametrize(("name", "nominal"), [("q8", 8.5), ("q4", 4.5), ("q3", 3.5), ("q2", 2.5)])
def test_presets_stay_within_their_bits_over_a_4k_cache(name, nominal):
    """Issue 15: each preset's measured bits per element (every stored byte: codes, scales,
    second-level scales, float32 residual and sink tokens) over a 4,096-token cache of
    SmolLM2's shape (3 KV heads of 64) are at most the promised bits."""
    config = getattr(kvq.QuantConfig, name)()
    assert config.sink_tokens == 1
    assert config.nominal_bits_per_element == nominal - 0.125  # values in groups of 64
    cache = kvq.KVCache(3, 64, config)
    rng = np.random.default_rng(15)
    for _ in range(4):
        k, v = rng.standard_normal((2, 3, 1024, 64), dtype=np.float32)
        cache.append(k, v)
    assert len(cache) == 4096
    stored = 8 * cache.nbytes / (2 * 4096 * 3 * 64)
    assert cache.bits_per_element == pytest.approx(stored)
    assert stored <= nominal


# --- a decode step's append: one kernel call (kernels.stage_tokens) ---------------------------


def _widths(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice([2, 3, 4, 5, 6, 8], (4, 64))


TOKEN_CONFIGS = CONFIGS | {
    "channel-widths": kvq.QuantConfig(
        k=kvq.Scheme(8, 32, axis=-2, double_quant=True, channel_bits=_widths(1)),
        v=kvq.Scheme(8, 32, axis=-2, double_quant=True, channel_bits=_widths(2)),
        sink_tokens=2,
    ),
}


@pytest.fixture
def staged_tokens(monkeypatch):
    """Counts the calls of kernels.stage_tokens (the decode step's path)."""
    calls = []
    stage = kvq.kernels.stage_tokens

    def spy(*args):
        calls.append(args[-2:])
        return stage(*args)

    monkeypatch.setattr(kvq.kernels, "stage_tokens", spy)
    return calls


def tokens(x: np.ndarray) -> list[np.ndarray]:
    """x (heads, t, head_dim) as t C-contiguous (heads, 1, head_dim) arrays, as a model's."""
    return [np.ascontiguousarray(x[:, t : t + 1]) for t in range(x.shape[1])]


@pytest.mark.parametrize("name", TOKEN_CONFIGS)
@pytest.mark.parametrize("window", [None, 50])
def test_decode_steps_store_what_one_append_stores(layer, name, window, staged_tokens):
    k, v = layer
    config = TOKEN_CONFIGS[name]
    whole = kvq.KVCache(4, 64, config, window=window)
    whole.append(k, v)
    steps = kvq.KVCache(4, 64, config, window=window)
    for k_token, v_token in zip(tokens(k), tokens(v), strict=True):
        steps.append(k_token, v_token)
    assert len(staged_tokens) == 203 - config.sink_tokens  # every token but the sinks
    same_stored(whole, steps)  # identical codes, scales, mins and residual
    np.testing.assert_array_equal(whole.keys(), steps.keys())
    np.testing.assert_array_equal(whole.values(), steps.values())
    assert whole.nbytes == steps.nbytes and len(whole) == len(steps) == 203
    q = np.random.default_rng(3).standard_normal((8, 1, 64)).astype(np.float32)
    np.testing.assert_array_equal(kvq.attention(q, whole), kvq.attention(q, steps))


@pytest.mark.parametrize(
    ("stream", "value", "message"),
    [
        ("k", np.nan, r"k has nan at head 2, token 0 \(position 40\), channel 5"),
        ("v", np.inf, r"v has inf at head 2, token 0 \(position 40\), channel 5"),
        ("k", 60000.0, r"k at head 1, token 0 \(position 40\) reaches .* after rotation"),
        ("v", -70000.0, r"v has -70000.0 at head 2, token 0 \(position 40\), channel 5"),
    ],
)
def test_a_bad_decode_step_names_it_and_changes_nothing(
    layer, stream, value, message, staged_tokens
):
    k, v = layer
    config = kvq.QuantConfig(
        k=kvq.Scheme(8, 32, axis=-2, scale_dtype="float16", rotate=True),
        v=kvq.Scheme(8, 32, axis=-2, scale_dtype="float16"),
        residual=8,
    )
    cache = kvq.KVCache(4, 64, config)
    for k_token, v_token in zip(tokens(k[:, :40]), tokens(v[:, :40]), strict=True):
        cache.append(k_token, v_token)
    before = (cache.keys(), cache.values(), cache.nbytes)
    k_token, v_token = tokens(k[:, 40:41])[0], tokens(v[:, 40:41])[0]
    bad = k_token if stream == "k" else v_token
    if value == 60000.0:
        bad[1, 0, :] = value  # storable as is (float16 scales), not once rotated
    else:
        bad[2, 0, 5] = value
    staged_tokens.clear()
    with pytest.raises(ValueError, match=message):
        cache.append(k_token, v_token)
    assert staged_tokens == [(8, 8)]  # the kernel saw it first (slot 8: 40 - one chunk)
    assert len(cache) == 40 and cache._k.appended == cache._v.appended == 40
    np.testing.assert_array_equal(cache.keys(), before[0])
    np.testing.assert_array_equal(cache.values(), before[1])
    assert cache.nbytes == before[2]
    # and the next good steps land where that one would have
    reference = kvq.KVCache(4, 64, config)
    reference.append(k[:, :60], v[:, :60])
    for k_token, v_token in zip(tokens(k[:, 40:60]), tokens(v[:, 40:60]), strict=True):
        cache.append(k_token, v_token)
    same_stored(reference, cache)


def test_decode_steps_copy_their_input_and_copies_stay_apart(layer, staged_tokens):
    k, v = layer
    config = kvq.QuantConfig.q4()
    cache = kvq.KVCache(4, 64, config)
    for k_token, v_token in zip(tokens(k[:, :45]), tokens(v[:, :45]), strict=True):
        cache.append(k_token, v_token)
        k_token[:] = 1e3  # the caller's arrays are not the cache's
        v_token[:] = 1e3
    assert staged_tokens and cache._k.pending is cache._k.buffered
    reference = kvq.KVCache(4, 64, config)
    reference.append(k[:, :45], v[:, :45])
    same_stored(reference, cache)
    twins = [copy.copy(cache), copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))]
    for twin in twins:
        assert twin._k.buffer is not cache._k.buffer
        for k_token, v_token in zip(tokens(k[:, 45:50]), tokens(v[:, 45:50]), strict=True):
            twin.append(k_token, v_token)
    same_stored(reference, cache)  # the original did not move
    reference.append(k[:, 45:50], v[:, 45:50])
    for twin in twins:
        same_stored(reference, twin)


def test_decode_steps_stop_at_capacity(layer, staged_tokens):
    k, v = layer
    cache = kvq.KVCache(4, 64, kvq.QuantConfig.q4(), capacity=10)
    for k_token, v_token in zip(tokens(k[:, :10]), tokens(v[:, :10]), strict=True):
        cache.append(k_token, v_token)
    assert len(staged_tokens) == 9  # the first is a sink token
    with pytest.raises(kvq.CapacityError, match="capacity of 10 tokens"):
        cache.append(*tokens(k[:, 10:11]), *tokens(v[:, 10:11]))
    assert len(cache) == 10
