"""One policy for NaN and Inf at every public entry point: ValueError naming the argument and
the element's N-d position, and nothing changed (caches, pools, the caller's arrays).
Numeric arguments that must be integers refuse NaN and Inf with TypeError naming them."""

import re

import numpy as np
import pytest

import kvq
from kvq.synthetic import kv_layer

BAD = [np.nan, np.inf, -np.inf]
SCHEMES = {
    "default": kvq.Scheme(),
    "per-channel": kvq.Scheme(4, 32, axis=-2),
    "double-quant": kvq.Scheme(4, 32, double_quant=True),
    "search": kvq.Scheme(3, 32, search=True),
    "rotated": kvq.Scheme(8, 32, rotate=True, seed=3),
    "float16-scales": kvq.Scheme(2, 16, scale_dtype="float16"),
}


def text(value: float) -> str:
    return re.escape(repr(float(value)))


def without_peak(stats: dict) -> dict:
    return {key: value for key, value in stats.items() if key != "peak"}


def poisoned(shape, at, value, dtype=np.float32, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    x[at] = value
    return x


# --- kvq.quantize, Scheme.quantize, QuantizedKVCache.quantize, QuantizedBlocks.quantize ------


QUANTIZE_CASES = [
    pytest.param(
        name,
        value,
    )
    for name in SCHEMES
    for value in BAD
]


@pytest.mark.parametrize(("name", "value"), QUANTIZE_CASES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_quantize_names_the_element(name, value, dtype):
    x = poisoned((2, 64, 64), (1, 2, 5), value, dtype)
    before = x.copy()
    flat = 1 * 64 * 64 + 2 * 64 + 5
    message = rf"x has {text(value)} at flat index {flat} \(position \(1, 2, 5\)\)"
    with pytest.raises(ValueError, match=message):
        kvq.quantize(x, scheme=SCHEMES[name])
    with pytest.raises(ValueError, match=message):
        SCHEMES[name].quantize(x)
    np.testing.assert_array_equal(x, before)  # the caller's array is untouched


@pytest.mark.parametrize(
    "name",
    [pytest.param(name) for name in SCHEMES],
)
def test_quantize_float64_beyond_float32(name):
    x = poisoned((3, 64), (2, 7), 1e300, np.float64)
    with pytest.raises(ValueError, match=r"x has 1e\+300 at flat index 135 \(position \(2, 7\)\)"):
        kvq.quantize(x, scheme=SCHEMES[name])


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("bad", ["k", "v"])
def test_blockwise_cache_names_the_tensor_and_leaves_the_pool(value, bad):
    pool = kvq.MemoryPool(1 << 20)
    empty = without_peak(pool.stats())
    k = poisoned((2, 3, 64), (0, 1, 9), value if bad == "k" else 0.5)
    v = poisoned((2, 3, 64), (0, 1, 9), value if bad == "v" else 0.5)
    message = rf"{bad} has {text(value)} at flat index 73 \(position \(0, 1, 9\)\)"
    with pytest.raises(ValueError, match=message):
        kvq.QuantizedKVCache.quantize(k, v, block_size=32, pool=pool)
    assert without_peak(pool.stats()) == empty  # peak remembers the attempt, nothing else
    with pytest.raises(ValueError, match=message.replace(bad, "keys", 1)):
        kvq.QuantizedBlocks.quantize(k if bad == "k" else v, name="keys", pool=pool)
    assert without_peak(pool.stats()) == empty


# --- KVCache.append and ModelKVCache.append ---------------------------------------------------

CACHES = {
    "default": (kvq.QuantConfig.original(), None),
    "q4-rotated-per-channel": (kvq.QuantConfig.q4(), None),
    "kivi-residual": (
        kvq.QuantConfig.kivi(2, residual=16),
        None,
    ),  # the bad token waits in float32
    "window": (kvq.QuantConfig.q8(), 32),
}


def snapshot(cache: kvq.KVCache):
    """Everything a cache stores, copied: counts, every store array whole, the residuals."""
    streams = []
    for s in (cache._k, cache._v):
        store = {key: array.copy() for key, array in s.store.items()}
        streams.append((s.appended, s.chunks, s.first_chunk, s.slots, store, s.pending.copy()))
    return len(cache), cache.held, cache.stats(), streams


def assert_unchanged(before, after):
    assert before[:3] == after[:3]
    for (*counts_a, store_a, pending_a), (*counts_b, store_b, pending_b) in zip(
        before[3], after[3], strict=True
    ):
        assert counts_a == counts_b
        assert store_a.keys() == store_b.keys()
        for key in store_a:
            np.testing.assert_array_equal(store_a[key], store_b[key])
        np.testing.assert_array_equal(pending_a, pending_b)


@pytest.mark.parametrize("name", CACHES)
@pytest.mark.parametrize("value", [*BAD, 1e300])
@pytest.mark.parametrize("bad", ["k", "v"])
def test_append_names_head_token_position_channel_and_changes_nothing(name, value, bad):
    config, window = CACHES[name]
    pool = kvq.MemoryPool(4 << 20)
    cache = kvq.KVCache(4, 64, config, window=window, pool=pool)
    k, v = kv_layer(4, 47, 64, seed=2)
    cache.append(k[:, :40], v[:, :40])
    before, pool_before = snapshot(cache), pool.stats()
    new_k, new_v = k[:, 40:43].astype(np.float64), v[:, 40:43].astype(np.float64)
    (new_k if bad == "k" else new_v)[1, 2, 5] = value
    caller = (new_k.copy(), new_v.copy())
    what = "beyond the float32 range" if np.isfinite(value) else "non-finite"
    message = rf"{bad} has {text(value)} at head 1, token 2 \(position 42\), channel 5 \({what}"
    with pytest.raises(ValueError, match=message):
        cache.append(new_k, new_v)
    assert_unchanged(before, snapshot(cache))
    assert pool.stats() == pool_before
    np.testing.assert_array_equal(new_k, caller[0])
    np.testing.assert_array_equal(new_v, caller[1])
    # the cache goes on exactly as if the bad append had never been tried
    cache.append(k[:, 40:], v[:, 40:])
    clean = kvq.KVCache(4, 64, config, window=window)
    clean.append(k[:, :40], v[:, :40])
    clean.append(k[:, 40:], v[:, 40:])
    np.testing.assert_array_equal(cache.keys(), clean.keys())
    np.testing.assert_array_equal(cache.values(), clean.values())


UNSTORABLE = {  # config, which tensor, the value, what the message says
    "float16-scales-in-residual": (kvq.QuantConfig.kivi(4, 8, residual=2), "k", 1e5, "65504"),
    "double-quant": (kvq.QuantConfig.q8(rotate=False), "v", 3e6, r"2\.09613e\+06"),
    "float32-group-range": (kvq.QuantConfig.original(), "v", 1e38, r"8\.50706e\+37"),
}


@pytest.mark.parametrize("name", UNSTORABLE)
def test_values_a_scheme_cannot_store_are_refused_on_arrival(name):
    """A token that would wait in the residual (or an unfilled chunk) and break the append
    that finally quantizes it is refused by its own append; later appends still work."""
    config, bad, value, limit = UNSTORABLE[name]
    cache = kvq.KVCache(2, 64, config)
    k, v = kv_layer(2, 80, 64, seed=8)
    cache.append(k[:, :40], v[:, :40])
    before = snapshot(cache)
    new = {"k": k[:, 40:41].copy(), "v": v[:, 40:41].copy()}
    new[bad][1, 0, 9] = value
    message = (
        rf"{bad} has {text(np.float32(value))} at head 1, token 0 \(position 40\), channel 9, "
    )
    with pytest.raises(ValueError, match=message + rf"beyond \+-{limit}"):
        cache.append(new["k"], new["v"])
    assert_unchanged(before, snapshot(cache))
    for t in range(40, 80):  # the cache is not stuck: every later append goes through
        cache.append(k[:, t : t + 1], v[:, t : t + 1])
    assert len(cache) == 80


def test_rotated_values_are_checked_after_the_rotation():
    cache = kvq.KVCache(2, 64, kvq.QuantConfig.q4())  # keys rotated, double_quant
    k, v = kv_layer(2, 64, 64, seed=9)
    cache.append(k[:, :40], v[:, :40])
    before = snapshot(cache)
    big = np.full((2, 1, 64), 2e6, np.float32)  # within the limit, but rotates to 1.6e7
    with pytest.raises(ValueError, match=r"k at head 0, token 0 \(position 40\) reaches .* after"):
        cache.append(big, v[:, 40:41])
    assert_unchanged(before, snapshot(cache))
    cache.append(big / 16, v[:, 40:41])  # 1e6 after rotation: stored
    cache.append(k[:, 41:], v[:, 41:])  # completes the chunk holding it, which quantizes
    assert len(cache) == 64 and cache.stats()["k_quantized"] == 64


def test_model_cache_append_names_the_layer_and_changes_nothing():
    model = kvq.ModelConfig(
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        hidden_size=512,
        sliding_window=16,
        layer_types=("sliding_attention", "full_attention"),
    )
    cache = kvq.ModelKVCache(model, kvq.QuantConfig.q4())
    k, v = kv_layer(2, 30, 64, seed=4)
    for layer in range(2):
        cache.append(layer, k[:, :20], v[:, :20])
    before = [snapshot(cache[layer]) for layer in range(2)]
    bad_v = v[:, 20:25].copy()
    bad_v[0, 3, 63] = np.inf
    for layer in range(2):
        with pytest.raises(
            ValueError,
            match=rf"^layer {layer}: v has inf at head 0, token 3 \(position 23\), channel 63",
        ):
            cache.append(layer, k[:, 20:25], bad_v)
    for layer in range(2):
        assert_unchanged(before[layer], snapshot(cache[layer]))


# --- kvq.attention and kvq.attention_reference ------------------------------------------------


@pytest.fixture(scope="module")
def filled():
    cache = kvq.KVCache(2, 64, kvq.QuantConfig.q8())  # rotated keys: q is rotated first
    k, v = kv_layer(2, 50, 64, seed=6)
    cache.append(k, v)
    return cache


@pytest.mark.parametrize("value", [*BAD, 1e300])
def test_attention_queries(filled, value):
    before = snapshot(filled)
    q = poisoned((4, 2, 64), (3, 1, 7), value, np.float64)
    what = "beyond the float32 range" if np.isfinite(value) else "non-finite"
    with pytest.raises(
        ValueError, match=rf"q has {text(value)} at head 3, token 1, channel 7 \({what}\)"
    ):
        kvq.attention(q, filled)
    assert_unchanged(before, snapshot(filled))


def test_attention_scaled_queries_overflowing(filled):
    q = np.full((4, 1, 64), 1e30, np.float32)
    q[0, 0] = 0.0
    with pytest.raises(ValueError, match=r"q \* scale overflows float32 at head 1, token 0"):
        kvq.attention(q, filled, scale=1e10)


@pytest.mark.parametrize("value", BAD)
def test_attention_sinks_and_scale(filled, value):
    q = np.ones((4, 1, 64), np.float32)
    sinks = np.zeros(4)
    sinks[2] = value
    with pytest.raises(ValueError, match=rf"sinks has {text(value)} at flat index 2; sinks must"):
        kvq.attention(q, filled, sinks=sinks)
    with pytest.raises(ValueError, match=rf"scale must be finite, got {text(value)}"):
        kvq.attention(q, filled, scale=value)
    with pytest.raises(ValueError, match=rf"scale must be finite, got {text(value)}"):
        kvq.attention(q, filled, scale=np.float32(value))


@pytest.mark.parametrize("scale", ["0.5", [0.5], True, 1j])
def test_attention_scale_must_be_a_real_number(filled, scale):
    with pytest.raises(TypeError, match="scale must be a real number"):
        kvq.attention(np.ones((4, 1, 64), np.float32), filled, scale=scale)


def test_attention_accepts_finite_extremes(filled):
    """Large finite inputs whose scaled queries fit in float32 are fine, and match the
    reference (no false alarms from the checks)."""
    q = np.random.default_rng(1).standard_normal((4, 1, 64)) * 1e3
    sinks = np.array([-1e30, 0.0, 50.0, 1e-30])
    out = kvq.attention(q, filled, sinks=sinks, scale=1e-3)
    ref = kvq.attention_reference(q, filled.keys(), filled.values(), sinks=sinks, scale=1e-3)
    assert float(np.abs(out - ref).max() / np.abs(ref).max()) <= 1e-5


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("bad", ["q", "k", "v"])
def test_reference_inputs(bad, value):
    arrays = {
        "q": np.ones((4, 1, 8)),
        "k": np.ones((2, 5, 8)),
        "v": np.ones((2, 5, 8)),
    }
    arrays[bad][1, 0, 3] = value
    flat = {"q": 11, "k": 43, "v": 43}[bad]
    message = rf"{bad} has {text(value)} at flat index {flat} \(position \(1, 0, 3\)\); {bad} must"
    with pytest.raises(ValueError, match=message):
        kvq.attention_reference(arrays["q"], arrays["k"], arrays["v"])


@pytest.mark.parametrize("value", BAD)
def test_reference_sinks_scale_window(value):
    q, k = np.ones((4, 1, 8)), np.ones((2, 5, 8))
    with pytest.raises(ValueError, match=rf"sinks has {text(value)} at flat index 1"):
        kvq.attention_reference(q, k, k, sinks=[0.0, value, 0.0, 0.0])
    with pytest.raises(ValueError, match="scale must be finite"):
        kvq.attention_reference(q, k, k, scale=value)
    with pytest.raises(TypeError, match="window must be an integer"):
        kvq.attention_reference(q, k, k, window=value)


def test_reference_shapes():
    q, k = np.ones((4, 1, 8)), np.ones((2, 5, 8))
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        kvq.attention_reference(q, k, k[:, :4])
    with pytest.raises(ValueError, match="q has head_dim 8, k and v 4"):
        kvq.attention_reference(q, k[..., :4], k[..., :4])
    with pytest.raises(ValueError, match="not a positive multiple of k's 3 heads"):
        kvq.attention_reference(q, np.ones((3, 5, 8)), np.ones((3, 5, 8)))
    with pytest.raises(ValueError, match="needs 1 to 5"):
        kvq.attention_reference(np.ones((4, 6, 8)), k, k)
    with pytest.raises(TypeError, match="q must hold real numbers"):
        kvq.attention_reference(q.astype(complex), k, k)


# --- numeric arguments that must be integers --------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_integer_arguments_refuse_nan_and_inf(value):
    x = np.ones((2, 64), np.float32)
    calls = {
        "num_kv_heads": lambda: kvq.KVCache(value, 64),
        "head_dim": lambda: kvq.KVCache(2, value),
        "capacity": lambda: kvq.KVCache(2, 64, capacity=value),
        "window": lambda: kvq.KVCache(2, 64, window=value),
        "nbytes": lambda: kvq.MemoryPool(value),
        "bits": lambda: kvq.Scheme(bits=value),
        "group_size": lambda: kvq.quantize(x, group_size=value),
        "rotate": lambda: kvq.Scheme(rotate=value),
        "seed": lambda: kvq.Scheme(rotate=True, seed=value),
        "residual": lambda: kvq.QuantConfig(residual=value),
        "block_size": lambda: kvq.QuantizedKVCache.quantize(x, x, block_size=value),
        "start and end": lambda: kvq.QuantizedKVCache.quantize(x, x).dequant_k(value),
        "shape": lambda: kvq.MemoryPool(1024).acquire((value,), np.uint8),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=re.escape(name)):
            call()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_plan_context_len_refuses_nan_and_inf(value):
    with pytest.raises(TypeError, match="context_len must be an integer"):
        kvq.plan(kvq.ModelConfig.gpt_oss_20b(), value)


def test_hand_built_blocks_refuse_nonfinite_scales():
    with pytest.raises(ValueError, match="scales"):
        kvq.QuantizedBlocks(
            np.zeros(64, np.uint8),
            np.array([1.0, np.nan], np.float32),
            np.zeros(2, np.float32),
            (64,),
            32,
        )
