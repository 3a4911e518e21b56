"""Error against bits: kvq's schemes, MLX's affine quantization and GGML's q8_0/q4_0/q4_1.

Each scheme quantizes K and V of a data source, and three errors are measured against the
unquantized tensors:

  - K and V relative error, ||X - X^|| / ||X||;
  - attention-output relative error, ||o - o_ref|| / ||o_ref||, where
    o = softmax(q K^T / sqrt(d)) V per head, o_ref from the exact K and V and o from the
    dequantized K^ and V^ with the same queries. Attention is not causal: every query sees
    every token of its head, as a decode step at the end of the context does (and as the
    MiniLM encoder does).

Each error is computed per head slice (one head of one layer of one sequence) with the
Frobenius norm over the slice, then averaged over slices with equal weight.

Data sources:
  1. synthetic: ``kvq.synthetic.kv_layer`` (keys with outlier channels at 5-20x and smooth
     drift along tokens, values near Gaussian), two layers of 8 heads x 2048 tokens x 64.
     Queries come from ``synthetic_queries``: each is a random Gaussian mix of four keys of
     random tokens of the same head plus channel-scaled noise, so it keeps the keys'
     outlier-channel structure, then each head's queries are scaled so that their logits
     q.k/sqrt(d) have a standard deviation drawn from 1.5..3.5 (softmaxes neither uniform
     nor one-hot).
  2. MiniLM: real activations of sentence-transformers/all-MiniLM-L6-v2 (6 layers, 12 heads
     of 32), captured by ``bench/real_kv.py`` from 4 sequences of 512 tokens of English text
     that ships with Python; its own queries, 128 positions per head slice.

Both sources are rounded to float16 first (real caches are 16-bit), so MLX, which works in
float16, is given exactly the data the others are. Schemes (per token = groups along
head_dim, per channel = groups across tokens):
  - GGML through the gguf package, per token: q8_0 (8.5 bits), q4_0 (4.5), q4_1 (5.0);
  - MLX ``mx.quantize`` per token at 2, 3, 4, 8 bits, groups of 32 and 64 (float16 scales
    and biases: bits + 32/group bits);
  - kvq ``kvq.quantize``: a grid over bits 2/3/4/8, groups 32/64/128, float16 scales or
    double_quant, with and without search; K per token or per channel, each with and without
    rotate=True; V per token with and without rotate=True. K and V use the same bits, group and
    flags, and the few best K and V schemes of each bits are also paired across bits.
    Bits per element are kvq's own ``bits_per_element``, averaged over K and V.

Targets (on MiniLM; also reported for synthetic): the best kvq configuration at or under
4.5, 5.0 and 8.5 bits per element has an attention error at least 25% below GGML q4_0,
q4_1 and q8_0 respectively, and at or under 3.5 bits it is within 25% of q4_0's error.

    python bench/quality.py          # both sources, about two minutes on 2 cores
    python bench/quality.py --quick  # small data and grid, a smoke run
    python bench/quality.py --progress  # tqdm bars even when stderr is not a terminal
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Numba's OpenMP workers spin after each kernel and fight OpenBLAS's threads for the cores
# when kvq calls and matmuls alternate, as they do here: that made --quick 2-4x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, markdown_table, optional, save, versions

import kvq
import kvq.synthetic

KVQ_BITS = (2, 3, 4, 8)
KVQ_GROUPS = (32, 64, 128)
MLX_BITS = (2, 3, 4, 8)
MLX_GROUPS = (32, 64)
GGML_TYPES = ("Q8_0", "Q4_0", "Q4_1")
# (budget in bits per element, GGML type, factor): best kvq error <= factor x GGML's error.
TARGETS = ((4.5, "Q4_0", 0.75), (5.0, "Q4_1", 0.75), (8.5, "Q8_0", 0.75), (3.5, "Q4_0", 1.25))
TARGET_SOURCE = "MiniLM"


# --- data sources --------------------------------------------------------------------------


@dataclass
class Source:
    """Queries, keys and values stacked as (slices, tokens, head_dim) float32."""

    name: str
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    description: str


def to_float16_grid(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, np.float32).astype(np.float16).astype(np.float32)


def synthetic_queries(
    keys: np.ndarray,
    num_queries: int,
    rng: np.random.Generator,
    mix: int = 4,
    noise: float = 0.5,
    logit_std: tuple[float, float] = (1.5, 3.5),
) -> np.ndarray:
    """Queries for synthetic keys (heads, tokens, head_dim): float32 (heads, num_queries,
    head_dim).

    Each query is a Gaussian-weighted mix of ``mix`` keys of random tokens of the same head,
    plus noise scaled per channel by the keys' standard deviation, so that it keeps the
    outlier channels of its head's keys. Each head's queries are then scaled so that the
    logits ``q.k / sqrt(d)`` over all its keys have a standard deviation drawn uniformly from
    ``logit_std``.
    """
    heads, tokens, head_dim = keys.shape
    picks = rng.integers(0, tokens, (heads, num_queries, mix))
    weights = rng.standard_normal((heads, num_queries, mix)).astype(np.float32)
    chosen = keys[np.arange(heads)[:, None, None], picks]  # (heads, queries, mix, head_dim)
    q = np.einsum("hqm,hqmd->hqd", weights, chosen) / np.float32(math.sqrt(mix))
    channel_std = keys.std(axis=1, keepdims=True)
    q += np.float32(noise) * channel_std * rng.standard_normal(q.shape, dtype=np.float32)
    logits = q @ keys.transpose(0, 2, 1) / np.float32(math.sqrt(head_dim))
    target = rng.uniform(*logit_std, heads).astype(np.float32)
    q *= (target / logits.std(axis=(1, 2)))[:, None, None]
    return np.ascontiguousarray(q, np.float32)


def synthetic_source(
    layers: int = 2, heads: int = 8, tokens: int = 2048, head_dim: int = 64, queries: int = 128
) -> Source:
    rng = np.random.default_rng(1234)
    qs, ks, vs = [], [], []
    for seed in range(layers):
        k, v = kvq.synthetic.kv_layer(heads, tokens, head_dim, seed=seed)
        k, v = to_float16_grid(k), to_float16_grid(v)
        qs.append(synthetic_queries(k, queries, rng))
        ks.append(k)
        vs.append(v)
    description = (
        f"kvq.synthetic.kv_layer, {layers} layers (seeds 0..{layers - 1}) x {heads} heads x "
        f"{tokens} tokens x {head_dim}; {queries} synthetic queries per head (mixes of keys)"
    )
    return Source(
        "synthetic", np.concatenate(qs), np.concatenate(ks), np.concatenate(vs), description
    )


def real_source(sequences: int = 4, tokens: int = 512, queries: int = 128) -> Source:
    """MiniLM's Q/K/V; raises ``real_kv.Unavailable`` when the package is missing."""
    import real_kv

    q, k, v, info = real_kv.capture(sequences, tokens)
    n = info["tokens"]
    positions = np.sort(np.random.default_rng(99).choice(n, min(queries, n), replace=False))
    description = (
        f"all-MiniLM-L6-v2 (bench/real_kv.py): {info['sequences']} sequences x {n} tokens, "
        f"{info['layers']} layers x {info['heads']} heads x {info['head_dim']}; its own "
        f"queries at {len(positions)} positions"
    )
    return Source(
        "MiniLM",
        np.ascontiguousarray(q[:, positions]),
        to_float16_grid(k),
        to_float16_grid(v),
        description,
    )


