"""LayerMap: one QuantConfig per layer, as data that a cache loads (JSON)."""

from __future__ import annotations

import json
import operator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kvq.scheme import QuantConfig, Scheme

_FORMAT = "kvq.LayerMap/1"


@dataclass(frozen=True)
class LayerMap:
    """A :class:`QuantConfig` per layer: ``configs[i]`` is layer ``i``'s.

    A LayerMap is a config callable: ``layer_map(layer_idx, layer_type) -> QuantConfig``, so
    :class:`kvq.ModelKVCache`, :func:`kvq.plan` and ``kvq.hf.KVQCache`` take it wherever
    they take a QuantConfig. ``note`` says how it was chosen (``kvq.hf.calibrate`` writes the
    calibration text, its length and each layer's measured error there). ``save(path)`` and
    ``LayerMap.load(path)`` keep it as JSON; a map is model metadata, a few hundred bytes
    that no cache stores per token.
    """

    configs: tuple[QuantConfig, ...]
    note: str = ""

    def __post_init__(self) -> None:
        configs = tuple(self.configs) if isinstance(self.configs, list | tuple) else None
        if not configs:
            raise ValueError(
                f"configs must be a non-empty sequence of kvq.QuantConfig, got {self.configs!r}"
            )
        for i, config in enumerate(configs):
            if not isinstance(config, QuantConfig):
                raise TypeError(f"configs[{i}] must be a kvq.QuantConfig, got {config!r}")
        if not isinstance(self.note, str):
            raise TypeError(f"note must be a str, got {type(self.note).__name__}")
        object.__setattr__(self, "configs", configs)

    def __call__(self, layer_idx: int, layer_type: str | None = None) -> QuantConfig:
        """Layer ``layer_idx``'s QuantConfig (``layer_type`` is accepted and ignored)."""
        if isinstance(layer_idx, bool):
            raise TypeError("layer_idx must be an int, got bool")
        try:
            index = operator.index(layer_idx)
        except TypeError:
            raise TypeError(f"layer_idx must be an int, got {layer_idx!r}") from None
        if not 0 <= index < len(self.configs):
            raise IndexError(
                f"layer_idx {index} is outside this LayerMap's {len(self.configs)} layers"
            )
        return self.configs[index]

    def __len__(self) -> int:
        return len(self.configs)

    @property
    def nominal_bits_per_element(self) -> float:
        """Mean over layers of each config's nominal bits (see QuantConfig's)."""
        return sum(c.nominal_bits_per_element for c in self.configs) / len(self.configs)

    def to_json(self) -> str:
        """The map as JSON text (every Scheme field by name; ``channel_bits`` as one string
        of digits per row of the table, e.g. one per KV head)."""
        layers = [
            {"k": _scheme_json(c.k), "v": _scheme_json(c.v), "residual": c.residual,
             "sink_tokens": c.sink_tokens, "pre_rope": c.pre_rope}
            for c in self.configs
        ]  # fmt: skip
        return json.dumps({"format": _FORMAT, "note": self.note, "layers": layers}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> LayerMap:
        """The LayerMap that :meth:`to_json` wrote; ValueError naming what is wrong."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not a LayerMap: the text is not JSON ({error})") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a LayerMap: format must be {_FORMAT!r}, got {found!r}")
        layers = data.get("layers")
        if not isinstance(layers, list):
            raise ValueError(f"not a LayerMap: layers must be a list, got {layers!r}")
        configs = []
        for i, layer in enumerate(layers):
            try:
                configs.append(
                    QuantConfig(
                        k=_scheme_of(layer["k"]),
                        v=_scheme_of(layer["v"]),
                        residual=layer["residual"],
                        sink_tokens=layer["sink_tokens"],
                        pre_rope=layer.get("pre_rope", False),  # absent before pre_rope
                    )
                )
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"LayerMap layers[{i}] is not a QuantConfig: {error}") from None
        return cls(tuple(configs), data.get("note", ""))

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> LayerMap:
        """The LayerMap saved at ``path``."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def _scheme_json(scheme: Scheme) -> dict:
    """A Scheme's fields by name, ``channel_bits`` rows as strings of digits (widths 1-8)."""
    fields = asdict(scheme)
    if scheme.channel_bits is not None:
        table = scheme.channel_widths
        rows = table.reshape(-1, table.shape[-1])
        fields["channel_bits"] = {
            "shape": list(table.shape),
            "rows": ["".join(str(int(w)) for w in row) for row in rows],
        }
    return fields


def _scheme_of(fields: dict) -> Scheme:
    """The Scheme that :func:`_scheme_json` wrote."""
    fields = dict(fields)
    table = fields.get("channel_bits")
    if isinstance(table, dict):
        try:
            widths = [[int(c) for c in row] for row in table["rows"]]
            fields["channel_bits"] = np.array(widths, np.int64).reshape(table["shape"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"channel_bits is not a table of digit rows: {error}") from None
    return Scheme(**fields)
