"""kvq.hf.calibrate: per-layer K/V bits chosen by measured error, within a bit budget.

On a tiny random Llama (seconds). The streams' errors are measured here independently,
through kvq.hf.evaluate, and the choice checked against them.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="kvq.hf needs torch (the 'hf' extra)")
pytest.importorskip("transformers", reason="kvq.hf needs transformers")

import kvq  # noqa: E402
import kvq.hf  # noqa: E402
from kvq.hf import calibrate as _calibrate_function  # noqa: E402, F401
from kvq.hf.cache import model_config_of  # noqa: E402

cal = __import__("importlib").import_module("kvq.hf.calibrate")
Q = kvq.QuantConfig
TOKENS, CONTEXT = 128, 4096


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.from_numpy(np.random.default_rng(7).integers(0, 96, 200))


def one_stream(layers: int, stream, config) -> kvq.LayerMap:
    """q8 everywhere but ``stream`` ((layer, 'k' or 'v')), which takes config's scheme."""
    layer, which = stream
    configs = [Q.q8()] * layers
    configs[layer] = Q(k=config.k if which == "k" else Q.q8().k,
                       v=config.v if which == "v" else Q.q8().v)  # fmt: skip
    return kvq.LayerMap(tuple(configs))


def bits_of(model, layer_map) -> float:
    sized = kvq.plan(model_config_of(model.config), CONTEXT, layer_map, max_queries=64)
    return 32 * sized.total_bytes / sized.float32_bytes


def test_choose_takes_the_least_error_that_fits():
    streams = ["a", "b", "c"]
    errors = {("a", 0): 5.0, ("a", 1): 1.0, ("b", 0): 4.0, ("b", 1): 3.5, ("c", 0): 3.0}
    errors[("c", 1)] = 0.0
    sized = {(s, i): 10 * i for s in streams for i in (0, 1)}
    # room for one raise: c gains 3.0, a 4.0, b 0.5
    assert cal.choose(streams, 0, 2, errors, sized, 10) == (1, 0, 0)
    assert cal.choose(streams, 0, 2, errors, sized, 20) == (1, 0, 1)
    assert cal.choose(streams, 0, 2, errors, sized, 9) == (0, 0, 0)
    assert cal.choose(streams, 0, 2, errors, sized, 30) == (1, 1, 1)


def test_calibrate_raises_the_stream_that_gains_most_and_fits(tiny, ids):
    layers = 3
    streams = [(n, s) for n in range(layers) for s in ("k", "v")]
    measured = {}
    for level in ("q3", "q4"):
        maps = [one_stream(layers, s, getattr(Q, level)()) for s in streams]
        rows = kvq.hf.evaluate(tiny, None, ids, maps, context=TOKENS, chunk=64, progress=False)
        measured |= {(s, level): row.kld for s, row in zip(streams, rows[1:], strict=True)}
    gains = {s: measured[(s, "q3")] - measured[(s, "q4")] for s in streams}
    best = max(streams, key=gains.get)
    # a budget with room for one q3 -> q4 raise, not two, and not q8
    base = bits_of(tiny, kvq.LayerMap((Q.q3(),) * layers))
    one = bits_of(tiny, kvq.LayerMap(tuple(
        Q(k=Q.q4().k, v=Q.q3().v) if n == 0 else Q.q3() for n in range(layers))))  # fmt: skip
    bits = base + 1.5 * (one - base)
    before = tiny.config._attn_implementation
    chosen = kvq.hf.calibrate(tiny, None, bits, text=ids, tokens=TOKENS, candidates=6)
    assert tiny.config._attn_implementation == before
    assert bits_of(tiny, chosen) <= bits
    layer, which = best
    for n in range(layers):
        config = chosen(n)
        for s, scheme in (("k", config.k), ("v", config.v)):
            wanted = getattr(Q.q4() if (n, s) == best else Q.q3(), s)
            assert scheme == wanted, (n, s, best, gains)
    assert f"layer {layer} {which.upper()} q4" in chosen.note and "base q3" in chosen.note
    # one candidate: the stream that costs most at q3 is the one measured wider and raised
    costliest = max(streams, key=lambda s: measured[(s, "q3")])
    if measured[(costliest, "q3")] > measured[(costliest, "q4")]:
        chosen = kvq.hf.calibrate(tiny, None, bits, text=ids, tokens=TOKENS, candidates=1)
        raised = [(n, s) for n in range(layers) for s in ("k", "v")
                  if getattr(chosen(n), s) == getattr(Q.q4(), s)]  # fmt: skip
        assert raised == [costliest]


