"""calibrate: choose each layer's K and V bits from a short measured pass over real text.

Some streams matter far more than others. In SmolLM2-135M at 3 bits, layer 10's keys
alone cost 0.022 of mean KLD; that is a quarter of all 60 streams' errors summed, and
most streams cost under 0.002. :func:`calibrate` measures each stream's error when only it
is quantized at the budget's preset, with every other stream at q8. It then spends what is
left of the budget on the streams that cost the most: it raises them to a wider preset's
scheme, choosing by measured errors, not by estimates.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import replace

from kvq._validate import check_int
from kvq.layer_map import LayerMap
from kvq.plan import plan
from kvq.scheme import QuantConfig

#: The ladder of presets a stream can take, narrowest first.
LADDER: tuple[tuple[str, Callable[[], QuantConfig]], ...] = (
    ("q2", QuantConfig.q2),
    ("q3", QuantConfig.q3),
    ("q4", QuantConfig.q4),
    ("q8", QuantConfig.q8),
)


def calibration_text() -> str:
    """Text to calibrate on, which is not the text :func:`kvq.hf.evaluate` is usually run on
    (``kvq.hf.models.reference_text()``): CPython's reference documentation
    (``pydoc_data.topics``), topics in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def layer_bits(model_config, layer_map, context: int) -> float:
    """Stored bits per K/V element of ``layer_map`` over a ``context``-token cache, all layers,
    sink tokens included (what ``kvq.plan`` counts, for KVQCache's ``max_queries=64``)."""
    sized = plan(model_config, context, layer_map, max_queries=_MAX_QUERIES)
    return 32 * sized.total_bytes / sized.float32_bytes


_MAX_QUERIES = 64  # KVQCache's default


def _stream_bytes(model_config, ladder, stream, level: int, context: int) -> int:
    """Bytes of one stream ((layer, 'k' or 'v')) at ladder ``level`` after ``context``
    tokens (as ``kvq.plan`` counts them)."""
    from kvq.config import SLIDING

    layer, which = stream
    config = ladder[level][1]
    kind = model_config.layer_types[layer]
    window = model_config.sliding_window if kind == SLIDING else None
    scheme = config.k if which == "k" else config.v
    return _bytes_of(scheme, model_config.num_key_value_heads, model_config.head_dim,
                     context, config.residual, window, config.sink_tokens)  # fmt: skip


@functools.lru_cache(maxsize=256)
def _bytes_of(scheme, heads, dim, context, residual, window, sinks) -> int:
    from kvq.kvcache import stream_bytes

    return stream_bytes(scheme, heads, dim, context, residual, window, _MAX_QUERIES, sinks)


def choose(streams, base: int, top: int, errors: dict, sized: dict, spare: float) -> tuple:
    """The levels (each in ``base .. top - 1``) for ``streams`` whose summed error
    ``errors[(stream, level)]`` (missing: 0) is least among those whose extra bytes
    ``sized[(stream, level)] - sized[(stream, base)]`` sum to at most ``spare``; by
    enumeration (top - base) ** len(streams) (ties: the first found, narrowest first)."""
    best, best_error = (base,) * len(streams), math.inf
    for levels in itertools.product(range(base, top), repeat=len(streams)):
        pairs = list(zip(streams, levels, strict=True))
        extra = sum(sized[(s, i)] - sized[(s, base)] for s, i in pairs)
        summed = sum(errors.get((s, i), 0.0) for s, i in pairs)
        if extra <= spare and summed < best_error:
            best, best_error = levels, summed
    return best


