"""Perplexity, KL divergence and top-1 agreement of quantized KV caches against float32.

:func:`evaluate` runs a model over the same tokens once with transformers' float32
``DynamicCache`` (the baseline, under sdpa) and once per config, feeding the tokens in chunks
of ``chunk`` in decode order with the cache carried over, and compares the next-token
distributions at every position. Configs are kvq's (run through :class:`kvq.hf.KVQCache` under
attention ``"kvq"``) or peers:

- GGML q8_0 / q4_0 / q4_1 (llama.cpp's KV cache types), optionally after a Walsh-Hadamard
  rotation of head_dim (what llama.cpp does for quantized caches since 2026), through
  :func:`kvq.formats.ggml_quantize` (byte-equal to the ``gguf`` package);
- MLX affine quantization at 4 and 8 bits, groups of 32 and 64 (``mx.quantize``), per token
  along head_dim as mlx-lm's quantized cache does;
- transformers' ``QuantizedCache`` with the quanto or HQQ backend at 4 and 2 bits (its
  defaults otherwise: groups of 64, the last 128 tokens in full precision).

The GGML and MLX peers fake-quantize each new token's K/V once, on update (quantize then
dequantize, as those engines store them), and attend with sdpa over the dequantized values.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvq.hf.models import SMOLLM2_MAPS
from kvq.layer_map import LayerMap
from kvq.scheme import QuantConfig

#: kvq presets by name ('default' is ``QuantConfig()``, which is q8; 'original' the design's
#: 8-bit per-token scheme at 10 bits per element).
PRESETS: dict[str, Callable[[], QuantConfig]] = {
    "default": QuantConfig,
    "original": QuantConfig.original,
    "q8": QuantConfig.q8,
    "q4": QuantConfig.q4,
    "q3": QuantConfig.q3,
    "q2": QuantConfig.q2,
    # keys kept before RoPE (QuantConfig pre_rope), unrotated
    "q8+pre_rope": lambda: QuantConfig.q8(pre_rope=True),
    "q4+pre_rope": lambda: QuantConfig.q4(pre_rope=True),
    "q3+pre_rope": lambda: QuantConfig.q3(pre_rope=True),
    "q2+pre_rope": lambda: QuantConfig.q2(pre_rope=True),
    "kivi2": lambda: QuantConfig.kivi(2),
    "kivi4": lambda: QuantConfig.kivi(4),
    "mlx4": lambda: QuantConfig.mlx(4),
    "mlx8": lambda: QuantConfig.mlx(8),
}
#: The LayerMaps calibrated for SmolLM2-135M (kvq.hf.models.smollm2_layer_map) by name.
SMOLLM2_NAMES = tuple(f"{name}+smollm2" for name in SMOLLM2_MAPS)
#: GGML kinds: bits per element (a float16 scale, and for q4_1 a float16 min, per 32).
GGML_BITS = {"q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0}


@dataclass(frozen=True)
class CacheSpec:
    """One cache to evaluate: ``make(model)`` returns a fresh transformers ``Cache``; it runs
    under attention ``attn`` ('kvq' or 'sdpa'). bits_per_element: nominal storage per K/V
    element (NaN when unknown)."""

    name: str
    make: Callable
    attn: str = "sdpa"
    bits_per_element: float = float("nan")


@dataclass
class EvalRow:
    """One config's result against the float32 baseline on the same tokens.

    perplexity: exp of the mean next-token negative log-likelihood; delta_ppl_pct: its change
    against the baseline's, in percent; kld: mean KL(float32 || config) of the next-token
    distributions, in nats; top1: fraction of positions whose argmax token equals the
    baseline's; cache_bytes: the cache's size holding all ``tokens`` (nominal for peers that
    store dequantized values); seconds: wall time of the run.
    """

    name: str
    bits_per_element: float
    perplexity: float
    delta_ppl_pct: float
    kld: float
    top1: float
    cache_bytes: int
    seconds: float
    tokens: int


class EvalRows(list):
    """A list of :class:`EvalRow` (the float32 baseline first) with :meth:`table`."""

    def table(self) -> str:
        """Markdown table of the rows."""
        header = "| cache | bits/elem | ppl | d-ppl % | mean KLD | top-1 % | cache MiB | s |"
        lines = [header, "|---|---|---|---|---|---|---|---|"]
        for row in self:
            bits = "-" if math.isnan(row.bits_per_element) else f"{row.bits_per_element:.2f}"
            lines.append(
                f"| {row.name} | {bits} | {row.perplexity:.3f} | {row.delta_ppl_pct:+.2f} | "
                f"{row.kld:.2e} | {100 * row.top1:.2f} | {row.cache_bytes / 2**20:.2f} | "
                f"{row.seconds:.1f} |"
            )
        return "\n".join(lines)

    def by_name(self) -> dict[str, EvalRow]:
        return {row.name: row for row in self}


# --- peers: fake-quantizing caches ----------------------------------------------------------


def hadamard(d: int):
    """torch float32 (d, d) orthonormal Walsh-Hadamard (Sylvester) matrix, d a power of two."""
    import torch

    if d < 1 or d & (d - 1):
        raise ValueError(f"a Hadamard rotation needs head_dim a power of two, got {d}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(d)).to(torch.float32)


def ggml_fake_quant(x, kind: str, rotate: bool = False):
    """``x`` (torch, ``(..., head_dim)``) through GGML ``kind`` blocks and back: quantized per
    token in blocks of 32 along head_dim, after a Walsh-Hadamard rotation of head_dim when
    ``rotate`` (and rotated back after). Returns float32 of x's shape."""
    import torch

    from kvq.formats import ggml_dequantize, ggml_quantize

    values = x.detach().to(torch.float32)
    rotation = hadamard(values.shape[-1]) if rotate else None
    if rotation is not None:
        values = values @ rotation
    array = values.contiguous().numpy()
    back = torch.from_numpy(ggml_dequantize(ggml_quantize(array, kind), kind, array.shape))
    if rotation is not None:
        back = back @ rotation.T
    return back


