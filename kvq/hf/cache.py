"""KVQCache: a transformers ``Cache`` whose layers are kvq KVCaches, one per batch row.

``update`` does not append: it checks the new keys and values, keeps them for the layer, and
returns them tagged with the layer. The ``"kvq"`` attention function (kvq.hf.attention) then
appends them and runs :func:`kvq.attention` on the codes, in pieces of at most
``max_queries`` tokens on sliding-window layers (their ring keeps window + max_queries - 1
tokens, so each piece's first query still sees its whole window).
"""

from __future__ import annotations

import copy
import operator

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from kvq._validate import check_int
from kvq.config import FULL, SLIDING, ModelConfig
from kvq.kvcache import KVCache
from kvq.model_cache import LayerConfigs, ModelKVCache, check_layer_count
from kvq.plan import Plan, plan
from kvq.pool import MemoryPool
from kvq.rope import Rope
from kvq.scheme import QuantConfig

ATTN_IMPLEMENTATION = "kvq"


def _text_config(model_or_config):
    """(transformers decoder text config, model or None)."""
    model = model_or_config if isinstance(model_or_config, torch.nn.Module) else None
    config = model.config if model is not None else model_or_config
    if not hasattr(config, "to_dict"):
        raise TypeError(
            "KVQCache needs a transformers model or PretrainedConfig, got "
            f"{type(model_or_config).__name__}"
        )
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    return config, model


def _rope_of(model, model_config: ModelConfig) -> Rope | None:
    """The RoPE frequencies that pre_rope configs use: the model's rotary embedding's own
    ``inv_freq`` (scaled RoPE included) when it covers the whole head_dim, else plain RoPE
    of the config's rope_theta (None without one)."""
    dim = model_config.head_dim
    if model is not None:
        for module in model.modules():
            freqs = getattr(module, "inv_freq", None)
            if isinstance(freqs, torch.Tensor) and freqs.ndim == 1 and 2 * freqs.numel() == dim:
                return Rope(freqs.detach().to(torch.float64).cpu().numpy())
    if model_config.rope_theta is None or dim % 2:
        return None
    return Rope.from_theta(model_config.rope_theta, dim)


def model_config_of(hf_config) -> ModelConfig:
    """The kvq.ModelConfig of a transformers config, its layer types checked against the ones
    transformers itself gives its caches (full and sliding attention only)."""
    model_config = ModelConfig.from_transformers(hf_config)
    types, kwargs = get_layer_types_and_kwargs(hf_config)
    for index, (kind, extra) in enumerate(zip(types, kwargs, strict=True)):
        if kind not in (FULL, SLIDING):
            raise NotImplementedError(
                f"layer {index} is {kind!r}; KVQCache supports full_attention and "
                "sliding_attention layers only"
            )
        window = extra.get("sliding_window")
        if kind != model_config.layer_types[index] or (
            kind == SLIDING and window != model_config.sliding_window
        ):
            raise ValueError(
                f"layer {index}: transformers makes it {kind} (window {window}), kvq read "
                f"{model_config.layer_types[index]} (window {model_config.sliding_window})"
            )
    return model_config


