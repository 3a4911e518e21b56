"""Smoke test of bench/quality.py and bench/real_kv.py on tiny data: are the numbers sane?"""

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import quality
import real_kv

import kvq
from tests import reference


@pytest.fixture(scope="module")
def tiny():
    return quality.synthetic_source(layers=1, heads=2, tokens=128, head_dim=64, queries=16)


def test_attention_and_relative_error_basics(rng):
    q = rng.standard_normal((3, 5, 8), dtype=np.float32)
    k = rng.standard_normal((3, 7, 8), dtype=np.float32)
    out = quality.attention(q, k, np.ones((3, 7, 8), np.float32))
    np.testing.assert_allclose(out, 1, rtol=1e-5)  # softmax rows sum to one
    v = rng.standard_normal((3, 7, 8), dtype=np.float32)
    scores = np.einsum("sqd,skd->sqk", q.astype(np.float64), k) / math.sqrt(8)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ v
    np.testing.assert_allclose(quality.attention(q, k, v), ref, rtol=1e-4, atol=1e-5)
    assert quality.relative_error(v, v) == 0
    # per-slice mean: slice 0 off by 10%, slice 1 exact -> 5%
    x = np.ones((2, 4, 4), np.float32)
    y = x.copy()
    y[0] *= 1.1
    assert quality.relative_error(y, x) == pytest.approx(0.05, rel=1e-5)


def test_synthetic_queries_keep_outlier_channels(tiny):
    q, k = tiny.q, tiny.k
    assert q.shape == (2, 16, 64) and q.dtype == np.float32
    for h in range(2):
        loud_k = set(np.argsort(k[h].std(0))[-4:])
        loud_q = set(np.argsort(np.abs(q[h]).mean(0))[-4:])
        assert len(loud_k & loud_q) >= 3
    logits = q @ k.transpose(0, 2, 1) / 8
    assert np.all((logits.std(axis=(1, 2)) > 1.4) & (logits.std(axis=(1, 2)) < 3.6))
    # float16 grid: every value survives float16 exactly
    assert np.array_equal(k.astype(np.float16).astype(np.float32), k)


