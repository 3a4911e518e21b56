"""kvq.hf: KVQCache and the "kvq" attention inside transformers, on tiny random models.

The target check: in every layer and call (prefill chunks and decode steps), the "kvq"
attention output equals float64 attention (kvq.attention_reference) over the same cache's
dequantized keys and values to a relative error of 1e-5.
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="kvq.hf needs torch (the 'hf' extra)")
transformers = pytest.importorskip("transformers", reason="kvq.hf needs transformers")

import kvq  # noqa: E402
import kvq.hf  # noqa: E402
from kvq.hf import attention as hf_attention  # noqa: E402

TOLERANCE = 1e-5
SMALL = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
SMALL |= {"intermediate_size": 64, "vocab_size": 97, "pad_token_id": 0}


def make(name: str):
    """A tiny random model (float32, eval mode) with attn_implementation "kvq"."""
    torch.manual_seed(0)
    if name == "llama":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**SMALL, num_hidden_layers=2)
        )
    elif name == "qwen3":
        config = transformers.Qwen3Config(**SMALL, num_hidden_layers=2)
        model = transformers.Qwen3ForCausalLM(config)
    else:  # GPT-OSS: alternating sliding (window 8) and full layers, sinks
        config = transformers.GptOssConfig(
            **SMALL, num_hidden_layers=4, sliding_window=8, num_local_experts=4,
            num_experts_per_tok=2,
        )  # fmt: skip
        model = transformers.GptOssForCausalLM(config)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_()  # initialised to zeros otherwise
    model.eval()
    model.set_attn_implementation("kvq")
    return model


@pytest.fixture(scope="module")
def models():
    return {name: make(name) for name in ("llama", "qwen3", "gpt_oss")}


class Checker:
    """Wraps the registered "kvq" attention: after each call, compares every batch row with
    float64 attention over what the row's cache holds (dequantized), from the first unpadded
    position; ``shadow`` also keeps an unwindowed twin of each cache (same chunks, same
    codes) to check prefill chunks longer than a sliding layer's max_queries."""

    def __init__(self, shadow: bool = False):
        self.errors: list[tuple[int, int, int, float]] = []  # (layer, row, t_q, error)
        self.shadow = {} if shadow else None

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        layer = key._kvq_layer
        k_new, v_new = key.detach().numpy().copy(), value.detach().numpy().copy()
        out, weights = hf_attention.kvq_attention(
            module, query, key, value, attention_mask, **kwargs
        )
        owner, index = layer.owner, layer.layer_idx
        sinks = kwargs.get("s_aux")
        sinks = None if sinks is None else sinks.detach().numpy()
        for row in range(len(owner.rows)):
            cache = owner.kv(index, row)
            if self.shadow is not None:
                # the twin takes the same pieces (a sliding layer attends a long chunk in
                # pieces of max_queries, each over what the cache held then: tokens still in
                # the float32 residual are exact), so each piece is checked against the
                # twin as it was when that piece attended
                twin = self.shadow.setdefault(
                    (index, row), kvq.KVCache(cache.num_kv_heads, cache.head_dim, cache.config)
                )
                step = owner.max_queries if cache.window is not None else query.shape[2]
                got = out[row].transpose(0, 1).numpy()
                worst = 0.0
                for lo in range(0, query.shape[2], step):
                    hi = min(query.shape[2], lo + step)
                    twin.append(k_new[row, :, lo:hi], v_new[row, :, lo:hi])
                    ref = kvq.attention_reference(
                        query[row, :, lo:hi].numpy(), twin.keys(), twin.values(),
                        scale=kwargs.get("scaling"), sinks=sinks, window=cache.window,
                    )  # fmt: skip
                    worst = max(
                        worst, float(np.abs(got[:, lo:hi] - ref).max() / np.abs(ref).max())
                    )
                self.errors.append((index, row, query.shape[2], worst))
                continue
            else:
                keys, values, first = cache.keys(), cache.values(), int(cache.positions[0])
            start = 0
            if attention_mask is not None:
                start = int(np.argmax(attention_mask[row].numpy()))
            # queries at padded positions see nothing (zeros); the rest see from ``start``
            t_q = query.shape[2]
            padded = max(0, start - (len(cache) - t_q))
            got = out[row].transpose(0, 1).numpy()
            assert not got[:, :padded].any()
            skip = max(0, start - first)
            ref = kvq.attention_reference(
                query[row, :, padded:].numpy(), keys[:, skip:], values[:, skip:],
                scale=kwargs.get("scaling"), sinks=sinks, window=cache.window,
            )  # fmt: skip
            error = float(np.abs(got[:, padded:] - ref).max() / np.abs(ref).max())
            self.errors.append((index, row, query.shape[2], error))
        return out, weights


