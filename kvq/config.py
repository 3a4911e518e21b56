"""ModelConfig: the attention geometry of a transformer, from Hugging Face config.json files."""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvq.errors import ConfigError

FULL = "full_attention"
SLIDING = "sliding_attention"
LAYER_TYPES = (FULL, SLIDING)

# config.json names for each field, first match wins (GPT-2 style n_* names last).
_ALIASES: dict[str, tuple[str, ...]] = {
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv"),
    "head_dim": ("head_dim",),
    "sliding_window": ("sliding_window",),
    "layer_types": ("layer_types",),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "n_ctx"),
    "rope_theta": ("rope_theta",),
    "vocab_size": ("vocab_size",),
    "num_local_experts": ("num_local_experts", "num_experts"),
    "experts_per_token": ("experts_per_token", "num_experts_per_tok"),
    "model_type": ("model_type",),
}


@dataclass(frozen=True)
class ModelConfig:
    """What kvq needs to know of a model: layers, heads, head size, and attention windows.

    ``layer_types[i]`` is ``"full_attention"`` or ``"sliding_attention"`` (the latter keeps
    only the last ``sliding_window`` tokens). ``extra`` holds every other config.json field.
    """

    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    max_position_embeddings: int | None = None
    rope_theta: float | None = None
    vocab_size: int | None = None
    num_local_experts: int | None = None
    experts_per_token: int | None = None
    model_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        layers = self.num_hidden_layers
        if self.layer_types is None and isinstance(layers, int) and layers > 0:
            object.__setattr__(self, "layer_types", (FULL,) * layers)
        elif isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        _check_config(self, source="ModelConfig")

    @classmethod
    def gpt_oss_20b(cls) -> ModelConfig:
        """The published GPT-OSS-20B configuration (openai/gpt-oss-20b config.json)."""
        return cls(
            num_hidden_layers=24,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
            hidden_size=2880,
            sliding_window=128,
            layer_types=tuple(SLIDING if i % 2 == 0 else FULL for i in range(24)),
            max_position_embeddings=131072,
            rope_theta=150000.0,
            vocab_size=201088,
            num_local_experts=32,
            experts_per_token=4,
            model_type="gpt_oss",
        )

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from a config.json dictionary; ``source`` names it in error messages."""
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(config).__name__}")
        values: dict[str, Any] = {}
        used: set[str] = set()
        for name, aliases in _ALIASES.items():
            for alias in aliases:
                if alias in config:
                    values[name] = config[alias]
                    used.add(alias)
                    break
        parameters = config.get("rope_parameters")  # transformers 5: RoPE settings nested
        if values.get("rope_theta") is None and isinstance(parameters, dict):
            values["rope_theta"] = parameters.get("rope_theta")
        for name in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
            if values.get(name) is None:
                raise ConfigError(
                    f"{source}: missing field {name!r} (looked for {', '.join(_ALIASES[name])})"
                )
        for name in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
            values[name] = _positive_int(values[name], name, source)
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = values["num_attention_heads"]
        if values.get("head_dim") is None:
            hidden, heads = values["hidden_size"], values["num_attention_heads"]
            if hidden % heads:
                raise ConfigError(
                    f"{source}: field 'head_dim' is absent and hidden_size {hidden} is not a "
                    f"multiple of num_attention_heads {heads}"
                )
            values["head_dim"] = hidden // heads
        if values.get("layer_types") is None:
            values["layer_types"] = _derive_layer_types(config, values)
            if SLIDING not in values["layer_types"]:
                values["sliding_window"] = None
        if not isinstance(values["layer_types"], list | tuple):
            raise ConfigError(f"{source}: field 'layer_types' must be a list")
        values["layer_types"] = tuple(values["layer_types"])
        extra = {key: value for key, value in config.items() if key not in used}
        try:
            return cls(**values, extra=extra)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json``: the file itself, or a checkpoint directory holding it."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"{file}: cannot read ({error.strerror or error})") from None
        try:
            config = json.loads(text)
        except ValueError as error:
            raise ConfigError(f"{file}: not valid JSON ({error})") from None
        return cls.from_dict(config, source=str(file))

    @classmethod
    def from_transformers(cls, config: Any) -> ModelConfig:
        """Build from a ``transformers`` PretrainedConfig (or a model holding one as
        ``.config``): its decoder text config's ``to_dict()``, read as :meth:`from_dict` reads
        config.json. Needs no transformers import (duck-typed)."""
        config = getattr(config, "config", config)  # a model
        if hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        if not hasattr(config, "to_dict"):
            raise TypeError(
                f"expected a transformers PretrainedConfig or model, got {type(config).__name__}"
            )
        values = config.to_dict()
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            values["layer_types"] = list(layer_types)
        name = type(config).__name__
        return cls.from_dict(values, source=f"{name}({values.get('model_type', '?')})")

    # --- derived figures ---------------------------------------------------------------------

    @property
    def num_full_layers(self) -> int:
        return self.layer_types.count(FULL)

    @property
    def num_sliding_layers(self) -> int:
        return self.layer_types.count(SLIDING)

    @property
    def kv_values_per_token(self) -> int:
        """K and V values one layer stores per token: 2 x num_key_value_heads x head_dim."""
        return 2 * self.num_key_value_heads * self.head_dim

    @property
    def gqa_ratio(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads


def _derive_layer_types(config: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """Layer types for configs without ``layer_types``.

    Qwen2 style: ``use_sliding_window`` with layers from ``max_window_layers`` on sliding;
    Mistral style: a ``sliding_window`` applies to every layer; otherwise all full.
    """
    layers = values["num_hidden_layers"]
    window = values.get("sliding_window")
    if "use_sliding_window" in config:
        if not config["use_sliding_window"] or window is None:
            return [FULL] * layers
        first = config.get("max_window_layers", 0)
        first = first if isinstance(first, int) else 0
        return [SLIDING if i >= first else FULL for i in range(layers)]
    return [SLIDING if window is not None else FULL] * layers


def _positive_int(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{source}: field {name!r} must be a positive integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ConfigError(
            f"{source}: field {name!r} must be a positive integer, got {value!r}"
        ) from None
    if number < 1:
        raise ConfigError(f"{source}: field {name!r} must be a positive integer, got {value!r}")
    return number


def _check_config(config: ModelConfig, source: str) -> None:
    """Raise ConfigError naming the first missing or inconsistent field."""
    for name in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
        _positive_int(getattr(config, name), name, source)
    _positive_int(config.hidden_size, "hidden_size", source)
    for name in ("max_position_embeddings", "vocab_size", "num_local_experts"):
        if getattr(config, name) is not None:
            _positive_int(getattr(config, name), name, source)
    if config.experts_per_token is not None:
        _positive_int(config.experts_per_token, "experts_per_token", source)
        if config.num_local_experts and config.experts_per_token > config.num_local_experts:
            raise ConfigError(
                f"{source}: experts_per_token {config.experts_per_token} exceeds "
                f"num_local_experts {config.num_local_experts}"
            )
    if config.num_attention_heads % config.num_key_value_heads:
        raise ConfigError(
            f"{source}: num_attention_heads {config.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {config.num_key_value_heads}"
        )
    if not isinstance(config.layer_types, tuple):
        raise ConfigError(f"{source}: field 'layer_types' must be a list of strings")
    if len(config.layer_types) != config.num_hidden_layers:
        raise ConfigError(
            f"{source}: layer_types has {len(config.layer_types)} entries for "
            f"num_hidden_layers {config.num_hidden_layers}"
        )
    for index, kind in enumerate(config.layer_types):
        if kind not in LAYER_TYPES:
            raise ConfigError(
                f"{source}: layer_types[{index}] is {kind!r}; kvq knows {', '.join(LAYER_TYPES)}"
            )
    if SLIDING in config.layer_types:
        if config.sliding_window is None:
            raise ConfigError(f"{source}: sliding_attention layers need field 'sliding_window'")
        _positive_int(config.sliding_window, "sliding_window", source)
    if config.rope_theta is not None and not (
        isinstance(config.rope_theta, int | float)
        and not isinstance(config.rope_theta, bool)
        and config.rope_theta > 0
    ):
        raise ConfigError(
            f"{source}: field 'rope_theta' must be positive, got {config.rope_theta!r}"
        )
