"""Sink tokens (``QuantConfig(sink_tokens=S)``): the first S positions kept in float32.

Attention over a cache with sink tokens must equal attention_reference over what the cache
holds (``keys()`` / ``values()``: the exact copies first, the dequantized codes after), to
1e-5 of the largest output, at every path (serial, 1 and 2 threads), for decode and prefill
chunks, GPT-OSS sink logits, left padding, windows and sink counts longer than a chunk. The
quantized chunks must not see the sink tokens: the codes of the other tokens are those of a
cache whose sink positions held the chunk's first later token.
"""

import copy
import pickle
from dataclasses import replace

import numpy as np
import pytest

import kvq
from kvq.synthetic import kv_layer
from kvq.testing import assert_attention_close
from tests import reference

SCHEMES = {
    "q4": kvq.QuantConfig.q4(),
    "q3": kvq.QuantConfig.q3(),  # keys and values rotated
    "q8-norot": kvq.QuantConfig.q8(rotate=False),
    "kivi2-residual": kvq.QuantConfig.kivi(2, residual=40),
    "mlx4": kvq.QuantConfig.mlx(4),  # per-token keys: chunks of one token
}
SCHEMES = {name: replace(config, sink_tokens=0) for name, config in SCHEMES.items()}
KV_HEADS = 2
TOKENS = 203


def with_sinks(name: str, sinks: int) -> kvq.QuantConfig:
    return replace(SCHEMES[name], sink_tokens=sinks)