@pytest.fixture
def checker(monkeypatch):
    def install(shadow=False):
        check = Checker(shadow)
        monkeypatch.setitem(transformers.AttentionInterface._global_mapping, "kvq", check)
        return check

    return install


def forward_chunks(model, cache, ids, sizes, mask=None):
    """Feed ``ids`` through the model in chunks of ``sizes`` tokens; the last logits."""
    at = 0
    with torch.no_grad():
        for size in sizes:
            kwargs = {} if mask is None else {"attention_mask": mask[:, : at + size]}
            out = model(input_ids=ids[:, at : at + size], cache=cache, use_cache=True, **kwargs)
            at += size
    return out.logits


def sdpa_logits(model, ids):
    """The last position's logits of ``ids`` under sdpa on float32 keys (no kvq cache)."""
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits[:, -1:]
    finally:
        model.set_attn_implementation("kvq")


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt_oss"])
def test_every_layer_matches_float64_attention(models, checker, name):
    model = models[name]
    check = checker()
    cache = kvq.hf.KVQCache(model, kvq.QuantConfig.q4(), max_queries=16)
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    # prefill chunks of 16 and 5, then decode steps well past GPT-OSS's window of 8
    sizes = [16, 5] + [1] * 19
    forward_chunks(model, cache, ids, sizes)
    layers = model.config.num_hidden_layers
    assert len(check.errors) == 2 * layers * len(sizes)
    worst = max(error for *_, error in check.errors)
    assert worst <= TOLERANCE, [e for e in check.errors if e[-1] > TOLERANCE][:5]
    assert cache.get_seq_length() == 40 and len(cache.kv(0, 1)) == 40


@pytest.mark.parametrize("name", ["llama", "gpt_oss"])
def test_keys_before_rope_match_float64_attention(models, checker, name):
    """pre_rope caches take the model's own RoPE frequencies (GPT-OSS: YaRN-scaled), and
    each call equals float64 attention over the keys they read back (RoPE applied)."""
    model = models[name]
    check = checker()
    cache = kvq.hf.KVQCache(model, kvq.QuantConfig.q4(pre_rope=True), max_queries=16)
    freqs = model.model.rotary_emb.inv_freq.to(torch.float64).numpy()
    np.testing.assert_array_equal(cache.rope.inverse_frequencies, freqs)
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    forward_chunks(model, cache, ids, [16, 5] + [1] * 19)
    worst = max(error for *_, error in check.errors)
    assert worst <= TOLERANCE, [e for e in check.errors if e[-1] > TOLERANCE][:5]
    assert cache.kv(1).rope is cache.rope


def test_keys_before_rope_keep_the_logits(models):
    """8-bit codes before RoPE: logits as close to sdpa on float32 keys as q8's, so the
    cache turns each key back by the angle it took off (a wrong one would not be close)."""
    model = models["llama"]
    ids = torch.randint(1, 97, (1, 24), generator=torch.Generator().manual_seed(5))
    cache = kvq.hf.KVQCache(model, kvq.QuantConfig.q8(pre_rope=True))
    logits = forward_chunks(model, cache, ids, [16, 1, 7])
    expected = sdpa_logits(model, ids)
    assert torch.allclose(logits[:, -1:], expected, atol=0.02 * expected.abs().max())


