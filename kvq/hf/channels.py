"""calibrate_channels: per-channel key widths for a model, from one pass over real text.

The pass records each layer's queries and keys as its attention meets them (RoPE applied),
weighs every key channel by ``kvq.allocation.channel_weights`` (query energy times squared
key range, times the layer's squared scaling) and gives the keys of every layer
``Scheme.channel_bits`` from ``kvq.allocate_channel_bits``, as wide on average as the budget
allows over a ``context``-token cache, everything counted (``kvq.plan``). Values keep the
base preset's scheme, or with ``values=True`` take per-channel widths too where per-channel
value groups err less (weights: ``kvq.allocation.value_channel_weights``, the output
projection's column energy times value range). One forward pass: 4-5 s for SmolLM2
(17-30 s with ``values=True``, which replays each layer's attention twice), where
``kvq.hf.calibrate`` takes minutes.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvq._validate import check_int
from kvq.allocation import allocate_channel_bits, channel_weights, value_channel_weights
from kvq.hf.calibrate import LADDER, calibration_text, layer_bits
from kvq.kvcache import chunk_tokens
from kvq.layer_map import LayerMap
from kvq.scheme import CHANNEL_BITS, QuantConfig, Scheme
from kvq.tensor import quantize

_CAPTURE = "kvq_channels"  # the attention that records queries and keys (then runs sdpa)
_captured: dict[int, tuple] = {}  # layer: (queries, keys, scale, values, o_proj weight)


def _capture(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The model's own eager attention (its modeling module's ``eager_attention_forward``:
    sinks and windows as the model has them; sdpa where there is none), after keeping layer
    ``module.layer_idx``'s first batch row of queries, keys and values (float64), its scaling
    and its output projection's weight (``o_proj``; None where the module has none)."""
    dim = query.shape[-1]
    scale = 1.0 / math.sqrt(dim) if scaling is None else float(scaling)
    out = getattr(module, "o_proj", None)
    _captured[module.layer_idx] = (
        query[0].detach().to(torch.float64).cpu().numpy(),
        key[0].detach().to(torch.float64).cpu().numpy(),
        scale,
        value[0].detach().to(torch.float64).cpu().numpy(),
        None if out is None else out.weight.detach().to(torch.float64).cpu().numpy(),
    )
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
    kwargs.pop("dropout", None)
    return eager(module, query, key, value, attention_mask, scale, 0.0, **kwargs)


AttentionInterface.register(_CAPTURE, _capture)
AttentionMaskInterface.register(_CAPTURE, eager_mask)  # additive float masks, as eager takes


def key_channel_weights(model, tokenizer, text: str | None = None, tokens: int = 1024,
                        group_size: int = 32, first: int = 1) -> np.ndarray:  # fmt: skip
    """float64 (layers, kv_heads, head_dim): :func:`kvq.allocation.channel_weights` of each
    layer over ``tokens`` tokens of ``text`` (default
    :func:`kvq.hf.calibrate.calibration_text`), times the layer's squared attention scaling
    (so that layers compare), from position ``first`` on (past the exact sink tokens)."""
    captured = _record(model, tokenizer, text, check_int("tokens", tokens, group_size + first))
    return _key_weights(captured, group_size, first)


def _record(model, tokenizer, text, tokens: int) -> list[tuple]:
    """One forward pass over ``tokens`` tokens of ``text``: each layer's (queries, keys,
    scale, values, o_proj weight), as :func:`_capture` keeps them."""
    from kvq.hf.cache import _text_config, model_config_of
    from kvq.hf.evaluate import token_ids

    model_config = model_config_of(_text_config(model)[0])
    ids = token_ids(tokenizer, calibration_text() if text is None else text, tokens)
    original = model.config._attn_implementation
    _captured.clear()
    try:
        model.set_attn_implementation(_CAPTURE)
        with torch.inference_mode():
            model(input_ids=ids)
    finally:
        model.set_attn_implementation(original)
    layers = model_config.num_hidden_layers
    missing = [layer for layer in range(layers) if layer not in _captured]
    if missing:
        _captured.clear()
        raise ValueError(f"no attention call was seen for layers {missing}")
    captured = [_captured[layer] for layer in range(layers)]
    _captured.clear()
    return captured


def _key_weights(captured: list[tuple], group_size: int, first: int) -> np.ndarray:
    """(layers, kv_heads, head_dim): channel_weights times each layer's squared scaling."""
    return np.stack([channel_weights(q, k, group_size, first) * scale**2
                     for q, k, scale, *_ in captured])  # fmt: skip


