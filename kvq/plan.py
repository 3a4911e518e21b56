"""kvq.plan: the KV cache memory of a whole model at a context length, by hand arithmetic."""

from __future__ import annotations

from dataclasses import dataclass

from kvq._bytes import in_unit
from kvq._validate import check_int
from kvq.config import FULL, SLIDING, ModelConfig
from kvq.kvcache import stream_bytes
from kvq.model_cache import LayerConfigs, check_layer_count, layer_config
from kvq.scheme import QuantConfig

BF16_BYTES = 2
FLOAT32_BYTES = 4
UNQUANTIZED = {"bf16": BF16_BYTES, "float32": FLOAT32_BYTES}  # bytes per value


@dataclass(frozen=True)
class Plan:
    """KV bytes of ``model`` holding ``context_len`` tokens.

    total_bytes: the cache as configured (quantized chunks plus float32 residual tokens,
    exactly what KVCache.nbytes reports; unquantized for ``config="bf16"``); bf16_bytes and
    float32_bytes: the same tokens unquantized; by_type: bytes per layer type; per_token: full-
    attention bytes per token (sliding layers are bounded by their window).
    """

    model: ModelConfig
    context_len: int
    config: LayerConfigs | str
    total_bytes: int
    bf16_bytes: int
    float32_bytes: int
    by_type: dict[str, int]
    per_token_bytes: float

    def table(self) -> str:
        """Text table of the plan."""
        if isinstance(self.config, str):
            label = self.config
        elif isinstance(self.config, QuantConfig):
            label = f"{self.config.nominal_bits_per_element:.2f}-bit kvq"
        else:
            label = "kvq, per-layer configs"
        rows = [
            f"{self.model.model_type or 'model'}: {self.context_len:,} tokens, {label}",
            f"  full layers    {self.model.num_full_layers:>3}  {_gib(self.by_type.get(FULL, 0))}",
            f"  sliding layers {self.model.num_sliding_layers:>3}  "
            f"{_gib(self.by_type.get(SLIDING, 0))}",
            f"  total              {_gib(self.total_bytes)}   (bf16 {_gib(self.bf16_bytes)}, "
            f"float32 {_gib(self.float32_bytes)})",
        ]
        return "\n".join(rows)


def _gib(nbytes: float) -> str:
    return in_unit(nbytes, "GiB", "10.3f")


def held_tokens(context_len: int, window: int | None) -> int:
    """Tokens an unquantized layer holds: all of them, or the last ``window``."""
    return context_len if window is None else min(context_len, window)


def plan(
    model_config: ModelConfig,
    context_len: int,
    config: LayerConfigs | str | None = None,
    max_queries: int = 1,
) -> Plan:
    """KV cache bytes of ``model_config`` after ``context_len`` tokens (see :class:`Plan`).

    ``config``: one QuantConfig, a callable ``(layer_idx, layer_type) -> QuantConfig`` (as
    :class:`ModelKVCache` takes), None for the default ``QuantConfig()`` (as in KVCache), or
    ``"bf16"`` / ``"float32"`` for an unquantized cache. ``max_queries``: what the sliding
    layers' caches were built with (they keep ``window + max_queries - 1`` tokens).
    """
    if not isinstance(model_config, ModelConfig):
        raise TypeError(f"model_config must be a kvq.ModelConfig, got {model_config!r}")
    context_len = check_int("context_len", context_len, 0)
    max_queries = check_int("max_queries", max_queries)
    if config is None:
        config = QuantConfig()
    if isinstance(config, str) and config not in UNQUANTIZED:
        raise ValueError(
            f"config must be a kvq.QuantConfig, a callable, None or one of "
            f"{sorted(UNQUANTIZED)}, got {config!r}"
        )
    check_layer_count(config, len(model_config.layer_types))
    heads, head_dim = model_config.num_key_value_heads, model_config.head_dim
    by_type: dict[str, int] = {}
    bf16 = 0
    for index, kind in enumerate(model_config.layer_types):
        window = model_config.sliding_window if kind == SLIDING else None
        tokens = held_tokens(context_len, window)
        bf16 += tokens * model_config.kv_values_per_token * BF16_BYTES
        if isinstance(config, str):
            layer = tokens * model_config.kv_values_per_token * UNQUANTIZED[config]
        else:
            chosen = layer_config(config, index, kind)
            layer = sum(
                stream_bytes(
                    scheme,
                    heads,
                    head_dim,
                    context_len,
                    chosen.residual,
                    window,
                    max_queries,
                    chosen.sink_tokens,
                )
                for scheme in (chosen.k, chosen.v)
            )
        by_type[kind] = by_type.get(kind, 0) + layer
    return Plan(
        model=model_config,
        context_len=context_len,
        config=config,
        total_bytes=sum(by_type.values()),
        bf16_bytes=bf16,
        float32_bytes=bf16 * FLOAT32_BYTES // BF16_BYTES,
        by_type=by_type,
        per_token_bytes=by_type.get(FULL, 0) / context_len if context_len else 0.0,
    )


def config_for_bits(bits: int) -> QuantConfig | str:
    """The preset for ``kvq plan --bits``: 16 is "bf16", 8/4/3/2 the q8/q4/q3/q2 presets."""
    presets = {
        16: "bf16",
        8: QuantConfig.q8,
        4: QuantConfig.q4,
        3: QuantConfig.q3,
        2: QuantConfig.q2,
    }
    if bits not in presets:
        raise ValueError(f"bits must be one of {sorted(presets)}, got {bits}")
    preset = presets[bits]
    return preset if isinstance(preset, str) else preset()
