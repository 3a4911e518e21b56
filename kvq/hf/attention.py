"""The "kvq" attention and mask functions that transformers calls for each layer.

Registered by ``import kvq.hf``: ``AttentionInterface.register("kvq", kvq_attention)`` and
``AttentionMaskInterface.register("kvq", kvq_mask)``. The attention function finds the
layer's caches through the key tensor :meth:`KVQCache.update` returned, appends the new keys
and values to each batch row's :class:`kvq.KVCache`, and runs :func:`kvq.attention` on the
codes (causal, windowed on sliding layers, GPT-OSS sinks, the module's scaling).
"""

from __future__ import annotations

import numpy as np
import torch

from kvq.attention import attention

_NO_CACHE = (
    "attn_implementation='kvq' reads a kvq.hf.KVQCache, but this attention call got keys "
    "from no KVQCache: pass cache=kvq.hf.KVQCache(model) (past_key_values= in generate) and "
    "keep use_cache on"
)


def kvq_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The mask the "kvq" attention takes: None (no padding), or the 2-D boolean padding mask
    (batch, past + new tokens) as given. Causality and windows come from the caches."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.to(torch.bool)


def kvq_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of ``query`` (batch, heads, t, head_dim) over the layer's KVQCache rows, the
    new ``key``/``value`` (from :meth:`KVQCache.update`) appended first. Returns
    ((batch, t, heads, head_dim) float32, None)."""
    layer = getattr(key, "_kvq_layer", None)
    if layer is None or layer.chunk is None:
        raise ValueError(_NO_CACHE)
    owner = layer.owner
    k_new, v_new, tokens = layer.chunk
    layer.chunk = None  # consumed: on any error below the caches are as before the update
    index = getattr(module, "layer_idx", layer.layer_idx)
    if index != layer.layer_idx:
        raise ValueError(f"module layer {index} got the keys of cache layer {layer.layer_idx}")
    if dropout:
        raise ValueError(f"kvq attention is for inference: dropout must be 0, got {dropout}")
    if kwargs.get("softcap") is not None:
        raise ValueError("kvq attention does not support softcap")
    if sliding_window is not None and sliding_window != layer.sliding_window:
        raise ValueError(
            f"layer {index}: the module asks for a sliding window of {sliding_window}, its "
            f"KVQCache layer has {layer.sliding_window}"
        )
    if not isinstance(query, torch.Tensor) or query.dtype != torch.float32:
        raise TypeError(f"layer {index}: kvq attention needs float32 queries on CPU")
    if query.device.type != "cpu":
        raise ValueError(f"layer {index}: query is on {query.device}; kvq runs on CPU")
    batch, heads, t_q, dim = query.shape
    if batch != len(owner.rows) or t_q != tokens:
        raise ValueError(
            f"layer {index}: query has shape {tuple(query.shape)} for {tokens} new tokens in "
            f"{len(owner.rows)} rows"
        )
    q = query.detach().numpy()
    sinks = None if s_aux is None else s_aux.detach().to(torch.float64).numpy()
    if not np.isfinite(q).all():
        raise ValueError(f"layer {index}: the query states hold NaN or Inf")
    caches = [row[index] for row in owner.rows]
    step = owner.max_queries if layer.is_sliding else t_q
    checked = batch > 1 or t_q > step  # a single append checks all before it changes anything
    for row, cache in enumerate(caches if checked else ()):  # every row before any appends
        try:
            cache.check_append(k_new[row], v_new[row])
        except ValueError as error:
            raise type(error)(f"layer {index}, batch row {row}: {error}") from None
    starts = _left_padding(attention_mask, batch, len(caches[0]) + tokens, index)
    if batch == 1 and t_q <= step:  # a decode step: one append, one call, no copies
        _append(caches[0], k_new[0], v_new[0], index, 0)
        out = attention(q[0], caches[0], scale=scaling, sinks=sinks, start=starts[0])
        if t_q == 1:  # (heads, 1, head_dim) is (1, 1, heads, head_dim) as it lies
            return torch.from_numpy(out.reshape(1, 1, heads, dim)), None
        return torch.from_numpy(out).transpose(0, 1).unsqueeze(0).contiguous(), None
    out = np.empty((batch, heads, t_q, dim), np.float32)
    for row, cache in enumerate(caches):
        for lo in range(0, t_q, step):
            hi = min(t_q, lo + step)
            _append(cache, k_new[row, :, lo:hi], v_new[row, :, lo:hi], index, row)
            out[row, :, lo:hi] = attention(
                q[row, :, lo:hi], cache, scale=scaling, sinks=sinks, start=starts[row]
            )
    return torch.from_numpy(out).transpose(1, 2).contiguous(), None


def _append(cache, k, v, index: int, row: int) -> None:
    """``cache.append(k, v)``, its error naming the layer and the batch row."""
    try:
        cache.append(k, v)
    except ValueError as error:  # unchecked before when it is the only append: unchanged
        raise type(error)(f"layer {index}, batch row {row}: {error}") from None


def _left_padding(mask, batch: int, length: int, index: int) -> list[int]:
    """Per row, the first position that is not padding (0 without a mask)."""
    if mask is None:
        return [0] * batch
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"layer {index}: kvq attention takes a 2-D padding mask (batch, tokens), got "
            f"{shape}; custom 4-D masks are not supported"
        )
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"layer {index}: attention_mask has shape {tuple(mask.shape)}, expected "
            f"({batch}, {length}): one entry per cached and new token"
        )
    valid = mask.to(torch.bool).numpy()
    starts = []
    for row in range(batch):
        start = int(np.argmax(valid[row])) if valid[row].any() else length
        if not valid[row, start:].all():
            gap = start + int(np.argmin(valid[row, start:]))
            raise ValueError(
                f"layer {index}: attention_mask row {row} masks position {gap} after "
                f"unmasked position {start}; kvq attention handles left padding only"
            )
        starts.append(start)
    return starts