# --- metrics -------------------------------------------------------------------------------


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """softmax(q k^T / sqrt(d)) v per slice, float32, not causal."""
    scores = q @ np.ascontiguousarray(k.transpose(0, 2, 1))  # 2x faster than the view
    scores *= np.float32(1 / math.sqrt(q.shape[-1]))
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores @ v


def relative_error(approx: np.ndarray, exact: np.ndarray, exact_norms=None) -> float:
    """Mean over slices (axis 0) of ||approx - exact|| / ||exact||, Frobenius per slice."""
    diff = (approx - exact).reshape(len(exact), -1)
    if exact_norms is None:
        exact_norms = np.linalg.norm(exact.reshape(len(exact), -1), axis=1)
    return float(np.mean(np.sqrt(np.einsum("ij,ij->i", diff, diff)) / exact_norms))


@dataclass
class Evaluator:
    """The three errors of one source against its exact K, V and attention output."""

    source: Source
    reference: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        s = self.source
        self.reference = attention(s.q, s.k, s.v)
        self._norms = {
            name: np.linalg.norm(x.reshape(len(x), -1), axis=1)
            for name, x in (("k", s.k), ("v", s.v), ("o", self.reference))
        }

    def k_error(self, k_hat: np.ndarray) -> float:
        return relative_error(k_hat, self.source.k, self._norms["k"])

    def v_error(self, v_hat: np.ndarray) -> float:
        return relative_error(v_hat, self.source.v, self._norms["v"])

    def attn_error(self, k_hat: np.ndarray, v_hat: np.ndarray) -> float:
        out = attention(self.source.q, k_hat, v_hat)
        return relative_error(out, self.reference, self._norms["o"])

    def errors(self, k_hat: np.ndarray, v_hat: np.ndarray) -> tuple[float, float, float]:
        return self.k_error(k_hat), self.v_error(v_hat), self.attn_error(k_hat, v_hat)