def test_long_prefill_on_sliding_layers(models, checker):
    """A 40-token prefill on window-8 layers with max_queries=16: attended in pieces."""
    model = models["gpt_oss"]
    check = checker(shadow=True)
    cache = kvq.hf.KVQCache(model, kvq.QuantConfig(), max_queries=16)
    ids = torch.randint(1, 97, (1, 43), generator=torch.Generator().manual_seed(2))
    forward_chunks(model, cache, ids, [40, 1, 1, 1])
    assert max(error for *_, error in check.errors) <= TOLERANCE
    sliding = cache.kv(0)
    assert sliding.window == 8 and sliding.held < 43  # the ring dropped old chunks


def test_left_padding_is_masked(models, checker):
    model = models["gpt_oss"]
    check = checker()
    cache = kvq.hf.KVQCache(model, kvq.QuantConfig.q8(), max_queries=32)
    ids = torch.randint(1, 97, (2, 14), generator=torch.Generator().manual_seed(3))
    ids[1, :5] = 0
    mask = (ids != 0).long()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=6, do_sample=False
        )
    assert out.shape == (2, 20)
    assert max(error for *_, error in check.errors) <= TOLERANCE
    # a hole in the mask (not left padding) is refused
    hole = torch.ones(1, 6, dtype=torch.long)
    hole[0, 3] = 0
    with pytest.raises(ValueError, match="left padding only"):
        forward_chunks(model, kvq.hf.KVQCache(model), ids[:1, :6], [6], mask=hole)


def test_generate_q4_llama(models):
    model = models["llama"]
    cache = kvq.hf.KVQCache(model, kvq.QuantConfig.q4())
    ids = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model.generate(input_ids=ids, cache=cache, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 20)
    assert cache.get_seq_length() == 19  # the last token is generated, not fed back
    assert cache.nbytes == cache.plan().total_bytes > 0


def test_generate_matches_float_cache_closely(models):
    """With 8-bit codes, logits stay close to transformers' sdpa on float32 keys."""
    model = models["qwen3"]
    ids = torch.randint(1, 97, (1, 24), generator=torch.Generator().manual_seed(5))
    logits = forward_chunks(model, kvq.hf.KVQCache(model), ids, [16, 8])
    expected = sdpa_logits(model, ids)
    assert torch.allclose(logits[:, -1:], expected, atol=0.05 * expected.abs().max())


def test_beam_search_and_reorder(models):
    model = models["gpt_oss"]
    ids = torch.randint(1, 97, (1, 10), generator=torch.Generator().manual_seed(6))
    cache = kvq.hf.KVQCache(model, kvq.QuantConfig.q4())
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, cache=cache, max_new_tokens=12, num_beams=2, do_sample=False
        )
    assert out.shape == (1, 22)
    assert cache.batch_rows == 2
    # reorder_cache: rows [1, 1]; the repeated row is a separate copy
    second = cache.kv(1, 1).keys()
    cache.reorder_cache(torch.tensor([1, 1]))
    assert cache.kv(1, 0) is not cache.kv(1, 1)
    np.testing.assert_array_equal(cache.kv(1, 0).keys(), second)
    np.testing.assert_array_equal(cache.kv(1, 1).keys(), second)
    with pytest.raises(IndexError, match="outside"):
        cache.reorder_cache(torch.tensor([0, 2]))


def test_batch_rows_repeat_and_select(models):
    model = models["llama"]
    cache = kvq.hf.KVQCache(model)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(7))
    forward_chunks(model, cache, ids, [9])
    rows = [cache.kv(0, r).keys() for r in range(2)]
    cache.batch_repeat_interleave(2)
    assert cache.batch_rows == 4
    for r, source in enumerate([0, 0, 1, 1]):
        np.testing.assert_array_equal(cache.kv(0, r).keys(), rows[source])
    cache.batch_select_indices(torch.tensor([3, 0]))
    np.testing.assert_array_equal(cache.kv(0, 0).keys(), rows[1])
    np.testing.assert_array_equal(cache.kv(0, 1).keys(), rows[0])
    forward_chunks(model, cache, ids[:, :1], [1])  # the selected rows keep decoding
    assert cache.get_seq_length() == 10
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.batch_rows == 0


