"""Synthetic K/V activations shaped like a real attention layer's, for demos and benchmarks."""

import numpy as np


def kv_layer(
    num_kv_heads: int = 8, tokens: int = 4096, head_dim: int = 64, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values, float32 (num_kv_heads, tokens, head_dim).

    Keys: a few outlier channels per head at 5-20x the typical magnitude, and smooth drift
    along tokens, as seen in real K caches; values: near Gaussian.
    """
    rng = np.random.default_rng(seed)
    shape = (num_kv_heads, tokens, head_dim)
    channel_scale = np.ones((num_kv_heads, 1, head_dim), np.float32)
    outliers = max(1, head_dim // 16)
    for h in range(num_kv_heads):
        channels = rng.choice(head_dim, outliers, replace=False)
        channel_scale[h, 0, channels] = rng.uniform(5, 20, outliers)
    drift = np.cumsum(rng.standard_normal(shape, dtype=np.float32), axis=1)
    drift *= np.float32(0.5 / np.sqrt(max(tokens, 1)))
    keys = (rng.standard_normal(shape, dtype=np.float32) + drift) * channel_scale
    values = rng.standard_normal(shape, dtype=np.float32)
    return keys, values
