"""ModelKVCache: one KVCache per layer of a model, sliding or full by its layer types."""

from __future__ import annotations

import operator

import numpy as np

from kvq._bytes import in_unit
from kvq.config import SLIDING, ModelConfig
from kvq.kvcache import KVCache
from kvq.pool import MemoryPool
from kvq.scheme import QuantConfig


class ModelKVCache:
    """Per-layer caches for ``model_config``: sliding-attention layers get
    ``window=sliding_window``, full-attention layers grow without bound (or to ``capacity``).

    ``cache[layer]`` is that layer's :class:`KVCache`; ``append(layer, k, v)`` appends to it.
    Each layer has its own lock (see :class:`KVCache`), so different layers can be appended
    from different threads at once.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        config: QuantConfig | None = None,
        capacity: int | None = None,
        pool: MemoryPool | None = None,
    ) -> None:
        if not isinstance(model_config, ModelConfig):
            raise TypeError(f"model_config must be a kvq.ModelConfig, got {model_config!r}")
        self.model_config = model_config
        self.config = QuantConfig() if config is None else config
        self.layers = [
            KVCache(
                model_config.num_key_value_heads,
                model_config.head_dim,
                self.config,
                capacity=None if kind == SLIDING else capacity,
                window=model_config.sliding_window if kind == SLIDING else None,
                pool=pool,
            )
            for kind in model_config.layer_types
        ]

    def __getitem__(self, layer: int) -> KVCache:
        return self.layers[self._layer(layer)]

    def __len__(self) -> int:
        return len(self.layers)

    def _layer(self, layer) -> int:
        try:
            if isinstance(layer, bool | np.bool_):
                raise TypeError
            index = operator.index(layer)
        except TypeError:
            raise TypeError(f"layer must be an integer, got {layer!r}") from None
        if not 0 <= index < len(self.layers):
            raise IndexError(f"layer {index} is outside [0, {len(self.layers)})")
        return index

    def append(self, layer: int, k, v) -> None:
        """Append (num_kv_heads, t, head_dim) keys and values to ``layer``.

        Errors are :meth:`KVCache.append`'s (NaN/Inf included), prefixed with the layer; the
        layer is left as it was.
        """
        index = self._layer(layer)
        try:
            self.layers[index].append(k, v)
        except (TypeError, ValueError, MemoryError) as error:
            error.args = (f"layer {index}: {error}",)
            raise

    @property
    def nbytes(self) -> int:
        """Bytes held by every layer."""
        return sum(cache.nbytes for cache in self.layers)

    def stats(self) -> list[dict]:
        """One row per layer: its type, window and :meth:`KVCache.stats`."""
        return [
            {"layer": i, "type": kind, "window": cache.window, **cache.stats()}
            for i, (kind, cache) in enumerate(
                zip(self.model_config.layer_types, self.layers, strict=True)
            )
        ]

    def table(self) -> str:
        """The per-layer stats as a fixed-width text table."""
        lines = [
            f"{'layer':>5} {'type':<18} {'appended':>9} {'held':>7} {'KiB':>10} {'bits/el':>7}"
        ]
        for row in self.stats():
            lines.append(
                f"{row['layer']:>5} {row['type']:<18} {row['appended']:>9} {row['held']:>7} "
                f"{row['nbytes'] / 1024:>10.1f} {row['bits_per_element']:>7.2f}"
            )
        lines.append(f"total {in_unit(self.nbytes, 'MiB')}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ModelKVCache({len(self.layers)} layers, {in_unit(self.nbytes, 'MiB')})"
