"""Per-channel code widths (``Scheme.channel_bits``): the scheme, kvq.quantize against the
NumPy reference, the KVCache that holds each head's channels widest first, attention on it
against attention_reference, and the allocation (kvq.allocation)."""

import copy
import itertools
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvq
from kvq.allocation import (
    RUN_CHANNELS,
    allocate_channel_bits,
    channel_weights,
    value_channel_weights,
)
from kvq.scheme import CHANNEL_BITS
from kvq.synthetic import kv_layer
from kvq.tensor import DoubleQuantParams, _unpack
from tests import reference
from tests.test_attention import assert_matches_reference


def table(heads: int, dim: int, seed: int = 0, widths=CHANNEL_BITS) -> np.ndarray:
    """int64 (heads, dim) widths drawn at random (every width present when there is room)."""
    rng = np.random.default_rng(seed)
    out = rng.choice(widths, (heads, dim))
    flat = out.reshape(-1)
    flat[: min(flat.size, len(widths))] = widths[: flat.size]
    return rng.permuted(out, axis=1)


def mixed(widths, group=32, dq=True, search=True, half=False) -> kvq.Scheme:
    return kvq.Scheme(
        int(np.max(widths)), group, axis=-2, double_quant=dq, search=search,
        scale_dtype="float16" if half else "float32", channel_bits=widths,
    )  # fmt: skip


def keys_config(widths, group=32, dq=True, search=True, **options) -> kvq.QuantConfig:
    return kvq.QuantConfig(k=mixed(widths, group, dq, search), v=kvq.QuantConfig.q4().v, **options)


# --- the scheme ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"bits": 6, "channel_bits": [[6, 7]]}, ValueError, r"channel_bits\[0, 1\] is 7"),
        ({"bits": 4, "channel_bits": [[6, 4]]}, ValueError, "widest of channel_bits \\(6\\)"),
        ({"bits": 2, "channel_bits": [[2.0, 2.0]]}, TypeError, "integers"),
        ({"bits": 2, "channel_bits": []}, ValueError, "non-empty"),
        ({"bits": 2, "channel_bits": 2}, ValueError, "non-empty"),
        ({"bits": 2, "axis": -1, "channel_bits": [2]}, ValueError, "axis=-2"),
        ({"bits": 2, "rotate": True, "channel_bits": [2]}, ValueError, "rotation"),
    ],
)
def test_scheme_refuses_bad_widths(options, error, match):
    options = {"axis": -2, **options}
    with pytest.raises(error, match=match):
        kvq.Scheme(**options)


def test_scheme_holds_widths_as_data():
    widths = np.array([[8, 1, 5, 6], [3, 3, 2, 4]])
    scheme = mixed(widths, dq=False, search=False)
    assert scheme.channel_bits == ((8, 1, 5, 6), (3, 3, 2, 4))  # hashable, JSON-able
    assert hash(scheme) == hash(mixed(widths.tolist(), dq=False, search=False))
    np.testing.assert_array_equal(scheme.channel_widths, widths)
    assert scheme.mean_bits == 4.0
    assert scheme.nominal_bits_per_element == 4.0 + 64 / 32  # float32 scale and min per 32
    assert scheme.describe() == "int1-8:4.00 g32 axis-2 f32"
    with pytest.raises(ValueError, match="pre_rope"):
        kvq.QuantConfig(k=scheme, pre_rope=True)


def test_layer_map_keeps_widths_through_json(tmp_path):
    layers = kvq.LayerMap((keys_config(table(2, 16, 1)), keys_config(table(2, 16, 2))), "x")
    path = tmp_path / "map.json"
    layers.save(path)
    back = kvq.LayerMap.load(path)
    assert back == layers
    assert back(1).k.channel_bits == layers(1).k.channel_bits


