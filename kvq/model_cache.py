"""ModelKVCache: one KVCache per layer of a model, sliding or full by its layer types."""

from __future__ import annotations

import operator
from collections.abc import Callable

import numpy as np

from kvq._bytes import in_unit
from kvq.config import SLIDING, ModelConfig
from kvq.kvcache import KVCache
from kvq.layer_map import LayerMap
from kvq.pool import MemoryPool
from kvq.rope import Rope
from kvq.scheme import QuantConfig

LayerConfigs = QuantConfig | Callable[[int, str], QuantConfig]


def check_layer_count(config, layers: int) -> None:
    """Raise ValueError when ``config`` is a :class:`LayerMap` of another number of layers."""
    if isinstance(config, LayerMap) and len(config) != layers:
        raise ValueError(
            f"config is a kvq.LayerMap of {len(config)} layers, but the model has {layers}"
        )


def layer_config(config: LayerConfigs | None, layer: int, kind: str) -> QuantConfig:
    """The QuantConfig of one layer: ``config`` itself, or ``config(layer, kind)`` when it is
    a callable; the default QuantConfig() when None."""
    if config is None:
        return QuantConfig()
    if isinstance(config, QuantConfig):
        return config
    if not callable(config):
        raise TypeError(
            "config must be a kvq.QuantConfig or a callable (layer_idx, layer_type) -> "
            f"QuantConfig, got {config!r}"
        )
    chosen = config(layer, kind)
    if not isinstance(chosen, QuantConfig):
        raise TypeError(f"config({layer}, {kind!r}) must return a kvq.QuantConfig, got {chosen!r}")
    return chosen


class ModelKVCache:
    """Per-layer caches for ``model_config``: sliding-attention layers get
    ``window=sliding_window`` (and ``max_queries``, see :class:`KVCache`), full-attention
    layers grow without bound (or to ``capacity``).

    ``config`` is one QuantConfig for every layer, or a callable ``(layer_idx, layer_type)
    -> QuantConfig``. ``cache[layer]`` is that layer's :class:`KVCache`; ``append(layer, k,
    v)`` appends to it. Each layer has its own lock (see :class:`KVCache`), so different
    layers can be appended from different threads at once. ``copy.deepcopy`` copies every
    layer (see :class:`KVCache` for pools). ``rope``: the RoPE frequencies that layers with a
    ``pre_rope`` config need; by default plain RoPE of the model's ``rope_theta`` (pass the
    model's own for scaled RoPE, as :class:`kvq.hf.KVQCache` does).
    """

    def __init__(
        self,
        model_config: ModelConfig,
        config: LayerConfigs | None = None,
        capacity: int | None = None,
        pool: MemoryPool | None = None,
        max_queries: int = 1,
        rope: Rope | None = None,
    ) -> None:
        if not isinstance(model_config, ModelConfig):
            raise TypeError(f"model_config must be a kvq.ModelConfig, got {model_config!r}")
        self.model_config = model_config
        self.config = QuantConfig() if config is None else config
        check_layer_count(self.config, len(model_config.layer_types))
        theta, dim = model_config.rope_theta, model_config.head_dim
        if rope is None and theta is not None and dim % 2 == 0:
            rope = Rope.from_theta(theta, dim)
        self.rope = rope
        self.layers = [
            KVCache(
                model_config.num_key_value_heads,
                model_config.head_dim,
                layer_config(self.config, i, kind),
                capacity=None if kind == SLIDING else capacity,
                window=model_config.sliding_window if kind == SLIDING else None,
                pool=pool,
                max_queries=max_queries,
                rope=rope,
            )
            for i, kind in enumerate(model_config.layer_types)
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