class KVQLayer(CacheLayerMixin):
    """One layer of a :class:`KVQCache`: a view of the owner's per-row KVCaches for it."""

    is_compileable = False
    is_croppable = True

    def __init__(self, owner: KVQCache, layer_idx: int, kind: str, window: int | None):
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.layer_type = kind
        self.is_sliding = kind == SLIDING
        self.sliding_window = window
        self.chunk: tuple[np.ndarray, np.ndarray, int] | None = None  # K, V, tokens: to attend

    def __repr__(self) -> str:
        return f"KVQLayer({self.layer_idx}, {self.layer_type})"

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner._update(self, key_states, value_states)

    def get_seq_length(self) -> int:
        if not self.owner.rows:
            return 0
        waiting = 0 if self.chunk is None else self.chunk[2]
        return len(self.owner.rows[0][self.layer_idx]) + waiting

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) as transformers' DynamicLayer and DynamicSlidingWindowLayer
        give them (the "kvq" mask reads only the 2-D padding mask)."""
        seen = self.get_seq_length()
        if not self.is_sliding:
            return seen + query_length, 0
        offset = max(seen - self.sliding_window + 1, 0)
        if seen >= self.sliding_window:
            return self.sliding_window - 1 + query_length, offset
        return seen + query_length, offset

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def reset(self) -> None:
        self.chunk = None
        self.is_initialized = False

    def _refuse(self, *args, **kwargs):
        raise NotImplementedError(
            "KVQCache reorders, crops and selects batch rows for all layers at once: call the "
            "method on the cache, not on one layer"
        )

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _refuse


class KVQCache(Cache):
    """A transformers ``Cache`` holding kvq-quantized keys and values.

    ``KVQCache(model_or_config, config=None)``: ``model_or_config`` is a transformers model
    (checked: on CPU, float32) or its PretrainedConfig; ``config`` a :class:`kvq.QuantConfig`
    for every layer, or a callable ``(layer_idx, layer_type) -> QuantConfig``; default
    ``QuantConfig.q8()``. Each batch row gets a :class:`kvq.ModelKVCache` (one
    :class:`kvq.KVCache` per layer; sliding layers windowed as transformers windows them: a
    query sees the last ``sliding_window`` positions, itself included). ``max_queries``:
    sliding layers attend prefill chunks in pieces of at most this many tokens, and keep
    ``window + max_queries - 1`` tokens (``kvq.plan(..., max_queries=...)`` counts them).

    Needs ``attn_implementation="kvq"`` (``import kvq.hf`` registers it): ``update`` keeps the
    new keys and values and the kvq attention function appends and attends them; any other
    implementation would see only the new tokens, so ``update`` refuses it.

    ``cache.kv(layer_idx, row=0)`` is the KVCache behind a layer; ``nbytes`` and ``stats()``
    count every row; ``plan()`` is ``kvq.plan`` for one row at the current length.
    """

    def __init__(
        self,
        model_or_config,
        config: LayerConfigs | None = None,
        max_queries: int = 64,
        pool: MemoryPool | None = None,
    ) -> None:
        hf_config, model = _text_config(model_or_config)
        if model is not None:
            _check_model(model)
        self.hf_config = hf_config
        self.model_config = model_config_of(hf_config)
        self.config = QuantConfig.q8() if config is None else config
        if not isinstance(self.config, QuantConfig) and not callable(self.config):
            raise TypeError(
                "config must be a kvq.QuantConfig or a callable (layer_idx, layer_type) -> "
                f"QuantConfig, got {self.config!r}"
            )
        check_layer_count(self.config, len(self.model_config.layer_types))
        self.max_queries = check_int("max_queries", max_queries)
        self.pool = pool
        self.rope = _rope_of(model, self.model_config)
        self.rows: list[ModelKVCache] = []
        window = self.model_config.sliding_window
        layers = [
            KVQLayer(self, i, kind, window if kind == SLIDING else None)
            for i, kind in enumerate(self.model_config.layer_types)
        ]
        super().__init__(layers=layers)

    # --- what the model calls ------------------------------------------------------------------

    def _update(self, layer: KVQLayer, key_states, value_states):
        """Check a chunk, keep it for the kvq attention function, return it tagged."""
        implementation = getattr(self.hf_config, "_attn_implementation", None)
        if implementation not in (ATTN_IMPLEMENTATION, None):
            raise ValueError(
                f"KVQCache needs attn_implementation='kvq', but the model uses "
                f"{implementation!r}, whose attention would see only the new tokens: call "
                "model.set_attn_implementation('kvq') (after import kvq.hf), or load with "
                "from_pretrained(..., attn_implementation='kvq')"
            )
        if layer.chunk is not None:
            raise RuntimeError(
                f"layer {layer.layer_idx}: new keys and values arrived before the previous "
                "ones were attended; KVQCache works only under attn_implementation='kvq'"
            )
        heads, dim = self.model_config.num_key_value_heads, self.model_config.head_dim
        for name, states in (("key_states", key_states), ("value_states", value_states)):
            _check_tensor(name, states)
            if states.ndim != 4 or states.shape[1] != heads or states.shape[3] != dim:
                raise ValueError(
                    f"layer {layer.layer_idx}: {name} must have shape (batch, {heads}, tokens, "
                    f"{dim}), got {tuple(states.shape)}"
                )
        if key_states.shape != value_states.shape:
            raise ValueError(
                f"layer {layer.layer_idx}: key_states {tuple(key_states.shape)} and "
                f"value_states {tuple(value_states.shape)} differ"
            )
        batch, tokens = key_states.shape[0], key_states.shape[2]
        if not self.rows:
            self.rows = [self._new_row() for _ in range(batch)]
        elif len(self.rows) != batch:
            raise ValueError(
                f"layer {layer.layer_idx}: a batch of {batch} rows, but the cache holds "
                f"{len(self.rows)}; reset() it, or select rows with batch_select_indices"
            )
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        layer.chunk = (key_states.detach().numpy(), value_states.detach().numpy(), tokens)
        key_states._kvq_layer = layer  # how the attention function finds its caches
        return key_states, value_states

    def _new_row(self) -> ModelKVCache:
        return ModelKVCache(
            self.model_config,
            self.config,
            pool=self.pool,
            max_queries=self.max_queries,
            rope=self.rope,
        )

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset) for a forward of ``query_length`` new tokens (or of the
        ``cache_position`` tensor that earlier 5.x releases passed instead)."""
        if isinstance(query_length, torch.Tensor):
            query_length = int(query_length.shape[0])
        return super().get_mask_sizes(query_length, layer_idx)

    # --- beam search, cropping, batch rows -----------------------------------------------------

    def _idle(self, what: str) -> None:
        for layer in self.layers:
            if layer.chunk is not None:
                raise RuntimeError(
                    f"{what} during a forward pass: layer {layer.layer_idx} has keys and values "
                    "waiting to be attended"
                )

    def _take_rows(self, indices, what: str) -> None:
        """Rows become ``rows[i] for i in indices``; a row taken twice is deep-copied."""
        self._idle(what)
        if not self.rows:
            return
        picked = [_row_index(i, len(self.rows), what) for i in indices]
        used: set[int] = set()
        rows = []
        for i in picked:
            rows.append(copy.deepcopy(self.rows[i]) if i in used else self.rows[i])
            used.add(i)
        self.rows = rows

    def reorder_cache(self, beam_idx) -> None:
        """Rows become ``rows[beam_idx]`` (beam search)."""
        self._take_rows(_indices(beam_idx, "beam_idx"), "reorder_cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row repeated ``repeats`` times in place (row 0, row 0, row 1, ...)."""
        repeats = operator.index(repeats)
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        count = len(self.rows)
        self._take_rows([i for i in range(count) for _ in range(repeats)], "batch_repeat")

    def batch_select_indices(self, indices) -> None:
        """Keep rows ``indices`` (in that order)."""
        self._take_rows(_indices(indices, "indices"), "batch_select_indices")

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens of every layer and row (transformers
        5.x passes a negative count; 0 does nothing). Exact or refused: ValueError, changing
        nothing, where a layer cannot drop them exactly (see :meth:`kvq.KVCache.truncate`)."""
        self._idle("crop")
        tokens_to_remove = operator.index(tokens_to_remove)
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop takes a negative number of tokens to remove, got {tokens_to_remove}"
            )
        if tokens_to_remove == 0 or not self.rows:
            return
        caches = [row[i] for row in self.rows for i in range(len(row))]
        length = len(caches[0]) + tokens_to_remove
        if length < 0:
            raise ValueError(
                f"crop({tokens_to_remove}) removes more than the {len(caches[0])} tokens held"
            )
        for index, cache in enumerate(caches):
            try:
                cache.check_truncate(length)
            except ValueError as error:
                row, layer = divmod(index, len(self.layers))
                raise ValueError(f"row {row}, layer {layer}: {error}") from None
        for cache in caches:
            cache.truncate(length)

    def reset(self) -> None:
        """Drop every row (the next forward starts from an empty cache)."""
        self.rows = []
        for layer in self.layers:
            layer.reset()

    # --- kvq's side --------------------------------------------------------------------------

    def kv(self, layer_idx: int, row: int = 0) -> KVCache:
        """The :class:`kvq.KVCache` behind layer ``layer_idx`` of batch row ``row``."""
        if not self.rows:
            raise IndexError("the cache holds no rows yet: run a forward pass first")
        row = _row_index(row, len(self.rows), "row")
        return self.rows[row][layer_idx]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def batch_rows(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        """Bytes held by every layer of every row."""
        return sum(row.nbytes for row in self.rows)

    def stats(self) -> list[dict]:
        """One row per (batch row, layer): ``row`` plus :meth:`kvq.ModelKVCache.stats`."""
        return [
            {"row": r, **layer} for r, cache in enumerate(self.rows) for layer in cache.stats()
        ]

    def plan(self) -> Plan:
        """``kvq.plan`` of one batch row at the current length (its total_bytes times the
        rows is :attr:`nbytes`)."""
        return plan(self.model_config, self.get_seq_length(), self.config, self.max_queries)

    def __deepcopy__(self, memo: dict) -> KVQCache:
        """A copy with its own rows (deep) that shares the transformers config."""
        self._idle("copy")
        twin = object.__new__(type(self))
        memo[id(self)] = twin
        twin.__dict__.update(self.__dict__)
        twin.rows = copy.deepcopy(self.rows, memo)
        twin.layers = []
        for layer in self.layers:
            clone = copy.copy(layer)
            clone.owner = twin
            twin.layers.append(clone)
        return twin

    def __repr__(self) -> str:
        return (
            f"KVQCache({len(self.layers)} layers, {len(self.rows)} rows, "
            f"{self.get_seq_length()} tokens, {self.nbytes / 2**20:.2f} MiB)"
        )


def _check_model(model) -> None:
    """A model KVQCache can serve: every parameter on CPU and float32."""
    for name, parameter in model.named_parameters():
        if parameter.device.type != "cpu":
            raise ValueError(
                f"KVQCache runs on CPU, but parameter {name} is on {parameter.device}: "
                "move the model with model.to('cpu')"
            )
        if parameter.dtype != torch.float32:
            raise TypeError(
                f"KVQCache needs a float32 model, but parameter {name} is {parameter.dtype}: "
                "convert it with model.float() (or load with dtype=torch.float32)"
            )


def _check_tensor(name: str, states) -> None:
    if not isinstance(states, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(states).__name__}")
    if states.device.type != "cpu":
        raise ValueError(f"{name} is on {states.device}; KVQCache runs on CPU")
    if states.dtype != torch.float32:
        raise TypeError(
            f"{name} is {states.dtype}; KVQCache needs a float32 model (model.float())"
        )


def _indices(indices, name: str) -> list[int]:
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    try:
        return [operator.index(i) for i in indices]
    except TypeError:
        raise TypeError(f"{name} must be integers, got {indices!r}") from None


def _row_index(index: int, rows: int, what: str) -> int:
    if not -rows <= index < rows:
        raise IndexError(f"{what}: row {index} is outside the cache's {rows} rows")
    return index % rows