def test_crop_is_exact_or_refused(models):
    model = models["llama"]
    ids = torch.randint(1, 97, (1, 40), generator=torch.Generator().manual_seed(8))
    # per-token schemes: any crop is exact, and equals having fed fewer tokens
    cache = kvq.hf.KVQCache(model, kvq.QuantConfig.original())
    forward_chunks(model, cache, ids, [40])
    keys, values = cache.kv(1).keys(), cache.kv(1).values()
    cache.crop(-3)
    shorter = kvq.hf.KVQCache(model, kvq.QuantConfig.original())
    forward_chunks(model, shorter, ids[:, :37], [37])
    assert cache.get_seq_length() == 37
    np.testing.assert_array_equal(cache.kv(1).keys(), keys[:, :37])
    np.testing.assert_array_equal(cache.kv(1).values(), values[:, :37])
    assert cache.nbytes == shorter.nbytes == cache.plan().total_bytes
    forward_chunks(model, cache, ids[:, 37:], [3])  # and it decodes on
    assert cache.get_seq_length() == 40
    # q8's keys are quantized per channel in chunks of 32 tokens: cutting one is refused
    cache = kvq.hf.KVQCache(model, kvq.QuantConfig.q8())
    forward_chunks(model, cache, ids, [33])
    cache.crop(-1)  # token 32 waits in float32: exact
    assert cache.get_seq_length() == 32
    before = cache.kv(0).keys()
    with pytest.raises(ValueError, match="quantized together"):
        cache.crop(-1)
    assert cache.get_seq_length() == 32
    np.testing.assert_array_equal(cache.kv(0).keys(), before)
    with pytest.raises(ValueError, match="negative"):
        cache.crop(5)


def test_stats_and_nbytes_equal_plan(models):
    model = models["gpt_oss"]
    config = kvq.QuantConfig.q4()
    cache = kvq.hf.KVQCache(model, config, max_queries=16)
    ids = torch.randint(1, 97, (2, 30), generator=torch.Generator().manual_seed(9))
    forward_chunks(model, cache, ids, [16, 14])
    expected = kvq.plan(cache.model_config, 30, config, max_queries=16)
    assert cache.nbytes == 2 * expected.total_bytes
    by_type: dict[str, int] = {}
    for row in cache.stats():
        if row["row"] == 0:
            by_type[row["type"]] = by_type.get(row["type"], 0) + row["nbytes"]
    assert by_type == expected.by_type
    assert cache.model_config == kvq.ModelConfig.from_transformers(model.config)
    assert cache.model_config.layer_types == tuple(model.config.layer_types)


def test_per_layer_configs(models):
    model = models["gpt_oss"]

    def choose(layer_idx, layer_type):
        return kvq.QuantConfig() if layer_type == "sliding_attention" else kvq.QuantConfig.q4()

    cache = kvq.hf.KVQCache(model, choose)
    forward_chunks(model, cache, torch.ones(1, 5, dtype=torch.long), [5])
    assert cache.kv(0).config == kvq.QuantConfig() and cache.kv(1).config == kvq.QuantConfig.q4()
    assert cache.nbytes == cache.plan().total_bytes
    with pytest.raises(TypeError, match=r"must return a kvq\.QuantConfig"):
        kvq.hf.KVQCache(model, lambda i, kind: 4).update(
            torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 0
        )


def test_copies_are_independent(models):
    model = models["llama"]
    cache = kvq.hf.KVQCache(model)
    ids = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(10))
    forward_chunks(model, cache, ids, [6])
    twin = copy.deepcopy(cache)
    assert twin.kv(0) is not cache.kv(0) and twin.hf_config is cache.hf_config
    forward_chunks(model, twin, ids[:, :1], [1])
    assert twin.get_seq_length() == 7 and cache.get_seq_length() == 6


