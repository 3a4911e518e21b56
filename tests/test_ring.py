"""The windowed KVCache ring: which absolute positions it holds, against a token-by-token model."""

import numpy as np
import pytest

import kvq
from kvq.synthetic import kv_layer
from tests import reference

CONFIGS = {
    "per-token": kvq.QuantConfig(k=kvq.Scheme(8, 32), v=kvq.Scheme(8, 32)),
    "q4": kvq.QuantConfig.q4(),
    "kivi2-residual": kvq.QuantConfig.kivi(2, residual=16),
}
APPENDS = {
    "ones": [1] * 300,
    "mixed": [5, 1, 60, 7, 1, 1, 128, 33, 64],
    "random": list(np.random.default_rng(4).integers(1, 40, 25)),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("appends", APPENDS)
@pytest.mark.parametrize("window", [1, 31, 50, 128])
def test_held_positions_follow_the_token_model(name, appends, window):
    steps = APPENDS[appends]
    total = int(sum(steps))
    k, v = kv_layer(2, total, 64, seed=5)
    cache = kvq.KVCache(2, 64, CONFIGS[name], window=window)
    unbounded = kvq.KVCache(2, 64, CONFIGS[name])
    at = 0
    for step in steps:
        cache.append(k[:, at : at + step], v[:, at : at + step])
        unbounded.append(k[:, at : at + step], v[:, at : at + step])
        at += step
        residual = cache.config.residual
        held_k = reference.held_positions([at], cache.stats()["k_chunk_tokens"], residual, window)
        held_v = reference.held_positions([at], cache.stats()["v_chunk_tokens"], residual, window)
        # the cache reads what both streams hold: the newer of their first positions on
        expected = np.arange(max(held_k[0], held_v[0]), at) if at else np.zeros(0, np.int64)
        np.testing.assert_array_equal(cache.positions, expected)
    first = int(cache.positions[0])
    np.testing.assert_array_equal(cache.keys(), unbounded.keys(first))
    np.testing.assert_array_equal(cache.values(), unbounded.values(first))


def test_token_model_by_hand():
    # chunks of 4, residual 2, after 13 tokens: chunks [0-3] and [4-7] were quantized when 6
    # and 10 tokens waited; 8..12 wait. Window 6 (7..12): [0-3] is all older, [4-7] is not
    held = reference.held_positions([13], chunk=4, residual=2, window=6)
    np.testing.assert_array_equal(held, np.arange(4, 13))
    held = reference.held_positions([13], chunk=4, residual=2, window=5)  # 8..12: both go
    np.testing.assert_array_equal(held, np.arange(8, 13))
    assert reference.held_positions([3, 3], 1, 0, 2).tolist() == [4, 5]
    assert reference.held_positions([7], 4, 0, None).tolist() == list(range(7))