def test_calibrate_with_room_for_nothing_keeps_the_base(tiny, ids):
    base = bits_of(tiny, kvq.LayerMap((Q.q4(),) * 3))
    chosen = kvq.hf.calibrate(tiny, None, base + 1e-9, text=ids, tokens=TOKENS, candidates=2)
    assert chosen.configs == (Q.q4(),) * 3 and "raised: none" in chosen.note


def test_calibrate_refuses_bad_budgets(tiny, ids):
    with pytest.raises(ValueError, match=r"bits=2.0 is below the narrowest preset's 2.3"):
        kvq.hf.calibrate(tiny, None, 2.0, text=ids, tokens=TOKENS)
    with pytest.raises(TypeError, match="bits must be a finite number, got True"):
        kvq.hf.calibrate(tiny, None, True, text=ids, tokens=TOKENS)
    with pytest.raises(TypeError, match="bits must be a finite number, got nan"):
        kvq.hf.calibrate(tiny, None, float("nan"), text=ids, tokens=TOKENS)
    with pytest.raises(ValueError, match="tokens"):
        kvq.hf.calibrate(tiny, None, 3.5, text=ids, tokens=1)
    with pytest.raises(ValueError, match="fewer than context=500"):
        kvq.hf.calibrate(tiny, None, 3.5, text=ids, tokens=500)


def test_a_layer_map_of_another_model_is_refused(tiny):
    from kvq.hf.models import smollm2_layer_map

    with pytest.raises(ValueError, match="LayerMap of 30 layers, but the model has 3"):
        kvq.hf.KVQCache(tiny, smollm2_layer_map("q3"))
    with pytest.raises(ValueError, match="preset must be one of"):
        smollm2_layer_map("q8")
    assert len(kvq.hf.evaluate.__globals__["resolve_configs"](["q3+smollm2"])) == 1


# --- per-channel key widths (kvq.hf.calibrate_channels) ---------------------------------------


def test_calibrate_channels_fits_the_budget_and_follows_the_queries(tiny, ids):
    """The map fits its budget over 4K tokens (kvq.plan), spends it (within one run of 8
    channels in the whole model), keeps q4's values; a key channel pair whose queries are
    zero (q_proj rows of both query heads on KV head 0) weighs nothing and is narrowest."""
    from kvq.hf.channels import key_channel_weights

    model = __import__("copy").deepcopy(tiny)
    with torch.no_grad():
        rows = model.model.layers[1].self_attn.q_proj.weight
        for head in (0, 1):  # the query heads of KV head 0; RoPE pairs channel 5 with 37
            rows[head * 64 + 5].zero_()
            rows[head * 64 + 37].zero_()
    weights = key_channel_weights(model, None, ids, TOKENS)
    assert weights.shape == (3, 2, 64) and np.isfinite(weights).all()
    assert weights[1, 0, 5] == weights[1, 0, 37] == 0 and (weights[1, 1] > 0).all()
    layer_map = kvq.hf.calibrate_channels(model, None, 4.5, ids, TOKENS, CONTEXT)
    assert 4.5 - 8 * 8 / (3 * 2 * 64) * 0.5 < bits_of(model, layer_map) <= 4.5
    assert "base q4" in layer_map.note
    for config in layer_map.configs:
        assert config.v == Q.q4().v and config.sink_tokens == Q.q4().sink_tokens
        assert config.k.channel_widths.shape == (2, 64) and not config.k.rotate
    widths = layer_map(1).k.channel_widths
    assert widths[0, 5] == widths[0, 37] == widths.min()
    cache = kvq.hf.KVQCache(model, layer_map)
    assert cache.plan().total_bytes == kvq.plan(model_config_of(model.config), 0, layer_map,
                                                 max_queries=64).total_bytes  # fmt: skip


def test_calibrate_channels_refuses_bad_budgets(tiny, ids):
    with pytest.raises(ValueError, match="below the narrowest preset"):
        kvq.hf.calibrate_channels(tiny, None, 1.0, ids, TOKENS, CONTEXT)
    with pytest.raises(TypeError, match="finite number"):
        kvq.hf.calibrate_channels(tiny, None, float("nan"), ids, TOKENS, CONTEXT)