def test_misuse_is_refused(models):
    model = models["llama"]
    ids = torch.ones(1, 4, dtype=torch.long)
    model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(ValueError, match="attn_implementation='kvq'"):
            forward_chunks(model, kvq.hf.KVQCache(model), ids, [4])
    finally:
        model.set_attn_implementation("kvq")
    with pytest.raises(ValueError, match=r"reads a kvq\.hf\.KVQCache"), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    with pytest.raises(ValueError, match=r"reads a kvq\.hf\.KVQCache"), torch.no_grad():
        model(input_ids=ids, cache=transformers.DynamicCache(config=model.config))
    half = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.raises(TypeError, match="float32 model"):
        kvq.hf.KVQCache(half)
    meta = copy.deepcopy(model).to("meta")
    with pytest.raises(ValueError, match="runs on CPU"):
        kvq.hf.KVQCache(meta)
    with pytest.raises(TypeError, match="QuantConfig"):
        kvq.hf.KVQCache(model, config="q4")
    with pytest.raises(ValueError, match="max_queries must be >= 1"):
        kvq.hf.KVQCache(model, max_queries=0)
    cache = kvq.hf.KVQCache(model)
    forward_chunks(model, cache, torch.ones(2, 4, dtype=torch.long), [4])
    with pytest.raises(ValueError, match="a batch of 1 rows"):
        forward_chunks(model, cache, ids, [4])
    with pytest.raises(IndexError, match="no rows"):
        kvq.hf.KVQCache(model).kv(0)


def test_mask_sizes_both_signatures(models):
    model = models["gpt_oss"]
    cache = kvq.hf.KVQCache(model)
    forward_chunks(model, cache, torch.ones(1, 10, dtype=torch.long), [10])
    assert cache.get_mask_sizes(3, 1) == (13, 0)  # full layer
    assert cache.get_mask_sizes(3, 0) == (10, 3)  # sliding: window 8 -> 7 past + 3 new
    assert cache.get_mask_sizes(torch.arange(10, 13), 0) == (10, 3)  # cache_position form
    dynamic = transformers.DynamicCache(config=model.config)
    for layer in range(4):
        dynamic.update(torch.zeros(1, 2, 10, 16), torch.zeros(1, 2, 10, 16), layer)
        assert dynamic.get_mask_sizes(3, layer) == cache.get_mask_sizes(3, layer)


def test_registered_with_transformers():
    assert transformers.AttentionInterface._global_mapping["kvq"] is hf_attention.kvq_attention
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert ALL_MASK_ATTENTION_FUNCTIONS["kvq"] is hf_attention.kvq_mask
    config = transformers.LlamaConfig(**SMALL, num_hidden_layers=1)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="kvq")
    assert model.config._attn_implementation == "kvq"


def test_module_scaling_is_used(models, checker):
    """A module scaling other than head_dim ** -0.5 reaches kvq.attention."""
    model = models["llama"]
    check = checker()
    attention = model.model.layers[1].self_attn
    attention.scaling = 0.37
    try:
        forward_chunks(model, kvq.hf.KVQCache(model), torch.ones(1, 6, dtype=torch.long), [6])
    finally:
        attention.scaling = attention.head_dim**-0.5
    assert max(error for *_, error in check.errors) <= TOLERANCE
    assert len(check.errors) == 2


def test_window_convention_is_transformers():
    """kvq's window (a query sees the last W positions, itself included) is the mask that
    transformers builds for sliding layers: read which keys attention_reference averages
    (zero queries, one-hot values) and compare with masking_utils' sliding causal mask."""
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    tokens, window = 12, 4
    for t_q in (1, 5, 12):
        q = np.zeros((1, t_q, tokens))
        values = np.eye(tokens)[None]
        seen = kvq.attention_reference(q, values, values, window=window)[0] > 0
        mask = sdpa_mask(
            batch_size=1, q_length=t_q, kv_length=tokens, q_offset=tokens - t_q,
            mask_function=sliding_window_causal_mask_function(window),
            allow_is_causal_skip=False,
        )[0, 0].numpy()  # fmt: skip
        np.testing.assert_array_equal(seen, mask)


