"""One name per idea across the API, the defaults, and the deprecated aliases (issue 12)."""

import warnings

import numpy as np
import pytest

import kvq
from kvq.cli import main


def kv(tokens=40, heads=2, dim=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, heads, tokens, dim)).astype(np.float32)


# --- defaults -------------------------------------------------------------------------------


def test_default_config_is_q8_and_original_stays_reachable():
    assert kvq.QuantConfig() == kvq.QuantConfig.q8()
    original = kvq.QuantConfig.original()
    assert original.k == original.v == kvq.Scheme(8, 32, axis=-1, scale_dtype="float32")
    assert original.nominal_bits_per_element == 10
    k, v = kv()
    cache = kvq.KVCache(2, 64)
    cache.append(k, v)
    assert cache.config == kvq.QuantConfig.q8()


# --- conflicting arguments ------------------------------------------------------------------


def test_quantize_refuses_scheme_with_keywords():
    x = kv()[0]
    with pytest.raises(ValueError, match=r"scheme= or the scheme's keywords.*bits=2"):
        kvq.quantize(x, bits=2, group_size=64, scheme=kvq.Scheme(8))
    with pytest.raises(TypeError, match=r"scheme must be a kvq\.Scheme"):
        kvq.quantize(x, scheme="q8")
    # either alone is fine, and keywords take Scheme's defaults
    assert kvq.quantize(x, scheme=kvq.Scheme(4)).scheme == kvq.Scheme(4)
    assert kvq.quantize(x, bits=4).scheme == kvq.Scheme(4)
    assert kvq.quantize(x).scheme == kvq.Scheme()


def test_quant_config_rotate_conflicting_with_a_scheme_raises():
    q8 = kvq.QuantConfig.q8()  # keys rotated with seed 0
    with pytest.raises(ValueError, match="conflicts with k's own rotation"):
        kvq.QuantConfig(k=q8.k, v=q8.v, rotate=1)
    with pytest.raises(ValueError, match="conflicts with seed=2"):
        kvq.Scheme(rotate=3, seed=2)


# --- bools where integers are meant ---------------------------------------------------------


def test_bools_refused_where_integers_are_meant():
    k, v = kv()
    cache = kvq.KVCache(2, 64, kvq.QuantConfig.original())
    cache.append(k, v)
    for call in (
        lambda: cache.keys(True, 3),
        lambda: cache.values(0, np.True_),
        lambda: kvq.Scheme(seed=True),
        lambda: kvq.Scheme(bits=True),
        lambda: kvq.QuantConfig(residual=False),
        lambda: kvq.KVCache(2, 64, capacity=True),
    ):
        with pytest.raises(TypeError, match="integer"):
            call()
    model = kvq.ModelKVCache(
        kvq.ModelConfig(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            hidden_size=256,
        )
    )
    with pytest.raises(TypeError, match="layer must be an integer"):
        model[True]
    with pytest.raises(TypeError, match="layer must be an integer"):
        model.append(True, k, v)
    assert len(model[1]) == 0  # nothing was appended anywhere


# --- one name per idea ----------------------------------------------------------------------


def test_bits_per_element_measured_and_nominal():
    k, v = kv(tokens=64)
    config = kvq.QuantConfig.q4()
    cache = kvq.KVCache(2, 64, config)
    cache.append(k, v)
    measured = 8 * cache.nbytes / (2 * k.size)
    assert cache.bits_per_element == pytest.approx(measured, rel=1e-12)
    assert cache.stats()["bits_per_element"] == cache.bits_per_element
    assert config.nominal_bits_per_element == 4.375
    qt = kvq.quantize(k, scheme=config.k)
    assert qt.bits_per_element == 8 * qt.nbytes / k.size
    assert config.k.nominal_bits_per_element == 4.5
    blocks = kvq.QuantizedKVCache.quantize(k, v, block_size=32)
    assert blocks.bits_per_element == 8 * blocks.nbytes / (2 * k.size) == 10.0
    assert blocks.group_size == blocks.block_size == 32