@dataclass
class Row:
    method: str  # "kvq", "MLX g32", "MLX g64", "GGML"
    label: str
    bits: float  # per element, K and V averaged
    k_err: float
    v_err: float
    attn_err: float
    note: str = ""


# --- the schemes ---------------------------------------------------------------------------


def ggml_roundtrip(x: np.ndarray, type_name: str, gguf) -> tuple[np.ndarray, float]:
    """GGML quantization per token along head_dim (rows of head_dim, blocks of 32)."""
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    rows = x.reshape(-1, x.shape[-1])
    blocks = gguf.quants.quantize(rows, qtype)
    back = gguf.quants.dequantize(blocks, qtype).astype(np.float32).reshape(x.shape)
    return back, 8 * blocks.nbytes / x.size


def mlx_roundtrip(x: np.ndarray, bits: int, group: int, mx) -> tuple[np.ndarray, float]:
    """``mx.quantize`` per token along head_dim, on float16 (float16 scales and biases)."""
    w = mx.array(x.reshape(-1, x.shape[-1]).astype(np.float16))
    packed, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    back = mx.dequantize(packed, scales, biases, group_size=group, bits=bits)
    mx.eval(back)
    stored = packed.nbytes + scales.nbytes + biases.nbytes
    return np.array(back, np.float32).reshape(x.shape), 8 * stored / x.size


def kvq_roundtrip(x: np.ndarray, scheme) -> tuple[np.ndarray, float]:
    qt = kvq.quantize(x, scheme=scheme)
    return qt.dequantize(), qt.bits_per_element


FLAGS = ((False, False), (False, True), (True, False), (True, True))  # (double_quant, search)


def kvq_grid(head_dim: int, bits_list=KVQ_BITS, groups=KVQ_GROUPS, flags=FLAGS):
    """Blocks of (K schemes, V schemes) sharing bits, group, double_quant and search.

    K: per token or per channel, each with and without rotate=True; V: per token, with and
    without rotate=True, its group capped at head_dim (so that per-channel K at groups of 64 or
    128 still gets a partner when head_dim is 32).
    """
    for bits, (double_quant, search), group in itertools.product(bits_list, flags, groups):
        common = {
            "bits": bits,
            "scale_dtype": "float16",
            "double_quant": double_quant,
            "search": search,
        }
        k_schemes = [
            kvq.Scheme(group_size=group, axis=axis, rotate=rotate, **common)
            for axis in (-1, -2)
            for rotate in (False, True)
        ]
        v_group = min(group, head_dim)
        v_schemes = [
            kvq.Scheme(group_size=v_group, axis=-1, rotate=rotate, **common)
            for rotate in (False, True)
        ]
        yield k_schemes, v_schemes


