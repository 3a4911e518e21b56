"""Keys held before RoPE (QuantConfig(pre_rope=True)): kvq.Rope against a complex-number
reference, what the cache stores and reads back, and the errors. The attention kernel's
pre-RoPE paths are in test_attention_paths.py (SCHEMES "*-pre-rope*")."""

import copy
import dataclasses
import pickle

import numpy as np
import pytest

import kvq
from tests.reference import rope_reference

DIM = 64
THETA = 10000.0


def rope_keys(rng, heads=2, tokens=150, dim=DIM, first=0):
    """Keys as a RoPE model makes them: a per-channel offset (outliers included) plus noise,
    turned by RoPE at positions first ..; (post-RoPE float32, the offsets' pre-RoPE)."""
    offset = 3.0 * rng.standard_normal((heads, 1, dim)) * (rng.random((heads, 1, dim)) < 0.2)
    raw = offset + 0.5 * rng.standard_normal((heads, tokens, dim))
    freqs = kvq.Rope.from_theta(THETA, dim).inverse_frequencies
    return rope_reference(raw, first, freqs).astype(np.float32), raw


def test_from_theta_frequencies():
    rope = kvq.Rope.from_theta(THETA, DIM)
    assert rope.head_dim == DIM
    assert rope.inverse_frequencies[0] == 1.0
    np.testing.assert_allclose(rope.inverse_frequencies[1], THETA ** (-2 / DIM), rtol=1e-15)
    np.testing.assert_allclose(rope.inverse_frequencies[-1], THETA ** (-(DIM - 2) / DIM))


@pytest.mark.parametrize("first", [0, 5, 3000])
def test_rotate_matches_the_complex_reference(rng, first):
    rope = kvq.Rope.from_theta(500000.0, 128)
    x = rng.standard_normal((3, 41, 128)).astype(np.float32)
    for inverse in (False, True):
        ref = rope_reference(x, first, rope.inverse_frequencies, inverse=inverse)
        np.testing.assert_allclose(rope.rotate(x, first, inverse=inverse), ref, atol=2e-5)
    back = rope.rotate(rope.rotate(x, first), first, inverse=True)
    np.testing.assert_allclose(back, x, atol=2e-6)