def value_layouts(captured: list[tuple], base: Scheme, first: int = 1) -> list[bool]:
    """Per layer, whether values grouped per channel (``base.bits`` wide, 32-token groups,
    base's second-level scales and search, unrotated) give a smaller attention-output error
    than ``base``, measured through the layer's output projection on the recorded pass
    (causal float64 attention, positions ``first`` on quantized; the earlier ones exact, as
    the sink tokens are). ``captured``: per layer (queries (num_q_heads, t, head_dim), keys
    and values (num_kv_heads, t, head_dim), the attention scaling, the o_proj weight (hidden,
    num_q_heads * head_dim)), float64, as the calibration pass records them."""
    per_channel = _value_scheme(base, None)
    chosen = []
    for queries, keys, scale, values, out_weight in captured:
        weights = _causal_weights(queries, keys, scale)
        exact = weights @ values
        errors = []
        for scheme in (base, per_channel):
            held = values.copy()
            held[:, first:] = quantize(
                np.ascontiguousarray(values[:, first:], np.float32), scheme=scheme
            ).dequantize()
            moved = (weights @ held - exact).reshape(len(queries), -1, held.shape[2])
            # (heads, t, dim) -> (t, heads * dim): the projection's input, query head by head
            errors.append(float(np.sum((np.concatenate(list(moved), axis=1) @ out_weight.T) ** 2)))
        chosen.append(errors[1] < errors[0])
    return chosen


def calibrate_channels(
    model,
    tokenizer,
    bits: float,
    text: str | None = None,
    tokens: int = 1024,
    context: int = 4096,
    widths=CHANNEL_BITS,
    decode_mean: bool = False,
    values: bool = False,
) -> LayerMap:
    """A :class:`LayerMap` of at most ``bits`` bits per element over a ``context``-token
    cache (everything counted, the width tables included), whose keys have per-channel widths.

    ``decode_mean=True`` counts the mean over the decode steps of one key group from
    ``context`` (``context`` to ``context + 31`` tokens for groups of 32; the period after
    which every stream's chunks fill again), as a decode loop holds them: up to 31 newest keys
    wait in float32 for their group. By default the count is at ``context``
    tokens, where a multiple of the group holds none (SmolLM2's shipped maps: 4.493 bits at
    4,096 tokens, 4.556 in the mean over the next 32).

    The base is the widest preset of ``kvq.hf.calibrate.LADDER`` that fits ``bits`` (q4 for
    4.5). Every layer takes its values scheme and sink tokens; its keys become per-channel
    groups of 32 tokens, unrotated, with second-level scales and range search, and
    ``channel_bits`` from :func:`kvq.allocate_channel_bits` of
    :func:`key_channel_weights` (``tokens`` tokens of ``text``), the widest mean width that
    fits the budget (to 1/64 of a bit). ``widths``: the widths a channel may take.

    ``values=True`` gives values per-channel widths too, in the layers where per-channel
    value groups beat the base's per-token ones (:func:`value_layouts`, on the same pass):
    there values are grouped per channel (32 tokens, unrotated, the base's second-level
    scales and search), their widths allocated at the base's mean width over those layers
    from :func:`kvq.allocation.value_channel_weights` (each layer's weights summed to one:
    a layer's values weigh alike), and the keys take what the budget leaves. It needs each
    attention module's output projection (``o_proj``).
    """
    from kvq.hf.cache import _text_config, model_config_of

    if isinstance(bits, bool) or not isinstance(bits, int | float) or not math.isfinite(bits):
        raise TypeError(f"bits must be a finite number, got {bits!r}")
    context = check_int("context", context, 1)
    for name, flag in (("decode_mean", decode_mean), ("values", values)):
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    model_config = model_config_of(_text_config(model)[0])
    layers = model_config.num_hidden_layers

    def counted_bits(layer_map: LayerMap) -> float:
        """What the budget counts: the bits at ``context``, or their mean over a key group."""
        if not decode_mean:
            return layer_bits(model_config, layer_map, context)
        heads, dim = model_config.num_key_value_heads, model_config.head_dim
        period = math.lcm(*{chunk_tokens(scheme, heads, dim) for config in layer_map.configs
                            for scheme in (config.k, config.v)})  # fmt: skip
        return float(np.mean([layer_bits(model_config, layer_map, context + step)
                              for step in range(period)]))  # fmt: skip

    presets = [(name, make()) for name, make in LADDER]
    fits = [p for p in presets if counted_bits(LayerMap((p[1],) * layers)) <= bits]
    if not fits:
        raise ValueError(f"bits={bits} is below the narrowest preset's over {context} tokens")
    name, base = fits[-1]
    group, first = base.k.group_size, base.sink_tokens
    captured = _record(model, tokenizer, text, check_int("tokens", tokens, group + first))
    weights = _key_weights(captured, group, first)
    value_schemes = [base.v] * layers
    if values:
        value_schemes = _value_widths(captured, base.v, first, widths)

    def layer_map(mean: float) -> LayerMap:
        chosen = allocate_channel_bits(weights, mean, widths)
        pairs = zip(chosen, value_schemes, strict=True)
        return LayerMap(tuple(replace(_with_widths(base, table), v=v) for table, v in pairs))

    allowed = sorted({int(w) for w in widths})
    low, high = allowed[0] * 64, allowed[-1] * 64  # in 1/64 bits; low is assumed to fit
    if counted_bits(layer_map(low / 64)) > bits:
        raise ValueError(
            f"bits={bits} is too few for {allowed[0]}-bit keys beside {name}'s values"
        )
    while low < high:
        middle = (low + high + 1) // 2
        if counted_bits(layer_map(middle / 64)) <= bits:
            low = middle
        else:
            high = middle - 1
    chosen = layer_map(low / 64)
    counted = counted_bits(chosen)
    key_mean = float(np.mean([np.mean(c.k.channel_bits) for c in chosen.configs]))
    over = f"{context} tokens" + (", mean over a key group's decode steps" if decode_mean else "")
    note = (
        f"kvq.hf.calibrate_channels: base {name}, at most {bits} bits over {over} "
        f"({counted:.3f} counted); keys {key_mean:.3f} bits a code on average, widths "
        f"{allowed}; {tokens} calibration tokens"
    )
    if values:
        layered = [i for i, v in enumerate(value_schemes) if v.channel_bits is not None]
        note += f"; values of per-channel widths in layers {layered}, the rest {name}'s"
    return LayerMap(chosen.configs, note)