def describe(scheme) -> str:
    try:
        return scheme.describe()
    except AttributeError:
        return repr(scheme)


def preset_names() -> dict[tuple, str]:
    """(K scheme, V scheme) -> preset name, for the presets the grid contains."""
    names = {}
    config = getattr(kvq, "QuantConfig", None)
    if config is None:
        return names
    presets = [("q8", config.q8), ("q4", config.q4), ("q3", config.q3), ("q2", config.q2)]
    presets += [(f"kivi(bits={b})", lambda b=b: config.kivi(bits=b)) for b in (2, 3, 4)]
    presets += [(f"mlx(bits={b})", lambda b=b: config.mlx(bits=b)) for b in (2, 3, 4, 8)]
    for name, make in presets:
        try:
            preset = make()
        except Exception:
            continue
        names[(scheme_key(preset.k), scheme_key(preset.v))] = f"QuantConfig.{name}()"
    return names


def scheme_key(scheme) -> tuple:
    """What decides the stored form: scale_dtype does not matter under double_quant."""
    dtype = None if scheme.double_quant else scheme.scale_dtype
    return (
        scheme.bits,
        scheme.group_size,
        scheme.axis,
        dtype,
        scheme.rotate,
        scheme.double_quant,
        scheme.search,
    )


def fits(scheme, shape: tuple[int, ...]) -> str | None:
    """Why ``scheme`` is skipped on this shape, or None."""
    length = shape[scheme.axis]
    if scheme.group_size > length:
        return f"group {scheme.group_size} > axis length {length}"
    if length % scheme.group_size:
        return f"axis length {length} is not a multiple of group {scheme.group_size}"
    return None


def progress_bar(iterable, total: int, desc: str, progress: bool | None = None):
    """``iterable`` wrapped in a tqdm bar on stderr when tqdm is installed and ``progress`` is
    True (None: when stderr is a terminal); otherwise ``iterable`` itself."""
    if progress is None:
        progress = sys.stderr.isatty()
    tqdm = optional("tqdm") if progress else None
    if tqdm is None:
        return iterable
    return tqdm.tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr)


