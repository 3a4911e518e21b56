"""kvq.LayerMap: a QuantConfig per layer as data (callable, JSON, counted by plan)."""

import pickle

import numpy as np
import pytest

import kvq

Q = kvq.QuantConfig


def three_layers() -> kvq.LayerMap:
    return kvq.LayerMap((Q.q3(), Q(k=Q.q8().k, v=Q.q3().v), Q.q4()), note="hand-made")


def test_a_layer_map_is_a_config_callable():
    layers = three_layers()
    assert len(layers) == 3
    assert layers(0) == Q.q3() and layers(2, "full_attention") == Q.q4()
    assert layers(1).k == Q.q8().k and layers(1).v == Q.q3().v
    model = kvq.ModelConfig(
        hidden_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    cache = kvq.ModelKVCache(model, layers)
    assert [cache[i].config for i in range(3)] == list(layers.configs)
    rng = np.random.default_rng(0)
    k, v = rng.standard_normal((2, 2, 200, 64)).astype(np.float32)
    for i in range(3):
        cache.append(i, k, v)
    # plan counts each layer's own config: the bytes the cache holds
    assert kvq.plan(model, 200, layers).total_bytes == cache.nbytes


def test_nominal_bits_are_the_mean_over_layers():
    layers = three_layers()
    expected = np.mean([c.nominal_bits_per_element for c in layers.configs])
    assert layers.nominal_bits_per_element == pytest.approx(expected)
    assert kvq.LayerMap((Q.q4(),) * 5).nominal_bits_per_element == Q.q4().nominal_bits_per_element


def test_json_round_trip_keeps_every_field(tmp_path):
    seeded = Q(k=kvq.Scheme(4, 32, axis=-2, rotate=True, seed=5), v=Q.q3().v, residual=16)
    layers = kvq.LayerMap((seeded, Q.kivi(2), Q.q3(pre_rope=True)), note="notes survive")
    again = kvq.LayerMap.from_json(layers.to_json())
    assert again == layers and again.configs[0].k.seed == 5 and again.configs[0].residual == 16
    assert again.configs[2].pre_rope and not again.configs[0].pre_rope
    path = tmp_path / "map.json"
    layers.save(path)
    assert kvq.LayerMap.load(path) == layers
    assert pickle.loads(pickle.dumps(layers)) == layers


def test_bad_layer_index_names_it():
    layers = three_layers()
    with pytest.raises(IndexError, match="layer_idx 3 is outside this LayerMap's 3 layers"):
        layers(3)
    with pytest.raises(IndexError, match="layer_idx -1"):
        layers(-1)
    with pytest.raises(TypeError, match="layer_idx must be an int, got bool"):
        layers(True)
    with pytest.raises(TypeError, match="layer_idx must be an int"):
        layers(1.0)


def test_bad_configs_name_the_position():
    with pytest.raises(TypeError, match=r"configs\[1\] must be a kvq.QuantConfig"):
        kvq.LayerMap((Q.q4(), "q4"))
    with pytest.raises(ValueError, match="non-empty sequence"):
        kvq.LayerMap(())
    with pytest.raises(ValueError, match="non-empty sequence"):
        kvq.LayerMap(Q.q4())
    with pytest.raises(TypeError, match="note must be a str"):
        kvq.LayerMap((Q.q4(),), note=3)


def test_from_json_refuses_what_is_not_a_layer_map():
    with pytest.raises(ValueError, match="not JSON"):
        kvq.LayerMap.from_json("{")
    with pytest.raises(ValueError, match=r"format must be 'kvq\.LayerMap/1', got None"):
        kvq.LayerMap.from_json('{"layers": []}')
    with pytest.raises(ValueError, match="format must be"):
        kvq.LayerMap.from_json("[1, 2]")
    text = three_layers().to_json().replace('"bits": 4', '"bits": 5', 1)
    with pytest.raises(ValueError, match=r"layers\[2\] is not a QuantConfig"):
        kvq.LayerMap.from_json(text)
    text = three_layers().to_json().replace('"sink_tokens"', '"sinks"', 1)
    with pytest.raises(ValueError, match=r"layers\[0\] is not a QuantConfig.*sink_tokens"):
        kvq.LayerMap.from_json(text)


def test_a_map_of_another_layer_count_is_refused():
    model = kvq.ModelConfig(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64,
    )  # fmt: skip
    with pytest.raises(ValueError, match="LayerMap of 3 layers, but the model has 2"):
        kvq.ModelKVCache(model, three_layers())
    with pytest.raises(ValueError, match="LayerMap of 3 layers, but the model has 2"):
        kvq.plan(model, 100, three_layers())


SMOLLM2 = kvq.ModelConfig(
    hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64,
)  # fmt: skip


@pytest.mark.parametrize(
    ("preset", "budget"), [("q4", 4.5), ("q3", 3.5), ("q2", 2.5), ("q3+pre_rope", 3.5)]
)
def test_the_shipped_smollm2_maps_fit_their_budgets(preset, budget):
    from importlib import resources

    from kvq.layer_map import LayerMap

    path = resources.files("kvq") / "hf" / "maps" / f"smollm2-{preset}.json"
    layer_map = LayerMap.from_json(path.read_text(encoding="utf-8"))
    assert len(layer_map) == 30
    pre_rope = preset.endswith("+pre_rope")
    base = getattr(Q, preset.removesuffix("+pre_rope"))(pre_rope=pre_rope)
    # every stream is the base's or a wider preset's, and at least one is wider
    ladder = [Q.q2(pre_rope=pre_rope), Q.q3(pre_rope=pre_rope), Q.q4(pre_rope=pre_rope)]
    ladder.append(Q.q8(pre_rope=pre_rope))
    wider = ladder[[c.k for c in ladder].index(base.k) :]
    for config in layer_map.configs:
        assert config.k in [c.k for c in wider] and config.v in [c.v for c in wider]
        assert config.sink_tokens == base.sink_tokens and config.pre_rope == pre_rope
    assert layer_map.configs != (base,) * 30
    sized = kvq.plan(SMOLLM2, 4096, layer_map, max_queries=64)
    assert 32 * sized.total_bytes / sized.float32_bytes <= budget
    assert f"base {preset.removesuffix('+pre_rope')}, at most {budget} bits" in layer_map.note


@pytest.mark.parametrize(
    ("preset", "budget"),
    [
        ("q4+channels", 4.5),
        ("q3+channels", 3.5),
        ("q2+channels", 2.5),
        ("q4+channels+values", 4.5),
        ("q3+channels+values", 3.5),
    ],
)
def test_the_shipped_smollm2_channel_maps_fit_their_budgets(preset, budget):
    """The maps of per-channel widths: keys of per-channel widths in every layer, values the
    base preset's or (+values) of per-channel widths, within the budget over 4K tokens."""
    from importlib import resources

    from kvq.layer_map import LayerMap

    path = resources.files("kvq") / "hf" / "maps" / f"smollm2-{preset}.json"
    layer_map = LayerMap.from_json(path.read_text(encoding="utf-8"))
    base = getattr(Q, preset[:2])()
    assert len(layer_map) == 30
    for config in layer_map.configs:
        assert config.k.channel_widths.shape == (3, 64) and config.k.axis == -2
        assert config.v == base.v or preset.endswith("+values")
        assert config.sink_tokens == base.sink_tokens
    per_channel_values = [c.v.channel_bits is not None for c in layer_map.configs]
    assert any(per_channel_values) == preset.endswith("+values")
    sized = kvq.plan(SMOLLM2, 4096, layer_map, max_queries=64)
    assert budget - 0.01 < 32 * sized.total_bytes / sized.float32_bytes <= budget