def test_quantized_kv_cache_is_quantize_over_the_flat_tensor():
    """The phase-3 interface runs the same 8-bit min/max machinery as kvq.quantize."""
    k, v = kv(tokens=37, dim=48, seed=3)
    cache = kvq.QuantizedKVCache.quantize(k, v, block_size=32)
    for tensor, flat in ((cache.dequant_k(), k), (cache.dequant_v(), v)):
        qt = kvq.quantize(flat.reshape(-1), bits=8, group_size=32)
        np.testing.assert_array_equal(tensor, qt.dequantize())


def test_describe_names_the_axis_without_assuming_a_layout():
    assert kvq.Scheme(4, 32, axis=-2, double_quant=True).describe() == "int4 g32 axis-2 dq"
    assert kvq.Scheme(8, 64, axis=1, rotate=True, seed=7).describe() == "int8 g64 axis1 f32 rot7"
    cache = kvq.KVCache(2, 64, kvq.QuantConfig.q8())
    assert "axis-2 dq search rot0 (per channel)" in repr(cache)
    assert "axis-1 dq search rot0 (per token)" in repr(cache)


def test_rotation_is_a_flag_and_a_seed():
    scheme = kvq.Scheme(rotate=True)
    assert scheme.rotate is True and scheme.seed == 0 and scheme.rotation_seed == 0
    assert kvq.Scheme().rotation_seed is None and kvq.Scheme(rotate=None).rotate is False
    assert kvq.Scheme(rotate=True, seed=9).rotation_seed == 9


# --- deprecated aliases: they work for one release, with a DeprecationWarning ---------------


def test_deprecated_integer_rotate_is_a_seed():
    with pytest.warns(DeprecationWarning, match="rotate=True, seed=3"):
        old = kvq.Scheme(4, 32, rotate=3)
    assert old == kvq.Scheme(4, 32, rotate=True, seed=3)
    with pytest.warns(DeprecationWarning):
        old_quantized = kvq.quantize(kv()[0], bits=4, rotate=0)
    assert old_quantized.scheme == kvq.Scheme(4, rotate=True, seed=0)


def test_deprecated_quant_config_rotate_sets_both_schemes():
    with pytest.warns(DeprecationWarning, match="QuantConfig\\(rotate=...\\) is deprecated"):
        config = kvq.QuantConfig(k=kvq.Scheme(4), v=kvq.Scheme(4), rotate=5)
    assert config.k.rotation_seed == config.v.rotation_seed == 5


def test_deprecated_levels_and_config_bits_per_element():
    with pytest.warns(DeprecationWarning, match="max_code"):
        assert kvq.Scheme(3).levels == 7 == kvq.Scheme(3).max_code
    with pytest.warns(DeprecationWarning, match="nominal_bits_per_element"):
        assert kvq.QuantConfig.q4().bits_per_element == 4.375


def test_deprecated_stats_key():
    k, v = kv()
    cache = kvq.KVCache(2, 64)
    cache.append(k, v)
    stats = cache.stats()
    with pytest.warns(DeprecationWarning, match="bits_per_element"):
        assert stats["bits_per_value"] == stats["bits_per_element"]
    with pytest.warns(DeprecationWarning):
        assert stats.get("bits_per_value") == stats["bits_per_element"]
    assert "bits_per_value" not in stats and stats.get("missing", 1) == 1


def test_new_names_do_not_warn():
    k, v = kv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = kvq.QuantConfig.q4()
        cache = kvq.KVCache(2, 64, config)
        cache.append(k, v)
        assert cache.stats()["bits_per_element"] > 0
        assert config.nominal_bits_per_element == 4.375
        assert kvq.Scheme(4, rotate=True, seed=1).max_code == 15
        kvq.plan(kvq.ModelConfig.gpt_oss_20b(), 100).table()


def test_cli_group_size_and_its_deprecated_spelling(capsys):
    assert main(["demo", "--group-size", "0"]) == 2
    assert "--group-size must be >= 1" in capsys.readouterr().err
    assert main(["demo", "--block-size", "0"]) == 2  # the old spelling still parses