def run_source(
    source: Source,
    grid_args: dict,
    problems: list[str],
    mixed_top: int = 2,
    progress: bool | None = None,
) -> list[Row]:
    """Every scheme on one source (a progress bar over the kvq grid: see ``progress_bar``)."""
    ev = Evaluator(source)
    rows: list[Row] = []
    k, v = source.k, source.v
    head_dim = k.shape[-1]

    gguf = optional("gguf")
    if gguf is None:
        problems.append(f"{source.name}: GGML skipped (pip install gguf)")
    elif head_dim % 32:
        problems.append(f"{source.name}: GGML skipped, head_dim {head_dim} not a multiple of 32")
    else:
        for name in GGML_TYPES:
            k_hat, k_bits = ggml_roundtrip(k, name, gguf)
            v_hat, v_bits = ggml_roundtrip(v, name, gguf)
            rows.append(Row("GGML", name.lower(), (k_bits + v_bits) / 2, *ev.errors(k_hat, v_hat)))

    mx = optional("mlx.core")
    if mx is None:
        problems.append(f"{source.name}: MLX skipped (pip install mlx mlx-cpu)")
    else:
        for group, bits in itertools.product(MLX_GROUPS, MLX_BITS):
            if head_dim % group:
                if bits == MLX_BITS[0]:
                    problems.append(
                        f"{source.name}: MLX g{group} skipped, head_dim {head_dim} is not a "
                        f"multiple of {group}"
                    )
                continue
            k_hat, k_bits = mlx_roundtrip(k, bits, group, mx)
            v_hat, v_bits = mlx_roundtrip(v, bits, group, mx)
            rows.append(
                Row(
                    f"MLX g{group}",
                    f"mx.quantize {bits}-bit g{group}",
                    (k_bits + v_bits) / 2,
                    *ev.errors(k_hat, v_hat),
                )
            )

    if not hasattr(kvq, "quantize") or not hasattr(kvq, "Scheme"):
        problems.append(f"{source.name}: kvq rows skipped: kvq has no quantize/Scheme yet")
        return rows
    presets = preset_names()
    skipped: dict[str, int] = {}
    failed: dict[str, list[str]] = {}
    done: dict = {}  # (tensor, scheme) -> (dequantized, bits per element, relative error)

    def roundtrip(name: str, scheme):
        if (name, scheme) not in done:
            x = k if name == "k" else v
            x_hat, bits = kvq_roundtrip(x, scheme)
            err = ev.k_error(x_hat) if name == "k" else ev.v_error(x_hat)
            done[name, scheme] = (x_hat, bits, err)
        return done[name, scheme]

    def pair_row(ks, vs, note: str = "") -> Row:
        (k_hat, k_bits, k_err), (v_hat, v_bits, v_err) = roundtrip("k", ks), roundtrip("v", vs)
        note = note or presets.get((scheme_key(ks), scheme_key(vs)), "")
        return Row(
            "kvq",
            f"K {describe(ks)} / V {describe(vs)}",
            (k_bits + v_bits) / 2,
            k_err,
            v_err,
            ev.attn_error(k_hat, v_hat),
            note=note,
        )

    # per bits: every K and V scheme with the attention error of its best pair
    best_parts: dict[int, dict[str, dict]] = {}
    blocks = math.prod(
        len(grid_args.get(name, default))
        for name, default in (("bits_list", KVQ_BITS), ("groups", KVQ_GROUPS), ("flags", FLAGS))
    )
    grid = kvq_grid(head_dim, **grid_args)
    for k_schemes, v_schemes in progress_bar(grid, blocks, f"{source.name} kvq grid", progress):
        usable = {"k": [], "v": []}
        for name, schemes, x in (("k", k_schemes, k), ("v", v_schemes, v)):
            for scheme in schemes:
                reason = fits(scheme, x.shape)
                if reason:
                    skipped[reason] = skipped.get(reason, 0) + 1
                    continue
                try:
                    roundtrip(name, scheme)
                except Exception as error:  # report the API problem once, keep going
                    message = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                    failed.setdefault(message, []).append(describe(scheme))
                    continue
                usable[name].append(scheme)
        for ks, vs in itertools.product(usable["k"], usable["v"]):
            row = pair_row(ks, vs)
            rows.append(row)
            parts = best_parts.setdefault(ks.bits, {"k": {}, "v": {}})
            for side, scheme in (("k", ks), ("v", vs)):
                parts[side][scheme] = min(parts[side].get(scheme, np.inf), row.attn_err)
        # keep memory flat: drop dequantized tensors of this block
        for key in [key for key in done if key[1] in k_schemes or key[1] in v_schemes]:
            del done[key]
    for reason, count in skipped.items():
        problems.append(f"{source.name}: {count} kvq schemes skipped: {reason}")
    for message, schemes in failed.items():
        problems.append(
            f"{source.name}: kvq failed on {len(schemes)} schemes (first: {schemes[0]}): {message}"
        )

    # K at one bits, V at another: the best ``mixed_top`` K and V schemes of each bits crossed
    picks = {
        side: {
            bits: sorted(parts[side], key=parts[side].get)[:mixed_top]
            for bits, parts in best_parts.items()
        }
        for side in ("k", "v")
    }
    for k_bits, v_bits in itertools.permutations(sorted(best_parts), 2):
        for ks, vs in itertools.product(picks["k"][k_bits], picks["v"][v_bits]):
            rows.append(pair_row(ks, vs, note="mixed bits"))
    return rows