def test_ggml_bits_and_q8_0_bound(tiny):
    gguf = pytest.importorskip("gguf")
    x = tiny.k
    bits = {}
    for name in quality.GGML_TYPES:
        x_hat, bits[name] = quality.ggml_roundtrip(x, name, gguf)
        assert x_hat.shape == x.shape and x_hat.dtype == np.float32
    assert bits == {"Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0}
    x_hat, _ = quality.ggml_roundtrip(x, "Q8_0", gguf)
    blocks = x.reshape(-1, 32)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127  # d = amax / 127
    # half a step, plus the float16 rounding of d times up to 127 codes
    bound = step * (0.5 + 127 * 2.0**-11) + 1e-7
    assert np.all(np.abs(x_hat.reshape(-1, 32) - blocks) <= bound)


def test_mlx_bits():
    mx = pytest.importorskip("mlx.core")
    x = np.random.default_rng(0).standard_normal((2, 8, 64)).astype(np.float32)
    for group in (32, 64):
        for bits in quality.MLX_BITS:
            x_hat, bpe = quality.mlx_roundtrip(x, bits, group, mx)
            assert bpe == bits + 32 / group
            assert x_hat.shape == x.shape


def mean_relative_error(approx, exact) -> float:
    """Mean over slices (axis 0) of the relative Frobenius error, in float64."""
    a = approx.astype(np.float64).reshape(len(exact), -1)
    e = exact.astype(np.float64).reshape(len(exact), -1)
    return float(np.mean(np.linalg.norm(a - e, axis=1) / np.linalg.norm(e, axis=1)))


def softmax_attention(q, k, v):
    scores = q.astype(np.float64) @ np.swapaxes(k, -1, -2).astype(np.float64)
    scores /= np.sqrt(q.shape[-1])
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v.astype(np.float64)


def half_scale_bound(x, bits: int) -> float:
    """Mean over slices of sqrt(sum of (scale / 2)**2 over elements) / ||x||: the relative
    error min/max quantization cannot exceed, from the input's groups of 32 along the last
    axis (float16 scales: rounded up, at most one float16 ulp, and the min rounded down)."""
    groups = x.astype(np.float64).reshape(len(x), -1, 32)
    span = groups.max(-1) - groups.min(-1)
    scale = (span + 2**-10 * np.abs(groups).max(-1)) / (2**bits - 1) * (1 + 2**-10)
    per_slice = np.sqrt((32 * (scale / 2) ** 2).sum(-1))
    return float(np.mean(per_slice / np.linalg.norm(x.reshape(len(x), -1), axis=1)))


def test_kvq_bits_per_element_and_error_order(tiny):
    """Bits per element, and K, V and attention errors equal to an independent computation:
    codes from tests/reference.py, errors and attention in plain float64 NumPy; K and V
    within the half-scale bound from the input; errors shrink with bits."""
    ev = quality.Evaluator(tiny)
    results = {}
    for bits in (2, 4, 8):
        scheme = kvq.Scheme(bits, 32, axis=-1, scale_dtype="float16")
        k_hat, k_bits = quality.kvq_roundtrip(tiny.k, scheme)
        v_hat, v_bits = quality.kvq_roundtrip(tiny.v, scheme)
        assert k_bits == v_bits == bits + 1.0  # float16 scale and min per 32 values
        results[bits] = ev.errors(k_hat, v_hat)
        ref = {}
        for name, x in (("k", tiny.k), ("v", tiny.v)):
            codes, scales, mins = reference.quantize_groups(x, bits, 32, -1, "float16")
            unpacked = np.frombuffer(codes.tobytes(), np.uint8)
            if bits < 8:  # little-endian bit stream -> one code per element
                stream = np.unpackbits(unpacked, bitorder="little")
                unpacked = (
                    stream[: x.size * bits].reshape(-1, bits) << np.arange(bits, dtype=np.uint8)
                ).sum(1)
            ref[name] = reference.dequantize_blocks(unpacked, scales, mins, 32).reshape(x.shape)
        expected = (
            mean_relative_error(ref["k"], tiny.k),
            mean_relative_error(ref["v"], tiny.v),
            mean_relative_error(
                softmax_attention(tiny.q, ref["k"], ref["v"]),
                softmax_attention(tiny.q, tiny.k, tiny.v),
            ),
        )
        np.testing.assert_allclose(results[bits], expected, rtol=1e-4)
        assert results[bits][0] <= half_scale_bound(tiny.k, bits)
        assert results[bits][1] <= half_scale_bound(tiny.v, bits)
    for i in range(3):  # K, V and attention errors all shrink with bits
        assert results[8][i] < results[4][i] < results[2][i]
    assert results[8][2] < 0.02
    dq = kvq.Scheme(4, 32, axis=-1, double_quant=True)
    assert quality.kvq_roundtrip(tiny.k, dq)[1] == pytest.approx(4.5)


def test_run_source_grid_and_targets(tiny):
    problems = []
    grid = {"bits_list": (4, 8), "groups": (32, 64, 128), "flags": ((False, False),)}
    rows = quality.run_source(tiny, grid, problems)
    methods = {r.method for r in rows}
    assert "kvq" in methods
    assert any("group 128 > axis length 64" in p for p in problems)
    kvq_rows = [r for r in rows if r.method == "kvq"]
    # per bits: g32 and g64 pair 4 K with 2 V schemes; g128 only per-channel K (2) with V
    # capped at g64 (2); then 4->8 and 8->4 bits cross the best 2 K with the best 2 V
    assert len(kvq_rows) == 2 * (2 * 4 * 2 + 2 * 2) + 2 * 2 * 2
    for r in rows:
        assert 0 < r.attn_err < 1 and 0 < r.k_err < 1 and 0 < r.v_err < 1
    front = quality.pareto(rows)
    assert all(a.bits <= b.bits and a.attn_err > b.attn_err for a, b in itertools.pairwise(front))
    if "GGML" in methods:
        lines = quality.target_lines("tiny", rows)
        assert len(lines) == len(quality.TARGETS)
        assert all(line.startswith(("- PASS", "- MISS", "- SKIP")) for line in lines)
        assert lines[-1].startswith("- SKIP")  # no kvq row at or under 3.5 bits in this grid


def test_pareto_and_targets_by_hand():
    row = quality.Row
    rows = [
        row("GGML", "q4_0", 4.5, 0, 0, 0.10),
        row("GGML", "q4_1", 5.0, 0, 0, 0.08),
        row("GGML", "q8_0", 8.5, 0, 0, 0.010),
        row("kvq", "a", 3.5, 0, 0, 0.12),
        row("kvq", "b", 4.5, 0, 0, 0.07),
        row("kvq", "c", 8.5, 0, 0, 0.009),
        row("kvq", "d", 9.0, 0, 0, 0.004),
    ]
    assert [r.label for r in quality.pareto(rows)] == ["a", "b", "c", "d"]
    lines = quality.target_lines("hand", rows)
    assert [line.split()[1] for line in lines] == ["PASS", "MISS", "MISS", "PASS"]
    assert "with b" in lines[0] and "with a" in lines[3]


def test_wordpiece_and_gelu(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "hello", ",", "cafe"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = real_kv.WordPiece(tmp_path / "vocab.txt")
    assert tok.basic("Unaffable,  HELLO\tcafé!") == ["unaffable", ",", "hello", "cafe", "!"]
    assert tok.encode("Unaffable, hello café!").tolist() == [2, 4, 5, 6, 8, 7, 9, 1, 3]
    assert tok.encode("hello " * 10, max_tokens=4).tolist() == [2, 7, 7, 3]
    x = np.linspace(-6, 6, 241, dtype=np.float32)
    exact = [v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.tolist()]
    np.testing.assert_allclose(real_kv.gelu(x), exact, atol=2e-6)


def test_minilm_capture_when_installed():
    try:
        model = real_kv.MiniLM()
    except real_kv.Unavailable as reason:
        pytest.skip(str(reason))
    q, k, v, info = real_kv.capture(num_sequences=1, max_tokens=24, model=model)
    assert q.shape == k.shape == v.shape == (6 * 12, 24, 32)
    assert info["tokens"] == 24 and q.dtype == np.float32
    assert np.all(np.isfinite(k)) and 0.1 < float(np.std(k)) < 10
    emb = model.embed("a short sentence", max_tokens=16)
    assert emb.shape == (384,) and abs(float(np.linalg.norm(emb)) - 1) < 1e-5