def _causal_weights(queries: np.ndarray, keys: np.ndarray, scale: float) -> np.ndarray:
    """float64 (kv_heads, group * t, t): causal softmax weights of each KV head's query rows
    (query heads of a KV head one after the other), queries and keys at the same positions."""
    kv_heads, tokens, _ = keys.shape
    rows = queries.reshape(kv_heads, -1, queries.shape[2])  # C order: a KV head's heads in turn
    scores = scale * rows @ keys.transpose(0, 2, 1)
    future = np.triu(np.ones((tokens, tokens), bool), 1)
    scores[:, np.tile(future, (rows.shape[1] // tokens, 1))] = -np.inf
    scores -= scores.max(axis=2, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=2, keepdims=True)
    return scores


def _value_widths(captured: list[tuple], base: Scheme, first: int, widths) -> list[Scheme]:
    """Each layer's value scheme for ``values=True``: ``base``, or per-channel groups of
    per-channel widths where :func:`value_layouts` chooses them."""
    if any(out_weight is None for *_, out_weight in captured):
        raise ValueError(
            "values=True needs each attention module's output projection (o_proj), which "
            "this model's attention modules lack"
        )
    chosen = value_layouts(captured, base, first)
    layered = [layer for layer, take in enumerate(chosen) if take]
    schemes = [base] * len(captured)
    if not layered:
        return schemes
    weights = np.stack([value_channel_weights(captured[layer][3], captured[layer][4], 32, first)
                        for layer in layered])  # fmt: skip
    weights /= np.maximum(weights.sum(axis=(1, 2), keepdims=True), np.finfo(float).tiny)
    tables = allocate_channel_bits(weights, base.bits, widths)
    for layer, table in zip(layered, tables, strict=True):
        schemes[layer] = _value_scheme(base, table)
    return schemes


def _value_scheme(base: Scheme, table: np.ndarray | None) -> Scheme:
    """Values grouped per channel over 32 tokens (see :func:`_per_channel`)."""
    return _per_channel(base, table, 32)


def _per_channel(base: Scheme, table: np.ndarray | None, group_size: int) -> Scheme:
    """Per-channel groups of ``group_size`` tokens, unrotated (as channel_bits needs), with
    ``base``'s scale dtype, second-level scales and search; ``table``: per-channel widths
    (None: ``base.bits`` for all)."""
    bits = base.bits if table is None else int(table.max())
    return Scheme(
        bits, group_size, axis=-2, scale_dtype=base.scale_dtype,
        double_quant=base.double_quant, search=base.search, channel_bits=table,
    )  # fmt: skip


def _with_widths(base: QuantConfig, table: np.ndarray) -> QuantConfig:
    """``base`` with keys of per-channel widths ``table``."""
    return replace(base, k=_per_channel(base.k, table, base.k.group_size))