def mlx_fake_quant(x, bits: int, group_size: int):
    """``x`` (torch, ``(..., head_dim)``) through ``mx.quantize``/``mx.dequantize`` (affine,
    per token along head_dim, float32 scales and biases). Returns float32 of x's shape."""
    import mlx.core as mx
    import torch

    array = mx.array(x.detach().to(torch.float32).contiguous().numpy())
    w, scales, biases = mx.quantize(array, group_size=group_size, bits=bits)
    back = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)
    return torch.from_numpy(np.array(back, dtype=np.float32))


def fake_quant_cache(model_or_config, quantizer: Callable, bits_per_element: float):
    """A transformers ``DynamicCache`` whose layers store ``quantizer(k)``, ``quantizer(v)`` for
    each new token's K/V (quantized once, on update): what an engine that keeps its cache
    quantized attends over. ``.nbytes`` is the nominal size at ``bits_per_element``."""
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

    class FakeQuantLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            return super().update(quantizer(key_states), quantizer(value_states), *args, **kwargs)

    class FakeQuantCache(DynamicCache):
        def __init__(self, layers: int) -> None:
            Cache.__init__(self, layers=[FakeQuantLayer() for _ in range(layers)])

        @property
        def nbytes(self) -> int:
            elements = sum(
                layer.keys.numel() + layer.values.numel()
                for layer in self.layers
                if layer.is_initialized
            )
            return round(elements * bits_per_element / 8)

    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config(decoder=True)
    if set(getattr(text, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        raise ValueError("the fake-quantizing peer caches serve full-attention layers only")
    return FakeQuantCache(text.num_hidden_layers)


def peer_specs() -> dict[str, CacheSpec]:
    """The peers by name: 'q8_0', 'q4_0', 'q4_1' and '+had' forms ('q4_0+had'); 'mlx-4b-g32',
    'mlx-4b-g64', 'mlx-8b-g32', 'mlx-8b-g64'; 'quanto-4', 'quanto-2', 'hqq-4', 'hqq-2'."""
    specs = {}
    for kind, bits in GGML_BITS.items():
        for rotate in (False, True):
            name = kind + ("+had" if rotate else "")
            specs[name] = CacheSpec(
                name,
                _maker(lambda x, kind=kind, rotate=rotate: ggml_fake_quant(x, kind, rotate), bits),
                "sdpa",
                bits,
            )
    for bits in (4, 8):
        for group in (32, 64):
            # stored as mlx-lm stores a half-precision model's cache: float16 scale and bias
            nominal = bits + 32 / group
            specs[f"mlx-{bits}b-g{group}"] = CacheSpec(
                f"mlx-{bits}b-g{group}",
                _maker(lambda x, b=bits, g=group: mlx_fake_quant(x, b, g), nominal),
                "sdpa",
                nominal,
            )
    for backend in ("quanto", "hqq"):
        for bits in (4, 2):
            specs[f"{backend}-{bits}"] = CacheSpec(
                f"{backend}-{bits}",
                lambda model, backend=backend, bits=bits: _quantized_cache(model, backend, bits),
                "sdpa",
                float("nan"),
            )
    return specs


def _maker(quantizer: Callable, bits: float) -> Callable:
    return lambda model: fake_quant_cache(model, quantizer, bits)


def _quantized_cache(model, backend: str, bits: int):
    from transformers.cache_utils import QuantizedCache

    return QuantizedCache(backend, config=model.config, nbits=bits)


def kvq_spec(name: str, config: QuantConfig | LayerMap) -> CacheSpec:
    """A kvq config (or a per-layer map) run through :class:`kvq.hf.KVQCache` under
    attention 'kvq'."""
    if not isinstance(config, QuantConfig | LayerMap):
        raise TypeError(
            f"config must be a kvq.QuantConfig or kvq.LayerMap, got {type(config).__name__}"
        )

    def make(model):
        from kvq.hf.cache import KVQCache

        return KVQCache(model, config)

    return CacheSpec(name, make, "kvq")  # bits measured: the cache's bytes, sinks included


def resolve_configs(configs: Iterable) -> list[CacheSpec]:
    """CacheSpecs for ``configs``: preset names (:data:`PRESETS`), peer names
    (:func:`peer_specs`), ``kvq.QuantConfig`` or ``kvq.LayerMap`` objects, paths of saved
    LayerMaps (``*.json``, as ``kvq calibrate`` writes), the maps calibrated for SmolLM2
    (:data:`SMOLLM2_NAMES`: 'q3+smollm2', ...) or ``CacheSpec`` objects."""
    if isinstance(configs, str | QuantConfig | LayerMap | CacheSpec):
        configs = [configs]
    peers = peer_specs()
    specs = []
    for position, item in enumerate(configs):
        if isinstance(item, CacheSpec):
            specs.append(item)
        elif isinstance(item, QuantConfig):
            label = "kvq " + (
                item.k.describe()
                if item.k == item.v
                else f"K {item.k.describe()} / V {item.v.describe()}"
            )
            specs.append(kvq_spec(label, item))
        elif isinstance(item, LayerMap):
            label = f"kvq layer map {item.nominal_bits_per_element:.2f} b"
            specs.append(kvq_spec(label, item))
        elif isinstance(item, str) and item.endswith(".json"):  # a saved LayerMap
            specs.append(kvq_spec(f"kvq {Path(item).stem}", LayerMap.load(item)))
        elif isinstance(item, str) and item.lower() in SMOLLM2_NAMES:  # shipped LayerMaps
            from kvq.hf.models import smollm2_layer_map

            preset = item.lower().removesuffix("+smollm2")
            specs.append(kvq_spec(f"kvq {item.lower()}", smollm2_layer_map(preset)))
        elif isinstance(item, str) and item.lower() in PRESETS:
            specs.append(kvq_spec(f"kvq {item.lower()}", PRESETS[item.lower()]()))
        elif isinstance(item, str) and item.lower() in peers:
            specs.append(peers[item.lower()])
        else:
            raise ValueError(
                f"configs[{position}] must be a kvq preset ({', '.join(PRESETS)}), a peer "
                f"({', '.join(peers)}), a SmolLM2 map ({', '.join(SMOLLM2_NAMES)}), a "
                f"LayerMap file (*.json), a kvq.QuantConfig, a kvq.LayerMap or a CacheSpec; "
                f"got {item!r}"
            )
    return specs


# --- the evaluation -------------------------------------------------------------------------


def token_ids(tokenizer, text, context: int):
    """torch int64 ``(1, context)``: the first ``context`` tokens of ``text`` (a string, or a
    sequence / array / tensor of token ids)."""
    import torch

    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("tokenizer is None: pass one, or token ids as text")
        ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        ids = text.tolist() if hasattr(text, "tolist") else list(text)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
    if len(ids) < context:
        raise ValueError(
            f"text holds {len(ids)} tokens, fewer than context={context}: pass a longer text "
            "or a smaller context"
        )
    return torch.tensor([ids[:context]], dtype=torch.int64)


def run_logits(model, ids, cache, chunk: int, step: Callable | None = None):
    """float32 ``(t, vocab)`` logits of every position of ``ids`` (``(1, t)``), fed to
    ``model`` in chunks of ``chunk`` tokens with ``cache`` carried over. ``step()`` is called
    after each chunk."""
    import inspect

    import torch

    # transformers >= 5.2x names the argument `cache` (`past_key_values` is deprecated)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    pieces = []
    with torch.inference_mode():
        for start in range(0, ids.shape[1], chunk):
            out = model(input_ids=ids[:, start : start + chunk], use_cache=True, **{name: cache})
            pieces.append(out.logits[0].to(torch.float32))
            if step is not None:
                step()
    return torch.cat(pieces)


def compare(reference_logits, logits, ids) -> tuple[float, float, float]:
    """(perplexity, mean KLD(reference || logits), top-1 agreement) over the positions that
    have a next token (all but the last), computed in float64 chunk by chunk."""
    import torch

    n = ids.shape[1] - 1
    targets = ids[0, 1:]
    nll = kld = agree = 0.0
    for start in range(0, n, 256):
        stop = min(start + 256, n)
        ref = torch.log_softmax(reference_logits[start:stop].to(torch.float64), dim=-1)
        got = torch.log_softmax(logits[start:stop].to(torch.float64), dim=-1)
        nll -= float(got.gather(1, targets[start:stop, None]).sum())
        kld += float((ref.exp() * (ref - got)).sum())
        agree += float((ref.argmax(-1) == got.argmax(-1)).sum())
    return math.exp(nll / n), kld / n, agree / n


def fill_cache(model, cache, tokens: int, seed: int = 0) -> None:
    """Fill every layer of a fresh ``cache`` with ``tokens`` random (unit normal) K/V, for
    timing decode steps at a context length without a prefill. Transformers caches take them
    through ``update``; a :class:`kvq.hf.KVQCache` (whose ``update`` hands new tokens to the
    "kvq" attention) gets one forward of token 0 under attention "kvq" first, then appends
    to each ``cache.kv(layer)``, so it holds ``tokens + 1``."""
    import torch

    text = model.config.get_text_config(decoder=True)
    heads = text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    generator = torch.Generator().manual_seed(seed)
    is_kvq = hasattr(cache, "kv") and hasattr(cache, "rows")
    if is_kvq:
        original = model.config._attn_implementation
        model.set_attn_implementation("kvq")
        try:
            run_logits(model, torch.zeros((1, 1), dtype=torch.int64), cache, 1)
        finally:
            model.set_attn_implementation(original)
    with torch.inference_mode():
        for layer in range(text.num_hidden_layers):
            k = torch.randn(1, heads, tokens, head_dim, generator=generator)
            v = torch.randn(1, heads, tokens, head_dim, generator=generator)
            if is_kvq:
                cache.kv(layer).append(k[0].numpy(), v[0].numpy())
            else:
                cache.update(k, v, layer)


def cache_bytes(cache) -> int:
    """Bytes a transformers cache holds: its ``nbytes`` when it has one; otherwise the sum
    over the tensors in its layers (quanto/HQQ quantized states included)."""
    nbytes = getattr(cache, "nbytes", None)
    if nbytes is not None:
        return int(nbytes)
    seen: set[int] = set()
    return sum(_tensor_bytes(vars(layer), seen) for layer in cache.layers)


def kv_elements(config) -> int:
    """K and V elements one token adds to a full-attention model's cache, all layers."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim


def _tensor_bytes(obj, seen: set[int]) -> int:
    import torch

    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if flatten is not None and type(obj) is not torch.Tensor:  # quanto's QTensor
            names, _ = flatten()
            return sum(_tensor_bytes(getattr(obj, name), seen) for name in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def evaluate(
    model,
    tokenizer,
    text,
    configs: Sequence = ("q8", "q4"),
    context: int = 1024,
    chunk: int = 64,
    progress: bool | None = None,
) -> EvalRows:
    """Quality of each config's KV cache against the float32 ``DynamicCache`` on the same
    tokens: perplexity, mean KL divergence and top-1 agreement of the next-token
    distributions, and cache bytes.

    model: a transformers causal LM on CPU in float32. tokenizer: its tokenizer (None when
    ``text`` is token ids). text: a string (its first ``context`` tokens are used) or token
    ids. configs: kvq preset names ('q8', 'q4', 'q3', 'q2', 'default', 'original', 'kivi2',
    'mlx4', ...), peer names ('q8_0', 'q4_0+had', 'mlx-4b-g64', 'quanto-4', 'hqq-2', ...;
    see :func:`peer_specs`), ``kvq.QuantConfig`` objects or :class:`CacheSpec` objects. The
    baseline runs under sdpa; kvq configs under "kvq"; the model's own attention
    implementation is restored at the end.
    context: tokens evaluated. chunk: tokens per forward call (decode order: the prompt is
    fed chunk by chunk, the cache carried over). progress: a tqdm bar on stderr (None: when
    the run feeds at least 4,096 tokens in all and tqdm is installed).

    Returns :class:`EvalRows`: the float32 baseline first, then one row per config.
    """
    from transformers.cache_utils import DynamicCache

    from kvq._validate import check_int

    context = check_int("context", context, 2)
    chunk = check_int("chunk", chunk, 1)
    specs = resolve_configs(configs)
    ids = token_ids(tokenizer, text, context)
    baseline = CacheSpec("float32", lambda m: DynamicCache(config=m.config), "sdpa", 32.0)
    runs = [baseline, *specs]
    steps = len(runs) * -(-context // chunk)
    bar = _progress_bar(steps, progress, steps * chunk >= 4096)
    original = model.config._attn_implementation
    rows = EvalRows()
    reference = None
    try:
        for spec in runs:
            if bar is not None:
                bar.set_description(spec.name)
            if model.config._attn_implementation != spec.attn:
                model.set_attn_implementation(spec.attn)
            cache = spec.make(model)
            started = time.perf_counter()
            logits = run_logits(model, ids, cache, chunk, bar.update if bar else None)
            seconds = time.perf_counter() - started
            if reference is None:
                reference = logits
            ppl, kld, top1 = compare(reference, logits, ids)
            base_ppl = rows[0].perplexity if rows else ppl
            nbytes = cache_bytes(cache)
            bits = spec.bits_per_element
            if math.isnan(bits):  # measured: bytes held over K/V elements held
                bits = 8 * nbytes / (kv_elements(model.config) * context)
            rows.append(
                EvalRow(
                    spec.name,
                    bits,
                    ppl,
                    100 * (ppl / base_ppl - 1),
                    kld,
                    top1,
                    nbytes,
                    seconds,
                    context,
                )
            )
            del cache, logits
    finally:
        if bar is not None:
            bar.close()
        if model.config._attn_implementation != original:
            model.set_attn_implementation(original)
    return rows


def _progress_bar(total: int, progress: bool | None, long_run: bool):
    if progress is None:
        progress = long_run
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="chunk", file=sys.stderr, leave=False)