def test_calibrate_channels_decode_mean_fits_the_budget_in_every_group_step_on_average(tiny, ids):
    """decode_mean=True: the stored bits averaged over the 32 decode steps after CONTEXT
    (kvq.plan at each length, computed here) fit the budget, where the default map's do not;
    the map is no wider than the default and spends within one allocation step of it."""
    config = model_config_of(tiny.config)

    def mean_bits(layer_map) -> float:
        sizes = [kvq.plan(config, CONTEXT + step, layer_map, max_queries=64)
                 for step in range(32)]  # fmt: skip
        return float(np.mean([32 * s.total_bytes / s.float32_bytes for s in sizes]))

    at_end = kvq.hf.calibrate_channels(tiny, None, 4.5, ids, TOKENS, CONTEXT)
    mean = kvq.hf.calibrate_channels(tiny, None, 4.5, ids, TOKENS, CONTEXT, decode_mean=True)
    assert mean_bits(at_end) > 4.5  # the float32 keys waiting for their group
    assert 4.5 - 8 * 8 / (3 * 2 * 64) * 0.5 < mean_bits(mean) <= 4.5
    assert "mean over a key group" in mean.note
    for wide, narrow in zip(at_end.configs, mean.configs, strict=True):
        assert narrow.k.channel_widths.sum() <= wide.k.channel_widths.sum()
    with pytest.raises(TypeError, match="decode_mean must be a bool"):
        kvq.hf.calibrate_channels(tiny, None, 4.5, ids, TOKENS, CONTEXT, decode_mean="yes")


def test_calibrate_channels_values_where_per_channel_groups_err_less(tiny, ids):
    """values=True: a layer's values take per-channel widths exactly where per-channel groups
    give the smaller error at the output projection (computed here with
    kvq.attention_reference on the recorded pass), q4's values elsewhere; the map fits its
    budget; a value channel whose output columns are zero is among the narrowest. Layer 0's
    values are made to need per-channel groups: half its channels 30x the others."""
    from kvq.hf.channels import _record, value_layouts

    model = __import__("copy").deepcopy(tiny)
    with torch.no_grad():
        attention = model.model.layers[0].self_attn
        for head in range(2):
            attention.v_proj.weight[head * 64 : head * 64 + 32] *= 30.0
        for query_head in (0, 1):  # the query heads of KV head 0 read its channel 40
            attention.o_proj.weight[:, query_head * 64 + 40] = 0.0
    captured = _record(model, None, ids, TOKENS)
    per_channel = kvq.Scheme(4, 32, axis=-2, double_quant=True, search=True)
    expected = []
    for queries, keys, scale, values, out_weight in captured:
        exact = kvq.attention_reference(queries, keys, values, scale=scale)
        errors = []
        for scheme in (Q.q4().v, per_channel):
            held = values.copy()
            coded = kvq.quantize(values[:, 1:].astype(np.float32), scheme=scheme)
            held[:, 1:] = coded.dequantize()
            moved = kvq.attention_reference(queries, keys, held, scale=scale) - exact
            projected = moved.transpose(1, 0, 2).reshape(moved.shape[1], -1) @ out_weight.T
            errors.append(float(np.sum(projected**2)))
        expected.append(errors[1] < errors[0])
    assert expected[0]
    assert value_layouts(captured, Q.q4().v) == expected

    layer_map = kvq.hf.calibrate_channels(model, None, 4.5, ids, TOKENS, CONTEXT, values=True)
    assert 4.5 - 8 * 8 / (3 * 2 * 64) * 0.5 < bits_of(model, layer_map) <= 4.5
    chosen = [layer for layer, take in enumerate(expected) if take]
    assert f"values of per-channel widths in layers {chosen}" in layer_map.note
    for config, take in zip(layer_map.configs, expected, strict=True):
        if take:
            assert config.v.axis == -2 and not config.v.rotate and config.v.double_quant
            assert config.v.channel_widths.shape == (2, 64)
        else:
            assert config.v == Q.q4().v
    widths = layer_map(0).v.channel_widths
    assert widths[0, 40] == widths.min() < widths.max()
    tables = [layer_map(layer).v.channel_widths for layer in chosen]
    assert np.mean(tables) <= 4  # q4's width, spread over the chosen layers' channels
    with pytest.raises(TypeError, match="values must be a bool"):
        kvq.hf.calibrate_channels(model, None, 4.5, ids, TOKENS, CONTEXT, values=1)


def test_value_layouts_keep_per_token_groups_for_outlier_tokens():
    """Recorded layers made up here: values with a few tokens 50x the rest (a per-channel group
    holding one stretches every channel's range for 32 tokens) keep the per-token layout;
    values whose channels sit at offsets 10x their spread (constant along tokens, as a
    per-channel min holds them) take per-channel groups."""
    from kvq.hf.channels import value_layouts

    rng = np.random.default_rng(3)
    heads, kv_heads, tokens, dim = 4, 2, 96, 64
    queries = rng.standard_normal((heads, tokens, dim))
    keys = rng.standard_normal((kv_heads, tokens, dim))
    out_weight = rng.standard_normal((32, heads * dim))
    outliers = rng.standard_normal((kv_heads, tokens, dim))
    outliers[:, 10::23] *= 50.0
    channels = rng.standard_normal((kv_heads, tokens, dim)) + 10 * rng.standard_normal(dim)
    captured = [(queries, keys, 0.125, v, out_weight) for v in (outliers, channels)]
    assert value_layouts(captured, Q.q4().v) == [False, True]