def test_tables_grow_and_cover_the_positions():
    rope = kvq.Rope.from_theta(THETA, DIM)
    cos, sin = rope.tables(10)
    assert cos.shape == sin.shape == (DIM // 2, 1024) and cos.dtype == np.float32
    cos, sin = rope.tables(5000)
    assert cos.shape[1] >= 5000
    angle = 4321 * rope.inverse_frequencies[7]
    assert cos[7, 4321] == np.float32(np.cos(angle)) and sin[7, 4321] == np.float32(np.sin(angle))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_the_cache_stores_the_keys_before_rope(rng, bits):
    """A pre_rope cache holds what a plain cache of the same key scheme holds after being
    given the keys un-rotated (by Rope.rotate, checked against the reference above), and
    reads them back turned by RoPE (checked against the complex-number reference)."""
    rope = kvq.Rope.from_theta(THETA, DIM)
    k, _ = rope_keys(rng)
    v = rng.standard_normal(k.shape).astype(np.float32)
    config = {8: kvq.QuantConfig.q8, 4: kvq.QuantConfig.q4, 2: kvq.QuantConfig.q2}[bits]
    pre = kvq.KVCache(2, DIM, config(pre_rope=True), rope=rope)
    plain_config = dataclasses.replace(config(pre_rope=True), pre_rope=False)
    plain = kvq.KVCache(2, DIM, plain_config, rope=rope)  # rope unused there
    unrotated = rope.rotate(k, 0, inverse=True)
    for lo, hi in ((0, 1), (1, 70), (70, 71), (71, 150)):
        pre.append(k[:, lo:hi], v[:, lo:hi])
        plain.append(unrotated[:, lo:hi], v[:, lo:hi])
    for key, array in plain._k.store.items():  # the same codes and params, exactly
        np.testing.assert_array_equal(
            pre._k.store[key][: plain._k.chunks], array[: plain._k.chunks]
        )
    np.testing.assert_array_equal(pre._k.pending, plain._k.pending)
    np.testing.assert_array_equal(pre._k.sinks, plain._k.sinks)
    # read back with RoPE applied
    expected = rope_reference(plain.keys(), 0, rope.inverse_frequencies)
    np.testing.assert_allclose(pre.keys(), expected, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(
        pre.keys(40, 90), expected[:, 40:90], atol=1e-5 * np.abs(expected).max()
    )
    # and the keys as given, to the plain cache's error (a pair's turn keeps its error's
    # norm, so a channel's error is at most sqrt(2) times the largest)
    step = np.abs(plain.keys() - unrotated).max()
    assert np.abs(pre.keys() - k).max() <= np.sqrt(2) * step + 1e-5
    np.testing.assert_array_equal(pre.values(), plain.values())
    assert pre.nbytes == plain.nbytes


def test_pre_rope_fits_rope_keys_better(rng):
    """The point of it: per-channel groups fit a channel's offset, which RoPE spins."""
    rope = kvq.Rope.from_theta(THETA, DIM)
    k, _ = rope_keys(rng, tokens=256)
    v = np.zeros_like(k)
    errors = {}
    for pre_rope in (False, True):
        cache = kvq.KVCache(2, DIM, kvq.QuantConfig.q3(rotate=False, pre_rope=pre_rope), rope=rope)
        cache.append(k, v)
        errors[pre_rope] = float(np.sqrt(np.mean((cache.keys() - k) ** 2)))
    assert errors[True] < 0.85 * errors[False]  # 0.75 measured


def test_sink_tokens_and_a_window(rng):
    rope = kvq.Rope.from_theta(THETA, DIM)
    k, _ = rope_keys(rng, tokens=400)
    v = rng.standard_normal(k.shape).astype(np.float32)
    cache = kvq.KVCache(2, DIM, kvq.QuantConfig.q4(pre_rope=True), rope=rope)
    cache.append(k[:, :1], v[:, :1])
    cache.append(k[:, 1:], v[:, 1:])
    np.testing.assert_allclose(cache.keys(0, 1), k[:, :1], atol=2e-6)  # the exact sink
    with cache.reading() as view:
        np.testing.assert_allclose(view.k_sinks, k[:, :1], atol=2e-6)  # as queries meet it
    ring = kvq.KVCache(2, DIM, kvq.QuantConfig.q8(pre_rope=True), window=100, rope=rope)
    for at in range(0, 400, 50):
        ring.append(k[:, at : at + 50], v[:, at : at + 50])
    held = ring.positions
    assert held[0] > 0
    np.testing.assert_allclose(ring.keys(), k[:, held], atol=0.05 * np.abs(k).max())


def test_copies_and_pickles_keep_the_rope(rng):
    rope = kvq.Rope.from_theta(THETA, DIM)
    k, _ = rope_keys(rng, tokens=70)
    cache = kvq.KVCache(2, DIM, kvq.QuantConfig.q4(pre_rope=True), rope=rope)
    cache.append(k, k)
    for twin in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert twin.rope == rope
        np.testing.assert_array_equal(twin.keys(), cache.keys())
        q = rng.standard_normal((4, 1, DIM)).astype(np.float32)
        np.testing.assert_array_equal(kvq.attention(q, twin), kvq.attention(q, cache))


def test_model_cache_finds_plain_rope():
    model = kvq.ModelConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=256,
        head_dim=DIM, rope_theta=THETA,
    )  # fmt: skip
    cache = kvq.ModelKVCache(model, kvq.QuantConfig.q4(pre_rope=True))
    assert cache[0].rope == kvq.Rope.from_theta(THETA, DIM)


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"rope=kvq\.Rope"):
        kvq.KVCache(2, DIM, kvq.QuantConfig.q4(pre_rope=True))
    with pytest.raises(ValueError, match="rotate=False"):
        kvq.QuantConfig(k=kvq.Scheme(4, 32, axis=-2, rotate=True), pre_rope=True)
    with pytest.raises(TypeError, match="pre_rope must be a bool"):
        kvq.QuantConfig(pre_rope=1)
    with pytest.raises(ValueError, match="rope has head_dim 128, the cache 64"):
        kvq.KVCache(2, DIM, kvq.QuantConfig.q4(pre_rope=True), rope=kvq.Rope.from_theta(1e4, 128))
    with pytest.raises(TypeError, match=r"rope must be a kvq\.Rope"):
        kvq.KVCache(2, DIM, rope=np.ones(32))
    with pytest.raises(ValueError, match="even head_dim"):
        kvq.Rope.from_theta(THETA, 63)
    with pytest.raises(ValueError, match="theta must be a positive"):
        kvq.Rope.from_theta(-1.0, 64)
    with pytest.raises(ValueError, match="1-D"):
        kvq.Rope(np.ones((2, 2)))
    with pytest.raises(ValueError, match="finite"):
        kvq.Rope([1.0, np.nan])
    rope = kvq.Rope.from_theta(THETA, DIM)
    with pytest.raises(ValueError, match="x has head_dim 32"):
        rope.rotate(np.zeros((1, 2, 32), np.float32), 0)


def test_bad_keys_leave_the_cache_as_it_was(rng):
    rope = kvq.Rope.from_theta(THETA, DIM)
    k, _ = rope_keys(rng, tokens=40)
    cache = kvq.KVCache(2, DIM, kvq.QuantConfig.q4(pre_rope=True), rope=rope)
    cache.append(k[:, :20], k[:, :20])
    before = cache.keys()
    bad = k[:, 20:].copy()
    bad[1, 3, 5] = np.nan
    with pytest.raises(ValueError, match="head 1, token 3"):
        cache.append(bad, k[:, 20:])
    assert len(cache) == 20
    np.testing.assert_array_equal(cache.keys(), before)