# --- kvq.quantize -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "widths_shape", "group"),
    [((3, 96, 64), (3, 64), 32), ((2, 37, 8), (2, 8), 16), ((2, 3, 20, 16), (3, 16), 7),
     ((5, 9), (9,), 4)],
)  # fmt: skip
@pytest.mark.parametrize("half", [False, True])
def test_codes_and_params_equal_reference(shape, widths_shape, group, half, rng):
    """min/max codes (packed, each channel from its own byte) and float32 or float16 params
    exactly as the row-by-row NumPy reference computes them, and dequantized bit for bit."""
    x = (rng.standard_normal(shape) * rng.uniform(0.05, 8, shape[-1])).astype(np.float32)
    widths = table(*widths_shape, seed=3) if len(widths_shape) == 2 else table(1, 9, 3)[0]
    qt = kvq.quantize(x, scheme=mixed(widths, group, dq=False, search=False, half=half))
    codes, scales, mins, _ = reference.quantize_channels(
        x, widths, group, "float16" if half else "float32"
    )
    np.testing.assert_array_equal(qt.codes, codes)
    np.testing.assert_array_equal(qt.params.scales.astype(np.float32), scales)
    np.testing.assert_array_equal(qt.params.mins.astype(np.float32), mins)
    assert qt.nbytes == codes.nbytes + 2 * scales.size * (2 if half else 4)
    values = reference.dequantize_blocks(
        _codes_of(codes, x, widths, group), scales, mins, group
    )  # row by row of the moved tensor, groups padded as kvq pads them
    moved = np.moveaxis(x, -2, -1)
    length = moved.shape[-1]
    values = values.reshape(-1, -(-length // group) * group)[:, :length]
    expected = np.moveaxis(values.reshape(moved.shape), -1, -2)
    np.testing.assert_array_equal(qt.dequantize(), expected)


def _codes_of(packed, x, widths, group) -> np.ndarray:
    """The reference's packed codes unpacked row by row (slow, obvious): one code per element
    of x with axis -2 moved last, in groups of ``group`` (a row's last group padded)."""
    moved = np.moveaxis(x, -2, -1)
    length = moved.shape[-1]
    row_widths = np.broadcast_to(widths, moved.shape[:-1]).reshape(-1)
    stream = int.from_bytes(packed.tobytes(), "little")
    out, at = [], 0
    padded = -(-length // group) * group
    for width in row_widths:
        width = int(width)
        row = [(stream >> (8 * at + i * width)) & ((1 << width) - 1) for i in range(length)]
        out.extend(row + [0] * (padded - length))
        at += -(-length * width // 8)
    return np.array(out, np.uint8)


def test_double_quant_codes_equal_reference():
    """The 6-bit second-level codes and float16 steps of groups of several widths, per-group
    levels, exactly as the format's definition (reference.double_quant_params)."""
    k, _ = kv_layer(3, 160, 64, seed=4)
    widths = table(3, 64, 5)
    qt = kvq.quantize(k, scheme=mixed(widths, dq=True, search=False))
    rows = np.ascontiguousarray(np.moveaxis(k, -2, -1)).reshape(-1, 160)
    levels = np.repeat(2.0 ** widths.reshape(-1) - 1, 160 // 32)
    sc, mc, d, dmin = reference.double_quant_params(rows, 32, levels)
    p = qt.params
    assert isinstance(p, DoubleQuantParams)
    np.testing.assert_array_equal(_unpack(p.scale_codes, 6, p.n_groups), sc)
    np.testing.assert_array_equal(_unpack(p.min_codes, 6, p.n_groups), mc)
    np.testing.assert_array_equal(p.super_scales.astype(np.float32), d)
    np.testing.assert_array_equal(p.super_mins.astype(np.float32), dmin)
    bound = reference.double_quant_error_bound(rows, 32, levels)
    got = np.ascontiguousarray(np.moveaxis(qt.dequantize(), -2, -1)).reshape(-1, 160)
    errors = reference.row_groups(np.abs(got.astype(np.float64) - rows), 32)
    assert np.all(np.array([e.max() for e in errors]) <= bound)


def test_search_is_no_worse_than_min_max_per_group(rng):
    """The range search keeps min/max when nothing beats it: each group's squared error is at
    most the reference min/max error of that group at its width."""
    x = (rng.standard_normal((2, 64, 32)) * rng.uniform(0.1, 5, 32)).astype(np.float32)
    x[:, 5, 3] = 40.0  # an outlier that clipping should help with
    widths = table(2, 32, 6)
    got = kvq.quantize(x, scheme=mixed(widths, dq=False, search=True)).dequantize()
    plain = kvq.quantize(x, scheme=mixed(widths, dq=False, search=False)).dequantize()
    moved = [np.moveaxis(a, -2, -1).reshape(-1, 64) for a in (x, got, plain)]
    found = reference.row_groups((moved[1] - moved[0]).astype(np.float64) ** 2, 32)
    baseline = reference.row_groups((moved[2] - moved[0]).astype(np.float64) ** 2, 32)
    for ours, theirs in zip(found, baseline, strict=True):
        assert ours.sum() <= theirs.sum() * (1 + 1e-6) + 1e-12
    assert sum(f.sum() for f in found) < sum(b.sum() for b in baseline)


@settings(max_examples=40, deadline=None)
@given(
    heads=st.integers(1, 3),
    tokens=st.integers(1, 70),
    runs=st.integers(1, 3),
    group=st.sampled_from([1, 3, 8, 32]),
    seed=st.integers(0, 2**16),
    spread=st.floats(1e-3, 1e3),
)
def test_error_within_half_the_reference_step(heads, tokens, runs, group, seed, spread):
    """On any finite input: every element within half its group's min/max step (computed by
    the reference from the input, at the channel's width), plus float32 rounding."""
    rng = np.random.default_rng(seed)
    dim = 8 * runs
    x = (rng.standard_normal((heads, tokens, dim)) * spread).astype(np.float32)
    widths = table(heads, dim, seed % 7)
    got = kvq.quantize(x, scheme=mixed(widths, group, dq=False, search=False)).dequantize()
    _, scales, _, _ = reference.quantize_channels(x, widths, group)
    moved = np.moveaxis(x, -2, -1).reshape(-1, tokens)
    bound = reference.error_bound(_padded(moved, group), scales, group)
    error = np.abs(np.moveaxis(got, -2, -1).reshape(-1, tokens) - moved).astype(np.float64)
    assert np.all(error <= _unpadded(bound, moved.shape, group))


def _padded(rows: np.ndarray, group: int) -> np.ndarray:
    length = rows.shape[1]
    padded = -(-length // group) * group
    return np.concatenate([rows, np.repeat(rows[:, -1:], padded - length, axis=1)], axis=1)


def _unpadded(bound: np.ndarray, shape, group: int) -> np.ndarray:
    rows, length = shape
    padded = -(-length // group) * group
    return bound.reshape(rows, padded)[:, :length]


def test_widths_that_do_not_fit_the_tensor_raise(rng):
    x = rng.standard_normal((2, 10, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="trailing axes"):
        kvq.quantize(x, scheme=mixed(table(3, 64), dq=False, search=False))
    with pytest.raises(ValueError, match=r"must be finite|finite values"):
        bad = x.copy()
        bad[1, 2, 3] = np.nan
        kvq.quantize(bad, scheme=mixed(table(2, 64), dq=False, search=False))


# --- the KVCache ----------------------------------------------------------------------------


def test_cache_reads_back_its_keys_in_the_models_channel_order():
    """Held widest first, read back in order: keys() equals each 32-token chunk quantized
    alone in the model's order (min/max, float32 params: channels are independent), the
    last tokens exact, whatever the appends."""
    k, v = kv_layer(3, 150, 64, seed=7)
    widths = table(3, 64, 8)
    cache = kvq.KVCache(3, 64, keys_config(widths, dq=False, search=False, sink_tokens=0))
    for lo, hi in [(0, 70), (70, 71), (71, 129), (129, 150)]:
        cache.append(k[:, lo:hi], v[:, lo:hi])
    scheme = mixed(widths, dq=False, search=False)
    expected = k.copy()
    for lo in range(0, 128, 32):
        expected[:, lo : lo + 32] = kvq.quantize(k[:, lo : lo + 32], scheme=scheme).dequantize()
    np.testing.assert_array_equal(cache.keys(), expected)
    assert (cache.keys(128, 150) == k[:, 128:]).all()


def test_cache_counts_its_width_table(rng):
    widths = table(3, 64, 9)
    config = keys_config(widths)
    cache = kvq.KVCache(3, 64, config)
    k, v = kv_layer(3, 200, 64, seed=2)
    cache.append(k, v)
    chunk_bytes = kvq.quantize(k[:, :32], scheme=config.k).nbytes
    sinks = 3 * 64 * 4  # the exact first token
    pending = 3 * (200 - 192) * 64 * 4
    assert cache._k.nbytes == 6 * chunk_bytes + sinks + pending + widths.size
    model = kvq.ModelConfig(
        num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        hidden_size=576,
    )  # fmt: skip
    assert kvq.plan(model, 200, config).total_bytes == cache.nbytes


def test_cache_refuses_widths_of_another_shape_and_stays_usable():
    with pytest.raises(ValueError, match=r"config.k.channel_bits has shape \(2, 64\)"):
        kvq.KVCache(3, 64, keys_config(table(2, 64)))


def test_copies_pickles_and_truncation_keep_the_order():
    k, v = kv_layer(2, 100, 64, seed=11)
    cache = kvq.KVCache(2, 64, keys_config(table(2, 64, 12)))
    cache.append(k, v)
    keys = cache.keys()
    for twin in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        np.testing.assert_array_equal(twin.keys(), keys)
    cache.truncate(64)
    np.testing.assert_array_equal(cache.keys(), keys[:, :64])


# --- attention -------------------------------------------------------------------------------

SHAPES = [(9, 3, 64), (4, 4, 128), (16, 4, 128), (14, 2, 64), (16, 2, 64)]  # GQA 3, 1, 4, 7, 8


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), SHAPES)
@pytest.mark.parametrize("t_q", [1, 5])
def test_attention_matches_reference(heads, kv_heads, dim, t_q, threads):
    """Keys of seven widths (one run per width a head, runs of every length): scores from the
    codes (at most 4 rows per KV head), or decoded to scratch (more), residual tokens after
    them and the exact sink token, within 1e-5 of float64 attention over the cache."""
    k, v = kv_layer(kv_heads, 1013, dim, seed=heads)
    cache = kvq.KVCache(kv_heads, dim, keys_config(table(kv_heads, dim, dim)), max_queries=8)
    cache.append(k[:, :1000], v[:, :1000])
    for i in range(1000, 1013):
        cache.append(k[:, i : i + 1], v[:, i : i + 1])
    q = np.random.default_rng(t_q).standard_normal((heads, t_q, dim)).astype(np.float32)
    ref = kvq.attention_reference(q, cache.keys(), cache.values())
    assert_matches_reference(kvq.attention(q, cache), ref)


@pytest.mark.parametrize("group", [16, 64])
@pytest.mark.parametrize("window", [None, 100])
def test_attention_with_other_groups_and_windows(group, window, threads):
    """Chunks of 16 tokens (codes read one at a time) and of 64 (two runs of 32 a channel),
    a windowed ring and per-channel values of several widths (the token-at-a-time decoder)."""
    k, v = kv_layer(2, 300, 64, seed=group)
    config = kvq.QuantConfig(
        k=mixed(table(2, 64, 1), group), v=mixed(table(2, 64, 2), group, search=False),
        residual=5,
    )  # fmt: skip
    cache = kvq.KVCache(2, 64, config, window=window, max_queries=4)
    for lo in range(0, 300, 50):
        cache.append(k[:, lo : lo + 50], v[:, lo : lo + 50])
    q = np.random.default_rng(3).standard_normal((6, 4, 64)).astype(np.float32)
    # a ring holds at least the window: the reference over what it holds, windowed alike
    ref = kvq.attention_reference(q, cache.keys(), cache.values(), window=window)
    assert_matches_reference(kvq.attention(q, cache), ref)


def test_attention_on_sinks_and_prefill_chunks(threads):
    """A prefill chunk of 40 query tokens over the codes, with GPT-OSS sink logits."""
    k, v = kv_layer(2, 200, 64, seed=5)
    cache = kvq.KVCache(2, 64, keys_config(table(2, 64, 4)), max_queries=64)
    cache.append(k, v)
    q = np.random.default_rng(8).standard_normal((8, 40, 64)).astype(np.float32)
    sinks = np.linspace(-1, 2, 8)
    ref = kvq.attention_reference(q, cache.keys(), cache.values(), sinks=sinks)
    assert_matches_reference(kvq.attention(q, cache, sinks=sinks), ref)


# --- allocation -------------------------------------------------------------------------------


def test_allocation_spends_the_budget_in_runs_of_channels(rng):
    weights = rng.lognormal(0, 2, (5, 3, 64))
    widths = allocate_channel_bits(weights, 4.2)
    assert widths.shape == weights.shape and widths.dtype == np.int64
    assert 4.2 - 2 * RUN_CHANNELS / widths.size <= widths.mean() <= 4.2
    assert set(np.unique(widths)) <= set(CHANNEL_BITS)
    for head, w in zip(weights.reshape(-1, 64), widths.reshape(-1, 64), strict=True):
        order = np.argsort(-head, kind="stable")
        runs = w[order].reshape(-1, RUN_CHANNELS)
        assert (runs == runs[:, :1]).all()  # one width a run of channels
        assert (np.diff(runs[:, 0]) <= 0).all()  # heavier runs are no narrower


def test_allocation_is_optimal_on_small_cases():
    """Greedy widening is exact for a convex cost and consecutive widths: against every
    assignment of widths 1-4 to four runs that fits the budget."""
    weights = np.array([[[50.0] * 8 + [3.0] * 8], [[0.2] * 8 + [9.0] * 8]])  # 2 heads of 16
    for mean in (1.0, 1.5, 2.25, 3.0, 3.5):
        widths = allocate_channel_bits(weights, mean, (1, 2, 3, 4))
        got = (weights / (2.0**widths - 1) ** 2).sum()
        runs = weights.reshape(4, 8).sum(axis=1)
        best = min(
            sum(r / (2.0**w - 1) ** 2 for r, w in zip(runs, choice, strict=True))
            for choice in itertools.product((1, 2, 3, 4), repeat=4)
            if sum(choice) * 8 <= mean * 32
        )
        assert got == pytest.approx(best)


def test_channel_weights_are_query_energy_times_squared_range(rng):
    q = rng.standard_normal((6, 70, 16))
    k = rng.standard_normal((2, 70, 16)) * np.arange(1, 17)
    got = channel_weights(q, k, group_size=32, first=3)
    for head in range(2):
        for d in range(16):
            energy = np.mean(q[3 * head : 3 * head + 3, 3:, d] ** 2)
            groups = [k[head, 3 + 32 * g : 3 + 32 * (g + 1), d] for g in range(2)]
            spread = np.mean([(g.max() - g.min()) ** 2 for g in groups])
            assert got[head, d] == pytest.approx(energy * spread)


def test_value_channel_weights_are_output_column_energy_times_squared_range(rng):
    """Two KV heads of 16 under six query heads (three each): a value channel's weight sums
    the squared output-projection columns of its three query heads, times its mean squared
    group range."""
    v = rng.standard_normal((2, 70, 16)) * np.arange(1, 17)
    out = rng.standard_normal((24, 6 * 16))
    got = value_channel_weights(v, out, group_size=32, first=3)
    for head in range(2):
        for d in range(16):
            columns = [out[:, (3 * head + j) * 16 + d] for j in range(3)]
            energy = sum(float(np.sum(c**2)) for c in columns)
            groups = [v[head, 3 + 32 * g : 3 + 32 * (g + 1), d] for g in range(2)]
            spread = np.mean([(g.max() - g.min()) ** 2 for g in groups])
            assert got[head, d] == pytest.approx(energy * spread)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: value_channel_weights(np.ones((2, 40, 8)), np.ones((4, 24))), "multiple"),
        (lambda: value_channel_weights(np.ones((2, 40, 8)), np.ones(32)), "2-D float"),
        (lambda: value_channel_weights(np.ones((2, 20, 8)), np.ones((4, 32))), "at least one"),
        (lambda: value_channel_weights(np.ones((2, 40, 8)), np.full((4, 32), np.nan)), "finite"),
        (lambda: allocate_channel_bits(np.ones((2, 12)), 4), "multiple of 8"),
        (lambda: allocate_channel_bits(-np.ones((2, 16)), 4), "non-negative"),
        (lambda: allocate_channel_bits(np.ones((2, 16)), 0.5), "below the narrowest"),
        (lambda: allocate_channel_bits(np.ones((2, 16)), 4, (2, 7)), "taken from"),
        (lambda: channel_weights(np.ones((3, 40, 8)), np.ones((2, 40, 8))), "multiple"),
        (lambda: channel_weights(np.ones((2, 20, 8)), np.ones((2, 20, 8))), "at least one"),
        (lambda: channel_weights(np.ones((2, 40, 8)), np.full((2, 40, 8), np.inf)), "finite"),
    ],
)
def test_allocation_refuses_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
