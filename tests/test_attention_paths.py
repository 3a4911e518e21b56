"""Every path of the attention kernel against attention_reference (float64 NumPy), to 1e-5.

Schemes: 8/4/3/2 bits, per-token and per-channel keys, float16 and float32 scales, with and
without second-level scales, rotated or not, residual tokens. GQA 1, 3, 4, 7 and 8 (register
tiles of 4 rows plus 1-3 left over), head_dim 64 and 128 (blocks of 128 and 64 tokens),
lengths that are multiples of nothing. Each case runs on the calling thread alone (the
serial path of small calls) and at 1 and 2 Numba threads through the parallel path, so the
token splits, head groups and the merge all run on any machine.
"""

from dataclasses import replace

import numpy as np
import pytest

import kvq
from kvq.kvcache import CacheView
from kvq.synthetic import kv_layer
from kvq.testing import assert_attention_close

attention_module = __import__("sys").modules["kvq.attention"]

SCHEMES = {
    "q8": kvq.QuantConfig.q8(),
    "q4": kvq.QuantConfig.q4(),
    "q3": kvq.QuantConfig.q3(),
    "q2-norot": kvq.QuantConfig.q2(rotate=False),
    "kivi2-residual": kvq.QuantConfig.kivi(2, residual=40),
    "mlx4": kvq.QuantConfig.mlx(4),
    "mlx8-g32": kvq.QuantConfig.mlx(8, 32),
    "original": kvq.QuantConfig.original(),
    # per-token keys with second-level scales, rotated values, float32 residual
    "dq-per-token-k": kvq.QuantConfig(
        k=kvq.Scheme(4, 32, double_quant=True, rotate=True, seed=3),
        v=kvq.Scheme(3, 32, double_quant=True, rotate=True, seed=4),
        residual=7,
    ),
    # groups of 16 (the scalar decoders) and per-channel values
    "g16-per-channel-v": kvq.QuantConfig(
        k=kvq.Scheme(8, 16, scale_dtype="float16"), v=kvq.Scheme(4, 32, axis=-2), residual=3
    ),
    # per-channel values with second-level scales, rotated and searched (whole chunks
    # decoded channel-major, then transposed), beside per-channel keys
    "per-channel-v-dq": kvq.QuantConfig(
        k=kvq.Scheme(3, 32, axis=-2, double_quant=True, search=True, rotate=True, seed=2),
        v=kvq.Scheme(3, 32, axis=-2, double_quant=True, search=True, rotate=True, seed=2),
    ),
    # keys held before RoPE (decoded to scratch, turned back there): per channel, with a
    # float32 residual, and per token
    "q4-pre-rope": kvq.QuantConfig.q4(pre_rope=True),
    "q2-pre-rope-residual": replace(kvq.QuantConfig.q2(pre_rope=True), residual=9),
    "per-token-k-pre-rope": kvq.QuantConfig(
        k=kvq.Scheme(3, 32), v=kvq.Scheme(4, 32, rotate=True), pre_rope=True
    ),
}
KV_HEADS = 2
TOKENS = 203  # two 128-token blocks or four 64-token blocks, each ragged at the end


def assert_matches_reference(out, ref):
    """Every element within 1e-5 of max |ref|, and each row within 1e-5 in relative L2."""
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    assert_attention_close(out, ref, rtol=1e-5)


_caches: dict = {}


def cache_for(name: str, dim: int, tokens: int = TOKENS) -> kvq.KVCache:
    """One cache per (scheme, head_dim, tokens), appended in uneven steps."""
    key = (name, dim, tokens)
    if key not in _caches:
        config = SCHEMES[name]
        cache = kvq.KVCache(KV_HEADS, dim, config, rope=kvq.Rope.from_theta(10000.0, dim))
        k, v = kv_layer(KV_HEADS, tokens, dim, seed=dim)
        at = 0
        for step in (tokens - 60, 1, 1, 1, 57):
            cache.append(k[:, at : at + step], v[:, at : at + step])
            at += step
        assert at == tokens
        _caches[key] = cache
    return _caches[key]


def queries(heads, t_q, dim, seed=1):
    return np.random.default_rng(seed).standard_normal((heads, t_q, dim)).astype(np.float32)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 7, 8])
@pytest.mark.parametrize("name", SCHEMES)
def test_decode_every_scheme_gqa_and_head_dim(name, group, dim, threads):
    cache = cache_for(name, dim)
    q = queries(KV_HEADS * group, 1, dim, seed=group)
    ref = kvq.attention_reference(q, cache.keys(), cache.values())
    assert_matches_reference(kvq.attention(q, cache), ref)


