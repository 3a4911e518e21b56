"""bench/long_run.py at CI size: memory stays flat over many single-token appends to a windowed
KVCache, the held codes stay exactly right, and MemoryPool churn returns the pool to empty."""

import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import long_run

import kvq
from kvq.testing import assert_dequantized_close

MIB = 2**20


def test_rss_reading_follows_memory_touched():
    # fresh anonymous pages (np.ones may reuse memory the allocator already holds resident)
    region = mmap.mmap(-1, 64 * MIB)
    before = long_run.rss_bytes()
    block = np.frombuffer(region, np.uint8)
    block[:] = 1  # touched, so resident
    during = long_run.rss_bytes()
    del block
    region.close()
    assert during - before > 48 * MIB


def test_windowed_cache_memory_is_flat_and_codes_stay_right():
    cache = kvq.KVCache(8, 64, kvq.QuantConfig.original(), window=1024)
    tokens = long_run.Tokens(8, 64, keep=1024 + 128)
    run = long_run.stream(cache, tokens, 20_000, warmup=5_000, samples=3)
    # RSS after the warm-up (the ring is full by then) and at the end: a leak of 100 bytes per
    # append would add 1.5 MB; allow 4 MB of noise from the allocator and the interpreter
    assert run["rss_end"] - run["rss_warm"] < 4 * MIB, run["trace"]
    assert max(rss for _, rss in run["trace"]) - run["rss_warm"] < 4 * MIB, run["trace"]
    # Python objects, counted exactly: 5,000 more appends leave as many allocated blocks
    blocks = sys.getallocatedblocks()
    long_run.stream(cache, tokens, 5_000, warmup=5_000, samples=1)
    assert sys.getallocatedblocks() - blocks < 100  # one leaked object per append: 5,000
    assert len(cache) == 25_000 and cache.held == 1024
    fresh = kvq.KVCache(8, 64, kvq.QuantConfig.original(), window=1024)
    assert cache.stats()["reserved_nbytes"] == fresh.stats()["reserved_nbytes"]  # never grew
    check = long_run.check_cache(cache, tokens)
    assert check["first"] == 25_000 - 1024 and check["end"] == 25_000
    assert check["same_as_fresh"]
    assert check["k_bound"][0] == 0 and check["v_bound"][0] == 0
    assert check["attention_rel"] <= 1e-5


@pytest.mark.parametrize(
    "config",
    [kvq.QuantConfig.q4(), kvq.QuantConfig.kivi(2, residual=40)],
    ids=["q4", "kivi-residual"],
)
def test_chunked_schemes_stay_exact_over_many_wraps(config):
    cache = kvq.KVCache(8, 64, config, window=100)
    tokens = long_run.Tokens(8, 64, keep=100 + 4 * 32 + config.residual, seed=3)
    long_run.stream(cache, tokens, 3_000, warmup=3_000, samples=1)
    assert cache._k.chunks > 10 * cache._k.slots  # the ring wrapped many times
    check = long_run.check_cache(cache, tokens)
    assert check["same_as_fresh"]
    # searched, rotated or float16 keys have no plain bound (k_bound is None): check every
    # held chunk against the tokens with kvq.testing's bound, which knows those schemes
    assert_held_chunks_within_bound(cache, tokens)
    assert check["k_rel"] < 0.3 and check["v_rel"] < 0.6
    assert check["attention_rel"] <= 1e-5


def assert_held_chunks_within_bound(cache: kvq.KVCache, tokens: long_run.Tokens) -> None:
    """Each quantized chunk the cache holds dequantizes within kvq's error bound of the
    tokens it was made from (one chunk at a time, so ring wrap-around needs no care)."""
    end = len(cache)
    for name, stream in (("k", cache._k), ("v", cache._v)):
        chunk = stream.chunk
        first = stream.first_chunk * chunk
        truth = tokens.last(first, end)[0 if name == "k" else 1]
        for c in range(stream.first_chunk, stream.chunks):
            qt = stream.chunk_view(c, c + 1)
            at = c * chunk - first
            part = truth[:, at : at + chunk][None]  # (1, heads, chunk, head_dim) as stored
            assert_dequantized_close(part, qt, err_msg=f"{name} chunk {c}")


def test_held_chunk_bound_check_can_fail():
    cache = kvq.KVCache(8, 64, kvq.QuantConfig.q4(), window=100)
    tokens = long_run.Tokens(8, 64, keep=100 + 4 * 32)
    long_run.stream(cache, tokens, 400, warmup=400, samples=1)
    assert_held_chunks_within_bound(cache, tokens)
    slot = (cache._k.chunks - 1) % cache._k.slots
    cache._k.store["codes"][slot, :64] ^= 0x11  # codes of one chunk changed
    with pytest.raises(AssertionError, match="k chunk"):
        assert_held_chunks_within_bound(cache, tokens)


def test_checks_catch_a_corrupted_code():
    cache = kvq.KVCache(8, 64, kvq.QuantConfig.original(), window=64)
    tokens = long_run.Tokens(8, 64, keep=64 + 128)
    long_run.stream(cache, tokens, 500, warmup=500, samples=1)
    assert long_run.check_cache(cache, tokens)["same_as_fresh"]
    slot = (cache._v.chunks - 5) % cache._v.slots
    cache._v.store["codes"][slot, 3] ^= 1  # one code one step off
    check = long_run.check_cache(cache, tokens)
    assert not check["same_as_fresh"]
    assert check["v_bound"][0] == 1 and check["k_bound"][0] == 0


def test_tokens_remember_only_what_they_keep():
    tokens = long_run.Tokens(2, 8, keep=10, batch=4)
    drawn = [tokens.next() for _ in range(25)]
    k, v = tokens.last(15, 25)
    np.testing.assert_array_equal(k, np.concatenate([d[0] for d in drawn[15:]], axis=1))
    np.testing.assert_array_equal(v, np.concatenate([d[1] for d in drawn[15:]], axis=1))
    with pytest.raises(IndexError, match="not among the last 10"):
        tokens.last(14, 25)


def test_pool_churn_returns_to_empty():
    churn = long_run.pool_churn(20_000, capacity=16 << 20, max_live=32)
    assert churn["corrupted"] == 0
    assert churn["empty_again"], churn["stats"]
    assert churn["stats"]["in_use"] == 0 and churn["stats"]["free_blocks"] == 1
    assert churn["rss_end"] - churn["rss_warm"] < 4 * MIB
