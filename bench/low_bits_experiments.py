"""Three ideas for 3.5 bits per element on real K/V (MiniLM), measured and not adopted.

The best kvq scheme at <= 3.5 bits (3-bit per-channel keys, 3-bit rotated per-token values,
both with second-level scales and range search) is 1.40x GGML q4_0's attention error on
MiniLM; the target is 1.25x. Each experiment below changes one thing and prints K, V and
attention-output relative errors (bench/quality.py's metrics) against that baseline:

1. non-uniform levels: 8 levels placed by Lloyd's algorithm on min/max-normalised Gaussian
   (or Laplace) groups of 32, instead of 8 evenly spaced ones (NumPy, float32 scales, a
   coarse range search; compare with its own "uniform" row);
2. a Hadamard rotation along tokens inside each per-channel key group (spreads outlier
   tokens over the group);
3. outlier tokens: the n tokens per head with the largest standardised key kept exactly
   (16 bits per element for those tokens, counted) and left out of their groups' ranges.

    python bench/low_bits_experiments.py
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality
import real_kv

import kvq
from kvq.formats import ggml_dequantize, ggml_quantize

BASE = {"bits": 3, "group_size": 32, "double_quant": True, "search": True}


def ggml_roundtrip(x: np.ndarray, kind: str) -> np.ndarray:
    """x through GGML ``kind`` blocks along head_dim and back (kvq.formats: gguf's bytes)."""
    return ggml_dequantize(ggml_quantize(x, kind), kind, x.shape)


def lloyd_levels(distribution: str, levels: int = 8, group: int = 32) -> np.ndarray:
    """Levels in [0, 1] (ends fixed) minimising squared error on normalised random groups."""
    rng = np.random.default_rng(0)
    draw = rng.standard_normal if distribution == "gauss" else rng.laplace
    g = draw(size=(20000, group))
    lo, hi = g.min(1, keepdims=True), g.max(1, keepdims=True)
    u = ((g - lo) / (hi - lo)).ravel()
    t = np.linspace(0, 1, levels)
    for _ in range(60):
        nearest = np.abs(u[:, None] - t).argmin(1)
        for j in range(1, levels - 1):
            t[j] = u[nearest == j].mean()
    return t


def quantize_levels(groups: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Nearest-level quantization of (G, 32) groups on [lo, hi] shrunk by a 7x7 range search."""
    lo, hi = groups.min(1, keepdims=True), groups.max(1, keepdims=True)
    span = hi - lo
    best, best_error = None, None
    for a in np.linspace(0, 0.3, 7):
        for b in np.linspace(0, 0.3, 7):
            low, step = lo + a * span, np.maximum((hi - b * span) - (lo + a * span), 1e-30)
            codes = np.abs(((groups - low) / step)[..., None] - t).argmin(-1)
            y = low + step * t[codes]
            error = ((y - groups) ** 2).sum(1, keepdims=True)
            if best is None:
                best, best_error = y, error
            else:
                better = error < best_error
                best, best_error = np.where(better, y, best), np.where(better, error, best_error)
    return best


def channel_groups(x: np.ndarray) -> tuple[np.ndarray, callable]:
    """(G, 32) per-channel groups of (S, T, D) x, and the map back."""
    xt = np.ascontiguousarray(x.transpose(0, 2, 1))
    return xt.reshape(-1, 32), lambda y: np.ascontiguousarray(
        y.reshape(xt.shape).transpose(0, 2, 1)
    )


def token_hadamard(x: np.ndarray, inverse: bool = False) -> np.ndarray:
    h = np.array([[1.0]])
    while len(h) < 32:
        h = np.block([[h, h], [h, -h]])
    signs = np.where(np.random.default_rng(1).random(32) < 0.5, -1.0, 1.0)
    m = (h / np.sqrt(32)) * signs
    m = m.T if inverse else m
    s, t, d = x.shape
    return np.einsum("ij,sgjd->sgid", m, x.reshape(s, t // 32, 32, d)).reshape(x.shape)


def main() -> None:
    try:
        source = quality.real_source()
    except real_kv.Unavailable as error:
        print(f"MiniLM unavailable: {error}")
        return
    evaluate = quality.Evaluator(source)
    k, v = source.k, source.v
    k_hat = kvq.quantize(k, axis=-2, **BASE).dequantize()
    v_hat = kvq.quantize(v, axis=-1, rotate=True, **BASE).dequantize()
    q4_0 = evaluate.attn_error(*(ggml_roundtrip(x, "q4_0") for x in (k, v)))
    rows = [("baseline (kvq, 3.5 bits)", 3.5, *evaluate.errors(k_hat, v_hat))]

    for name, t in (
        ("1. uniform levels (NumPy reference for 1.)", np.linspace(0, 1, 8)),
        ("1. Lloyd levels, Gaussian", lloyd_levels("gauss")),
        ("1. Lloyd levels, Laplace", lloyd_levels("laplace")),
    ):
        kg, k_back = channel_groups(k)
        vg = v.reshape(-1, 32)
        rows.append(
            (name, 3.5, *evaluate.errors(k_back(quantize_levels(kg, t)),
                                         quantize_levels(vg, t).reshape(v.shape)))
        )  # fmt: skip

    rotated = token_hadamard(kvq.quantize(token_hadamard(k), axis=-2, **BASE).dequantize(), True)
    rows.append(("2. keys rotated along tokens", 3.5, *evaluate.errors(rotated, v_hat)))

    median = np.median(k, axis=1, keepdims=True)
    spread = k.std(axis=1, keepdims=True) + 1e-12
    outlying = np.argsort(-np.abs((k - median) / spread).max(-1), axis=1)
    for n in (1, 2, 4, 8):
        keep = np.zeros(k.shape[:2], bool)
        np.put_along_axis(keep, outlying[:, :n], True, axis=1)
        fill = (
            np.where(keep[..., None], 0, k).sum(1, keepdims=True) / (~keep).sum(1)[:, None, None]
        )
        k_in = np.where(keep[..., None], fill, k).astype(np.float32)
        k_out = np.where(keep[..., None], k, kvq.quantize(k_in, axis=-2, **BASE).dequantize())
        bits = (3.5 + n * 16 / k.shape[1] + 3.5) / 2
        rows.append((f"3. {n} outlier token(s) per head exact", bits,
                     *evaluate.errors(k_out, v_hat)))  # fmt: skip

    print(f"MiniLM, {source.description}\nGGML q4_0 attention error {q4_0:.4e}\n")
    print("| experiment | bits/elem | K rel err | V rel err | attn err | / q4_0 |")
    print("|---|---|---|---|---|---|")
    for name, bits, ke, ve, ae in rows:
        print(f"| {name} | {bits:.3f} | {ke:.4e} | {ve:.4e} | {ae:.4e} | {ae / q4_0:.2f}x |")


if __name__ == "__main__":
    main()