def calibrate(
    model,
    tokenizer,
    bits: float,
    text: str | None = None,
    tokens: int = 512,
    context: int = 4096,
    chunk: int = 64,
    candidates: int = 8,
    progress: Callable[[str], None] | None = None,
    pre_rope: bool = False,
) -> LayerMap:
    """A :class:`LayerMap` of at most ``bits`` bits per element for ``model``.

    The base is the widest preset of :data:`LADDER` whose cache fits ``bits`` (q3 for
    3.5). ``tokens`` tokens of ``text`` (default :func:`calibration_text`) run through
    ``kvq.hf.KVQCache`` in chunks of ``chunk``, once for each of the model's 2 x layers
    streams. In each run that stream takes the base scheme and all others q8. Each run is
    scored as mean KLD against the float32 cache. The ``candidates`` costliest streams are
    then measured at each wider preset. The map is the assignment of those streams to
    presets that has the least summed error and fits ``bits`` over a ``context``-token
    cache, everything counted (``kvq.plan``). Each layer's config keeps the base's sink
    tokens. ``note`` records the text's length, the budget and the errors that chose.
    ``progress(message)`` is called after each run. ``pre_rope=True`` climbs the presets'
    pre_rope variants (``QuantConfig.q3(pre_rope=True)``, ...: keys before RoPE).

    Cost: 2 x layers + up to ``candidates`` x (wider presets) forward passes of ``tokens``
    tokens (SmolLM2-135M, 512 tokens: 60-76 passes, 11-15 minutes in all on 2 cores).
    """
    from transformers.cache_utils import DynamicCache

    from kvq.hf.cache import KVQCache, _text_config, model_config_of
    from kvq.hf.evaluate import compare, run_logits, token_ids

    if isinstance(bits, bool) or not isinstance(bits, int | float) or not math.isfinite(bits):
        raise TypeError(f"bits must be a finite number, got {bits!r}")
    tokens = check_int("tokens", tokens, 2)
    context = check_int("context", context, 1)
    chunk = check_int("chunk", chunk, 1)
    candidates = check_int("candidates", candidates, 0)
    model_config = model_config_of(_text_config(model)[0])
    layers = model_config.num_hidden_layers
    if not isinstance(pre_rope, bool):
        raise TypeError(f"pre_rope must be a bool, got {pre_rope!r}")
    ladder = [(name, make(pre_rope=pre_rope)) for name, make in LADDER]

    def uniform(config):
        return LayerMap((config,) * layers)

    fits = [
        i
        for i, (_, c) in enumerate(ladder)
        if layer_bits(model_config, uniform(c), context) <= bits
    ]
    if not fits:
        narrowest = layer_bits(model_config, uniform(ladder[0][1]), context)
        raise ValueError(
            f"bits={bits} is below the narrowest preset's {narrowest:.3f} bits per element "
            f"over {context} tokens"
        )
    base = fits[-1]
    top = ladder[-1][1]
    ids = token_ids(tokenizer, calibration_text() if text is None else text, tokens)
    original = model.config._attn_implementation

    def streams_at(choice: dict) -> LayerMap:
        """Each stream (layer, 'k' or 'v') at its ladder index in ``choice``; the rest q8."""
        configs = []
        for layer in range(layers):
            k = ladder[choice.get((layer, "k"), len(ladder) - 1)][1].k
            v = ladder[choice.get((layer, "v"), len(ladder) - 1)][1].v
            configs.append(replace(top, k=k, v=v, sink_tokens=ladder[base][1].sink_tokens))
        return LayerMap(tuple(configs))

    try:
        model.set_attn_implementation("sdpa")
        reference = run_logits(model, ids, DynamicCache(config=model.config), chunk)
        model.set_attn_implementation("kvq")

        def error(choice: dict) -> float:
            logits = run_logits(model, ids, KVQCache(model, streams_at(choice)), chunk)
            kld = compare(reference, logits, ids)[1]
            if progress is not None:
                named = ", ".join(f"{n}{s}={ladder[i][0]}" for (n, s), i in choice.items())
                progress(f"{named}: {kld:.3g}")
            return kld

        streams = [(layer, s) for layer in range(layers) for s in ("k", "v")]
        errors = {(stream, base): error({stream: base}) for stream in streams}
        costly = sorted(streams, key=lambda s: errors[(s, base)], reverse=True)[:candidates]
        wider = range(base + 1, len(ladder) - 1)  # q8 is the background: its error is ~0
        for stream, level in itertools.product(costly, wider):
            errors[(stream, level)] = error({stream: level})
    finally:
        model.set_attn_implementation(original)

    # bytes are additive over streams: each candidate's extra bytes at each wider level
    sized = {(stream, i): _stream_bytes(model_config, ladder, stream, i, context)
             for stream in costly for i in range(base, len(ladder))}  # fmt: skip
    spare = bits / 32 * plan(model_config, context, top, _MAX_QUERIES).float32_bytes
    spare -= sum(_stream_bytes(model_config, ladder, s, base, context) for s in streams)
    levels = choose(costly, base, len(ladder), errors, sized, spare)
    best = {s: base for s in streams} | dict(zip(costly, levels, strict=True))
    chosen = streams_at(best)
    counted = layer_bits(model_config, chosen, context)
    assert counted <= bits, (counted, bits)  # the bytes above are what plan counts
    raised = ", ".join(
        f"layer {n} {s.upper()} {ladder[i][0]} ({errors[((n, s), base)]:.3g} at "
        f"{ladder[base][0]})"
        for (n, s), i in sorted(best.items()) if i != base
    ) or "none"  # fmt: skip
    note = (
        f"kvq.hf.calibrate: base {ladder[base][0]}, at most {bits} bits over {context} tokens "
        f"({counted:.3f} counted); {tokens} calibration "
        f"tokens; raised: {raised}"
    )
    return LayerMap(chosen.configs, note)