@pytest.mark.parametrize(
    "name",
    [
        "q4",
        "original",
        "kivi2-residual",
        "g16-per-channel-v",
        "per-channel-v-dq",
        "q2-pre-rope-residual",
    ],
)
@pytest.mark.parametrize("group", [3, 8])
def test_prefill_chunk_causal_and_sinks(name, group, threads):
    dim = 64
    cache = cache_for(name, dim)
    heads = KV_HEADS * group
    q = queries(heads, 37, dim, seed=5)
    sinks = np.linspace(-1.0, 2.0, heads)
    out = kvq.attention(q, cache, sinks=sinks)
    ref = kvq.attention_reference(q, cache.keys(), cache.values(), sinks=sinks)
    assert_matches_reference(out, ref)
    out = kvq.attention(q, cache, causal=False)
    ref = kvq.attention_reference(q, cache.keys(), cache.values(), causal=False)
    assert_matches_reference(out, ref)


@pytest.mark.parametrize("name", ["q8", "mlx4", "original", "q4-pre-rope", "per-channel-v-dq"])
def test_left_padding_start(name, threads):
    cache = cache_for(name, 128)
    q = queries(KV_HEADS * 3, 1, 128, seed=2)
    start = 71
    ref = kvq.attention_reference(q, cache.keys()[:, start:], cache.values()[:, start:])
    assert_matches_reference(kvq.attention(q, cache, start=start), ref)


@pytest.mark.parametrize(
    "name", ["q4", "mlx8-g32", "q4-pre-rope", "g16-per-channel-v", "per-channel-v-dq"]
)
def test_windowed_ring(name, threads):
    dim, window = 64, 150
    rope = kvq.Rope.from_theta(10000.0, dim)
    cache = kvq.KVCache(KV_HEADS, dim, SCHEMES[name], window=window, max_queries=9, rope=rope)
    k, v = kv_layer(KV_HEADS, 700, dim, seed=9)
    for at in range(0, 700, 100):
        cache.append(k[:, at : at + 100], v[:, at : at + 100])
    q = queries(KV_HEADS * 7, 9, dim, seed=3)
    out = kvq.attention(q, cache)
    ref = kvq.attention_reference(q, cache.keys(), cache.values(), window=window)
    assert_matches_reference(out, ref)


@pytest.mark.parametrize("t_q", [1, 37])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_per_channel_widths_of_keys_and_values(group, dim, t_q, threads):
    """Keys and values of per-channel widths (each head's channels held widest first): the
    values' chunks decode through the keys' scratch decoder and are transposed."""
    widths = np.random.default_rng(dim).choice([2, 3, 4, 6, 8], size=(KV_HEADS, dim))
    scheme = kvq.Scheme(8, 32, axis=-2, double_quant=True, search=True, channel_bits=widths)
    config = kvq.QuantConfig(k=scheme, v=replace(scheme, channel_bits=widths[:, ::-1].copy()))
    cache = kvq.KVCache(KV_HEADS, dim, config, max_queries=t_q)
    k, v = kv_layer(KV_HEADS, TOKENS, dim, seed=group)
    cache.append(k[:, :150], v[:, :150])
    cache.append(k[:, 150:], v[:, 150:])
    q = queries(KV_HEADS * group, t_q, dim, seed=group)
    ref = kvq.attention_reference(q, cache.keys(), cache.values())
    assert_matches_reference(kvq.attention(q, cache), ref)


def test_query_chunks_bound_scratch(monkeypatch, threads):
    """A prefill longer than one chunk of scratch runs in chunks, each against the reference."""
    cache = cache_for("q8", 64)
    monkeypatch.setattr(attention_module, "SCRATCH_BYTES", 1)  # one query token a call
    q = queries(KV_HEADS * 4, 11, 64, seed=4)
    ref = kvq.attention_reference(q, cache.keys(), cache.values())
    assert_matches_reference(kvq.attention(q, cache), ref)


def test_reading_gives_a_consistent_locked_view():
    cache = cache_for("q4", 64)
    with cache.reading() as view:
        assert isinstance(view, CacheView)
        assert view.appended == len(cache) and view.held == cache.held
        assert view.k.chunks * view.k.chunk + view.k.residual.shape[1] == TOKENS
        assert view.k.per_channel and not view.v.per_channel
        assert view.v.double_quant and view.v.bits == 4
        assert cache._lock._is_owned()
    assert not cache._lock._is_owned()


def test_kernel_view_follows_a_new_store():
    """The cached byte views of the params are rebuilt when the store grows or is copied."""
    import copy

    config = replace(kvq.QuantConfig.original(), residual=0)
    cache = kvq.KVCache(1, 64, config)
    k, v = kv_layer(1, 40, 64, seed=0)
    cache.append(k[:, :10], v[:, :10])
    first = cache._k.kernel_view()
    cache.append(k[:, 10:], v[:, 10:])  # 40 one-token chunks: the 16-slot store grows
    grown = cache._k.kernel_view()
    assert grown.slots > first.slots and grown.p0.base is not first.p0.base
    assert np.shares_memory(grown.p0, cache._k.store["scales"])
    twin = copy.deepcopy(cache)
    assert np.shares_memory(twin._k.kernel_view().p0, twin._k.store["scales"])
    assert not np.shares_memory(twin._k.kernel_view().p0, cache._k.store["scales"])