def layer(tokens: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """kv_layer with a sink-like first token: keys 8x and values 4x the rest (larger keys
    make rotated schemes miss 1e-5 per row with or without sinks: the float32 rotation of
    q and k moves a score of a few hundred by ~1e-5)."""
    k, v = kv_layer(KV_HEADS, tokens, dim, seed=seed)
    k[:, 0] *= 8.0
    v[:, 0] *= 4.0
    return k, v


def filled(config, tokens=TOKENS, dim=64, steps=(1, 2, 60), **kwargs) -> kvq.KVCache:
    """A cache fed in uneven steps (the first few tokens one or two at a time)."""
    cache = kvq.KVCache(KV_HEADS, dim, config, **kwargs)
    k, v = layer(tokens, dim)
    at, i = 0, 0
    while at < tokens:
        step = min(steps[i % len(steps)], tokens - at)
        cache.append(k[:, at : at + step], v[:, at : at + step])
        at, i = at + step, i + 1
    return cache


def queries(heads, t_q, dim, seed=1):
    return np.random.default_rng(seed).standard_normal((heads, t_q, dim)).astype(np.float32)


def assert_matches_reference(out, ref):
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    assert_attention_close(out, ref, rtol=1e-5)


@pytest.mark.parametrize("sinks", [1, 4, 40])
@pytest.mark.parametrize("name", SCHEMES)
def test_decode_and_prefill_against_reference(name, sinks, threads):
    cache = filled(with_sinks(name, sinks))
    k, v = cache.keys(), cache.values()
    for group, t_q in ((3, 1), (8, 1), (4, 37)):
        q = queries(KV_HEADS * group, t_q, 64, seed=group)
        assert_matches_reference(kvq.attention(q, cache), kvq.attention_reference(q, k, v))
    q = queries(KV_HEADS * 4, 5, 64, seed=7)
    logits = np.linspace(-1.0, 3.0, KV_HEADS * 4)
    ref = kvq.attention_reference(q, k, v, sinks=logits, causal=False)
    assert_matches_reference(kvq.attention(q, cache, sinks=logits, causal=False), ref)


@pytest.mark.parametrize("name", ["q4", "mlx4"])
def test_queries_among_the_sink_tokens(name, threads):
    """A prefill whose queries start inside the sink tokens (the first chunk of a prompt)."""
    cache = filled(with_sinks(name, 4), tokens=9, steps=(9,))
    q = queries(KV_HEADS * 3, 9, 64, seed=2)
    ref = kvq.attention_reference(q, cache.keys(), cache.values())
    assert_matches_reference(kvq.attention(q, cache), ref)


@pytest.mark.parametrize("start", [2, 4, 71])
def test_left_padding_start(start, threads):
    """``start`` masks sink tokens too; a query before it gets zeros."""
    cache = filled(with_sinks("q4", 4))
    q = queries(KV_HEADS * 3, 1, 64, seed=2)
    ref = kvq.attention_reference(q, cache.keys()[:, start:], cache.values()[:, start:])
    assert_matches_reference(kvq.attention(q, cache, start=start), ref)
    small = filled(with_sinks("q4", 4), tokens=6, steps=(6,))
    out = kvq.attention(queries(KV_HEADS, 6, 64), small, start=3)
    assert not out[:, :3].any() and out[:, 3:].any()


def test_window_sees_sinks_until_they_leave(threads):
    window = 40
    config = with_sinks("q4", 2)
    cache = filled(config, tokens=60, steps=(20,), window=window, max_queries=20)
    assert cache.stats()["sink_tokens"] == 2  # position 0's chunk is still held
    q = queries(KV_HEADS * 3, 20, 64)
    ref = kvq.attention_reference(q, cache.keys(), cache.values(), window=window)
    assert_matches_reference(kvq.attention(q, cache), ref)
    plain = filled(SCHEMES["q4"], tokens=300, steps=(20,), window=window, max_queries=20)
    cache = filled(config, tokens=300, steps=(20,), window=window, max_queries=20)
    assert cache.stats()["sink_tokens"] == 0 and cache.nbytes == plain.nbytes
    ref = kvq.attention_reference(q, cache.keys(), cache.values(), window=window)
    assert_matches_reference(kvq.attention(q, cache), ref)


@pytest.mark.parametrize("name", SCHEMES)
def test_sink_tokens_read_back_exactly(name):
    cache = filled(with_sinks(name, 4))
    k, v = layer(TOKENS, 64)
    rotated = SCHEMES[name].k.rotate or SCHEMES[name].v.rotate
    tolerance = 1e-6 * np.abs(k[:, :4]).max() if rotated else 0.0  # float32 rotation round trip
    np.testing.assert_allclose(cache.keys(0, 4), k[:, :4], rtol=0, atol=tolerance)
    np.testing.assert_allclose(cache.values(2, 7)[:, :2], v[:, 2:4], rtol=0, atol=tolerance)
    plain = filled(SCHEMES[name])
    assert np.abs(plain.keys(0, 1) - k[:, :1]).max() > 10 * max(tolerance, 1e-6)


@pytest.mark.parametrize("sinks", [1, 3])
@pytest.mark.parametrize("name", SCHEMES)
def test_chunks_do_not_see_the_sink_tokens(name, sinks):
    """The tokens after the sinks quantize as if each sink held its chunk's first later
    token: a sink of any size leaves their codes as they were."""
    k, v = layer(TOKENS, 64)
    config = SCHEMES[name]
    chunks = [kvq.kvcache.chunk_tokens(s, KV_HEADS, 64) for s in (config.k, config.v)]
    exact = kvq.KVCache(KV_HEADS, 64, with_sinks(name, sinks))
    exact.append(k, v)
    standing = kvq.KVCache(KV_HEADS, 64, config)
    standing.append(
        reference.sink_stand_in(k, sinks, chunks[0]), reference.sink_stand_in(v, sinks, chunks[1])
    )
    np.testing.assert_array_equal(exact.keys()[:, sinks:], standing.keys()[:, sinks:])
    np.testing.assert_array_equal(exact.values()[:, sinks:], standing.values()[:, sinks:])


def test_bytes_count_the_copies():
    config = with_sinks("q4", 4)
    for tokens in (2, 4, TOKENS):
        cache = filled(config, tokens=tokens)
        plain = filled(SCHEMES["q4"], tokens=tokens)
        extra = 2 * min(4, tokens) * KV_HEADS * 64 * 4
        assert cache.nbytes == plain.nbytes + extra
        assert cache.stats()["sink_tokens"] == min(4, tokens)
        planned = sum(
            kvq.kvcache.stream_bytes(s, KV_HEADS, 64, tokens, 0, None, sink_tokens=4)
            for s in (config.k, config.v)
        )
        assert planned == cache.nbytes


def test_truncate_into_the_sinks_then_append():
    """Cutting back into the sink tokens and appending again gives the cache that appending
    those tokens directly gives."""
    config = with_sinks("mlx4", 4)  # per-token chunks: any cut is exact
    k, v = layer(20, 64)
    cache = kvq.KVCache(KV_HEADS, 64, config)
    cache.append(k[:, :10], v[:, :10])
    cache.truncate(2)
    assert cache.stats()["sink_tokens"] == 2
    cache.append(k[:, 2:20], v[:, 2:20])
    direct = kvq.KVCache(KV_HEADS, 64, config)
    direct.append(k, v)
    np.testing.assert_array_equal(cache.keys(), direct.keys())
    np.testing.assert_array_equal(cache.values(), direct.values())
    assert cache.nbytes == direct.nbytes


def test_copies_and_pickles_keep_the_sinks():
    cache = filled(with_sinks("q3", 4))
    q = queries(KV_HEADS * 3, 1, 64)
    expected = kvq.attention(q, cache)
    for twin in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        np.testing.assert_array_equal(kvq.attention(q, twin), expected)
        twin.append(*layer(1, 64, seed=5))
        np.testing.assert_array_equal(kvq.attention(q, cache), expected)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [(-1, ValueError, "sink_tokens must be >= 0, got -1"), (1.5, TypeError, "sink_tokens"),
     (True, TypeError, "sink_tokens")],
)  # fmt: skip
def test_bad_sink_tokens(value, error, match):
    with pytest.raises(error, match=match):
        kvq.QuantConfig(sink_tokens=value)


def test_repr_and_defaults():
    """One sink token by default (the presets q8 ... q2 too); the peers' layouts none."""
    assert kvq.QuantConfig().sink_tokens == 1 == kvq.QuantConfig.q2().sink_tokens
    assert kvq.QuantConfig(k=kvq.Scheme(4), v=kvq.Scheme(4)).sink_tokens == 1
    for peer in (kvq.QuantConfig.kivi(), kvq.QuantConfig.mlx(), kvq.QuantConfig.original()):
        assert peer.sink_tokens == 0
    cache = filled(with_sinks("q4", 4), tokens=10)
    assert "sink_tokens 4" in repr(cache)