# --- reporting -----------------------------------------------------------------------------


def pareto(rows: list[Row]) -> list[Row]:
    """Rows no other row beats on both bits and attention error, by increasing bits."""
    front: list[Row] = []
    for row in sorted(rows, key=lambda r: (r.bits, r.attn_err)):
        if not front or row.attn_err < front[-1].attn_err:
            front.append(row)
    return front


def best_kvq(rows: list[Row], budget: float) -> Row | None:
    fitting = [r for r in rows if r.method == "kvq" and r.bits <= budget + 1e-9]
    return min(fitting, key=lambda r: r.attn_err) if fitting else None


def target_lines(source_name: str, rows: list[Row]) -> list[str]:
    ggml = {r.label: r for r in rows if r.method == "GGML"}
    lines = []
    for budget, name, factor in TARGETS:
        peer = ggml.get(name.lower())
        best = best_kvq(rows, budget)
        if peer is None or best is None:
            lines.append(
                f"- SKIP {source_name}: best kvq <= {budget} bits vs {name.lower()}: "
                f"{'no GGML row' if peer is None else 'no kvq row'}"
            )
            continue
        ratio = best.attn_err / peer.attn_err
        ok = ratio <= factor
        want = (
            f"at least {100 * (1 - factor):.0f}% below"
            if factor < 1
            else f"within {100 * (factor - 1):.0f}% of"
        )
        lines.append(
            f"- {'PASS' if ok else 'MISS'} {source_name}: best kvq <= {budget} bits is {want} "
            f"{name.lower()}: attention error {best.attn_err:.3e} vs {peer.attn_err:.3e} "
            f"= {ratio:.2f}x (target <= {factor}x) with {best.label} "
            f"({best.bits:.3f} bits{', ' + best.note if best.note else ''})"
        )
    return lines


def fmt_rows(rows: list[Row]) -> list[list[str]]:
    return [
        [
            r.method,
            r.label + (f" ({r.note})" if r.note else ""),
            f"{r.bits:.3f}",
            f"{r.k_err:.3e}",
            f"{r.v_err:.3e}",
            f"{r.attn_err:.3e}",
        ]
        for r in rows
    ]


HEADER = ["method", "configuration", "bits/elem", "K rel err", "V rel err", "attn-out rel err"]


def source_report(source: Source, rows: list[Row], seconds: float) -> list[str]:
    front = pareto(rows)
    kvq_rows = [r for r in rows if r.method == "kvq"]
    shown = [r for r in rows if r.method != "kvq"]
    shown += [r for r in pareto(kvq_rows) if r not in shown]
    shown += [r for r in kvq_rows if r.note and r.note != "mixed bits" and r not in shown]
    shown.sort(key=lambda r: (r.bits, r.attn_err))
    lines = [
        f"## {source.name}: {source.description}",
        f"({len(rows)} configurations, {len(kvq_rows)} of them kvq, in {seconds:.1f} s; "
        "shown: every peer, kvq's own Pareto front and kvq's presets; all in quality_grid.md)",
        "",
        markdown_table(HEADER, fmt_rows(shown)),
        "",
        f"Pareto front, all methods ({source.name}): lowest attention error at each bits level",
        "",
        markdown_table(HEADER, fmt_rows(front)),
        "",
    ]
    return lines