def test_gpt_oss_logits_equal_eager_when_nothing_is_quantized(models):
    """With every token in the float32 residual (kivi(8, residual=64) on 24 tokens), the
    whole kvq path (window-8 layers attended in pieces, sinks, GQA) gives transformers'
    eager logits to float32 rounding; a window one position off moves them by 20%."""
    model = models["gpt_oss"]
    ids = torch.randint(1, 97, (1, 24), generator=torch.Generator().manual_seed(11))
    exact = kvq.QuantConfig.kivi(8, residual=64)
    cache = kvq.hf.KVQCache(model, exact, max_queries=4)
    logits = forward_chunks(model, cache, ids, [16, 3] + [1] * 5)[:, -1]
    assert cache.kv(0).stats()["k_quantized"] == 0
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            expected = model(input_ids=ids).logits[:, -1]
            model.config.sliding_window = 9  # off by one
            shifted = model(input_ids=ids).logits[:, -1]
    finally:
        model.config.sliding_window = 8
        model.set_attn_implementation("kvq")
    scale = float(expected.abs().max())
    assert float((logits - expected).abs().max()) <= 1e-5 * scale
    assert float((shifted - expected).abs().max()) > 0.1 * scale


def test_bad_states_leave_every_row_as_it_was(models):
    model = models["llama"]
    cache = kvq.hf.KVQCache(model)
    forward_chunks(model, cache, torch.ones(2, 4, dtype=torch.long), [4])
    k, v = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
    k[1, 0, 0, 3] = float("nan")
    key, value = cache.update(k, v, 0)
    with pytest.raises(ValueError, match=r"layer 0, batch row 1: k has nan at head 0, token 0"):
        hf_attention.kvq_attention(
            model.model.layers[0].self_attn, torch.randn(2, 4, 1, 16), key, value, None
        )
    assert [len(cache.kv(0, row)) for row in range(2)] == [4, 4]
    forward_chunks(model, cache, torch.ones(2, 1, dtype=torch.long), [1])  # and it goes on
    assert cache.get_seq_length() == 5


@pytest.mark.parametrize("bad", ["k", "v"])
def test_bad_states_of_a_single_row_leave_it_as_it_was(models, bad):
    # one row, one append: no separate check_append pass, the append's own checks
    model = models["llama"]
    cache = kvq.hf.KVQCache(model)
    forward_chunks(model, cache, torch.ones(1, 4, dtype=torch.long), [4])
    before = cache.kv(0).keys()
    k, v = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16)
    (k if bad == "k" else v)[0, 1, 1, 3] = float("inf")
    key, value = cache.update(k, v, 0)
    with pytest.raises(ValueError, match=rf"layer 0, batch row 0: {bad} has inf at head 1"):
        hf_attention.kvq_attention(
            model.model.layers[0].self_attn, torch.randn(1, 4, 2, 16), key, value, None
        )
    assert len(cache.kv(0)) == 4
    np.testing.assert_array_equal(cache.kv(0).keys(), before)


@pytest.mark.parametrize("name", ["llama", "gpt_oss"])
def test_keys_of_per_channel_widths_match_float64_attention(models, checker, name):
    """A LayerMap from kvq.hf.calibrate_channels (keys of per-channel widths, held widest
    first) in every layer and call, sliding layers and sinks included."""
    model = models[name]
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    calibration = torch.randint(1, 97, (200,), generator=torch.Generator().manual_seed(2))
    layer_map = kvq.hf.calibrate_channels(model, None, 4.5, calibration, 128, 512)
    assert model.config._attn_implementation == "kvq"  # restored
    assert len({c.k.channel_bits for c in layer_map.configs}) > 1  # layers differ
    check = checker()
    cache = kvq.hf.KVQCache(model, layer_map, max_queries=16)
    forward_chunks(model, cache, ids, [16, 5] + [1] * 19)
    worst = max(error for *_, error in check.errors)
    assert worst <= TOLERANCE, [e for e in check.errors if e[-1] > TOLERANCE][:5]