def plot(results: dict[str, list[Row]], path: Path) -> Path | None:
    plt = optional("matplotlib.pyplot")
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5), squeeze=False)
    styles = {
        "kvq": {"marker": "o", "color": "tab:blue", "s": 14, "alpha": 0.35},
        "MLX g32": {"marker": "s", "color": "tab:orange", "s": 45},
        "MLX g64": {"marker": "D", "color": "tab:green", "s": 45},
        "GGML": {"marker": "^", "color": "tab:red", "s": 80},
    }
    for ax, (name, rows) in zip(axes[0], results.items(), strict=True):
        for method, style in styles.items():
            chosen = [r for r in rows if r.method == method]
            if chosen:
                ax.scatter(
                    [r.bits for r in chosen],
                    [r.attn_err for r in chosen],
                    label=method if method != "kvq" else "kvq (grid)",
                    **style,
                )
        kvq_front = pareto([r for r in rows if r.method == "kvq"])
        if kvq_front:
            ax.plot(
                [r.bits for r in kvq_front],
                [r.attn_err for r in kvq_front],
                "-",
                drawstyle="steps-post",
                color="tab:blue",
                lw=1.5,
                label="kvq Pareto front",
            )
        for r in rows:
            if r.method == "GGML":
                ax.annotate(
                    r.label,
                    (r.bits, r.attn_err),
                    textcoords="offset points",
                    xytext=(5, 5),
                    fontsize=8,
                    color="tab:red",
                )
        ax.set_yscale("log")
        ax.set_xlabel("bits per element (K and V averaged)")
        ax.set_ylabel("attention-output relative error")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data and grid (smoke run)")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (tqdm) on stderr; default: when stderr is a terminal",
    )
    args = parser.parse_args(argv)
    if args.quick:
        synthetic = {"layers": 1, "heads": 4, "tokens": 256, "head_dim": 64, "queries": 32}
        real = {"sequences": 1, "tokens": 128, "queries": 32}
        grid = {"groups": (32,), "flags": ((False, False), (True, True))}
    else:
        synthetic = {"layers": 2, "heads": 8, "tokens": 2048, "head_dim": 64, "queries": 128}
        real = {"sequences": 4, "tokens": 512, "queries": 128}
        grid = {}
    mpl = optional("matplotlib")
    if mpl is not None:
        mpl.use("Agg")

    start = time.perf_counter()
    problems: list[str] = []
    sources = [synthetic_source(**synthetic)]
    try:
        sources.append(real_source(**real))
    except Exception as reason:  # real_kv.Unavailable, or anything the package breaks
        problems.append(f"MiniLM source skipped: {reason}")
        print(f"MiniLM source skipped: {reason}")

    results: dict[str, list[Row]] = {}
    lines = [
        "# quality: error against bits per element, kvq vs MLX vs GGML"
        + (" (--quick)" if args.quick else ""),
        f"{machine()}; {versions('mlx', 'gguf')}",
        "Errors: mean over head slices of the per-slice relative Frobenius error; attention "
        "not causal, o = softmax(q K^T / sqrt d) V. Inputs rounded to float16 first.",
        "",
    ]
    for source in sources:
        t = time.perf_counter()
        rows = run_source(source, grid, problems, progress=args.progress)
        results[source.name] = rows
        lines += source_report(source, rows, time.perf_counter() - t)

    lines.append("## Targets")
    lines.append("")
    ordered = sorted(results, key=lambda n: n != TARGET_SOURCE)
    for name in ordered:
        lines += target_lines(name, results[name])
    if TARGET_SOURCE not in results:
        lines.append(f"- SKIP targets on {TARGET_SOURCE}: source unavailable")
    if problems:
        lines += ["", "Notes:"] + [f"- {p}" for p in problems]
    picture = plot(results, RESULTS / "quality.png")
    elapsed = time.perf_counter() - start
    lines += ["", f"Total {elapsed:.1f} s" + (f"; plot: {picture}" if picture else "; no plot")]
    report = "\n".join(lines)
    print(report)
    grid_lines = ["# quality: every configuration", ""]
    for name, rows in results.items():
        ordered_rows = sorted(rows, key=lambda r: (r.method, r.bits, r.attn_err))
        grid_lines += [f"## {name}", "", markdown_table(HEADER, fmt_rows(ordered_rows)), ""]
    saved = save("quality.md", report)
    save("quality_grid.md", "\n".join(grid_lines))
    print(f"\n(saved to {saved}; {time.strftime('%Y-%m-%d %H:%M')})")


if __name__ == "__main__":
    main()
