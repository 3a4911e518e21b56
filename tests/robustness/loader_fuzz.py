"""Hostile SafeTensors inputs for kvq.load_safetensors, as Hypothesis strategies, and a runner.

Used by ``tests/robustness/test_fuzz_loader.py`` (time-bounded, in the unit run) and by
``bench/fuzz_loader.py`` (longer runs by hand). A *case* is a set of files written to a fresh
directory and the path to open: one file, or the directory (shard index, ``model.safetensors``
or a glob of ``*.safetensors``). :func:`exercise` opens it, lists, describes and reads every
tensor, and the contract is: a result, or ``kvq.LoaderError`` — no other exception, no crash,
no allocation out of proportion to the bytes on disk (checked with tracemalloc), and what
loads agrees with its ``info()`` and, byte for byte, with the safetensors package.
"""

from __future__ import annotations

import json
import math
import re
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

import kvq
import kvq.loader
from kvq._safetensors import DTYPES

#: Allocation allowed while opening and reading a case: a fixed allowance (JSON parsing,
#: bookkeeping) plus a multiple of the bytes on disk (MXFP4 turns 17 bytes into 32 float32s).
ALLOC_FIXED = 4 * 2**20
ALLOC_PER_BYTE = 64

BATCH = 50  # examples per Hypothesis run; the runner repeats runs until its time is up

# --- building blocks -------------------------------------------------------------------------

NAMES = st.one_of(
    st.sampled_from(["w", "model.layers.0.k_proj.weight", "t", "x_blocks", "x_scales", "a"]),
    st.text(max_size=12),  # any code point, NUL and lone surrogates included
    st.text(alphabet="éß中\U0001f600\u202e", min_size=1, max_size=6),
)

HUGE_INTS = st.sampled_from(
    [-1, 2**31, 2**32, 2**48, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]
)

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    HUGE_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)

JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


DTYPE_NAMES = st.sampled_from(sorted(DTYPES))
SMALL_SHAPES = st.lists(st.integers(0, 5), max_size=3)
BAD_DTYPES = st.one_of(
    st.sampled_from(["f32", "Q4", "", "F4", "F32 ", "BF16\x00", "MXFP4", "I128"]),
    DTYPE_NAMES,  # a valid but wrong dtype
    JSON_VALUES,
)
BAD_SHAPES = st.one_of(
    st.lists(st.one_of(st.integers(0, 8), HUGE_INTS), max_size=5),
    st.sampled_from([[0, 2**62], [0, 2**40, 2**40], [2**32, 2**32], [1] * 70, [0] * 40]),
    st.lists(JSON_SCALARS, max_size=3),
    JSON_VALUES,
)


@dataclass
class Tensor:
    name: str
    dtype: str
    shape: list[int]
    payload: bytes


@dataclass
class Case:
    """Files (relative name -> bytes) to write, and which one to open ("" = the directory)."""

    files: dict[str, bytes]
    target: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.files.values())


@st.composite
def tensors(draw, prefix: str = "", max_tensors: int = 4) -> list[Tensor]:
    """Valid tensors: any SafeTensors dtype, small shapes (zero-size too), random bytes;
    sometimes a well-formed GPT-OSS MXFP4 pair."""
    result: list[Tensor] = []
    used: set[str] = set()
    for _ in range(draw(st.integers(0, max_tensors))):
        name = prefix + draw(NAMES)
        if name in used or name == "__metadata__":
            continue
        used.add(name)
        dtype = draw(DTYPE_NAMES)
        shape = draw(SMALL_SHAPES)
        size = math.prod(shape) * DTYPES[dtype][1]
        if dtype == "BOOL" and draw(st.booleans()):
            payload = bytes(draw(st.lists(st.integers(0, 1), min_size=size, max_size=size)))
        else:
            payload = draw(st.binary(min_size=size, max_size=size))
        result.append(Tensor(name, dtype, shape, payload))
    if draw(st.booleans()):
        stem = prefix + draw(st.sampled_from(["mlp.experts.down_proj", "e", "é"]))
        if not {stem, stem + "_blocks", stem + "_scales"} & used:
            lead = draw(st.lists(st.integers(0, 3), max_size=2))
            groups = draw(st.integers(0, 3))
            blocks = [*lead, groups, 16]
            scales = [*lead, groups]
            result.append(Tensor(stem + "_blocks", "U8", blocks, draw(_bytes(math.prod(blocks)))))
            result.append(Tensor(stem + "_scales", "U8", scales, draw(_bytes(math.prod(scales)))))
    return result


def _bytes(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


def layout(items: list[Tensor], gaps: list[int] | None = None) -> tuple[dict, bytes]:
    """(header dict, data) with the tensors laid out in order (optional gaps between them)."""
    header: dict = {}
    data = b""
    for i, t in enumerate(items):
        if gaps:
            data += bytes(gaps[i % len(gaps)])
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [len(data), len(data) + len(t.payload)],
        }
        data += t.payload
    return header, data


def nest_marker(depth: int) -> str:
    """A string that :func:`dumps` replaces by lists nested ``depth`` deep (json.dumps itself
    recurses, so it cannot write them)."""
    return f"@@nest{depth}@@"


def dumps(value, ascii_only: bool = True) -> str:
    """json.dumps, with each :func:`nest_marker` string replaced by deeply nested lists."""
    text = json.dumps(value, ensure_ascii=ascii_only)
    for depth in {int(m) for m in re.findall(r'"@@nest(\d+)@@"', text)}:
        text = text.replace(f'"@@nest{depth}@@"', "[" * depth + "0" + "]" * depth)
    return text


def encode(header, ascii_only: bool = True, duplicate: str | None = None, pad: bool = True):
    """A SafeTensors file's first part: 8-byte length, JSON text (optionally with one key
    written twice, and invalid UTF-8 when a name holds a lone surrogate), space padding."""
    text = dumps(header, ascii_only)
    if duplicate is not None and isinstance(header, dict) and header:
        key = next(iter(header)) if duplicate not in header else duplicate
        first = dumps({key: header[key]}, ascii_only)[1:-1]
        text = "{" + first + ", " + text[1:]
    raw = text.encode("utf-8", errors="surrogatepass")
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


# --- header edits ----------------------------------------------------------------------------


def hostile_value(draw, key: str, header: dict, data_size: int):
    """A wrong value for ``key`` of a tensor entry."""
    if key == "dtype":
        return draw(BAD_DTYPES)
    if key == "shape":
        return draw(BAD_SHAPES)
    ends = [0, 1, data_size - 1, data_size, data_size + 1, 2**63, 2**64, 10**30]
    others = [e.get("data_offsets") for e in header.values() if isinstance(e, dict)]
    others = [o for o in others if isinstance(o, list) and len(o) == 2]
    choices = [
        st.tuples(st.sampled_from(ends), st.sampled_from(ends)).map(list),
        st.tuples(st.integers(-3, data_size + 3), st.integers(-3, data_size + 3)).map(list),
        st.lists(st.integers(0, data_size), max_size=3),
        st.lists(JSON_SCALARS, max_size=2),
        JSON_VALUES,
    ]
    if others:  # overlapping with, or reversed from, another tensor's range
        other = draw(st.sampled_from(others))
        choices.append(
            st.sampled_from([other, other[::-1], [o + 1 for o in other if type(o) is int]])
        )
    return draw(st.one_of(choices))


@st.composite
def edited_header(draw, header: dict, data_size: int) -> dict:
    """``header`` with 1-3 hostile edits."""
    header = json.loads(json.dumps(header))
    for _ in range(draw(st.integers(1, 3))):
        names = [n for n in header if n != "__metadata__"]
        kind = draw(
            st.sampled_from(
                ["set", "set", "set", "drop_field", "drop", "add", "rename", "metadata", "nest"]
            )
        )
        if kind in ("set", "drop_field") and names:
            name = draw(st.sampled_from(names))
            entry = header[name]
            if not isinstance(entry, dict):
                continue
            key = draw(st.sampled_from(["dtype", "shape", "data_offsets", "junk"]))
            if kind == "drop_field":
                entry.pop(key, None)
            else:
                entry[key] = hostile_value(draw, key, header, data_size)
        elif kind == "drop" and names:
            del header[draw(st.sampled_from(names))]
        elif kind == "add":
            name = draw(NAMES)
            header[name] = draw(
                st.one_of(
                    JSON_VALUES,
                    st.fixed_dictionaries(
                        {
                            "dtype": DTYPE_NAMES,
                            "shape": st.lists(st.integers(0, 4), max_size=3),
                            "data_offsets": st.lists(st.integers(0, data_size + 2), max_size=3),
                        }
                    ),
                )
            )
        elif kind == "rename" and names:
            old = draw(st.sampled_from(names))
            header[draw(NAMES)] = header.pop(old)
        elif kind == "metadata":
            header["__metadata__"] = draw(
                st.one_of(JSON_VALUES, st.dictionaries(st.text(max_size=5), st.text(max_size=5)))
            )
        elif kind == "nest" and names:
            header[draw(st.sampled_from(names))] = nest_marker(draw(st.integers(1, 5000)))
    return header


@st.composite
def mxfp4_mismatch(draw, data_size: int) -> dict:
    """An MXFP4 pair whose shapes or dtypes disagree, laid out within ``data_size`` bytes."""
    lead = draw(st.lists(st.integers(0, 3), max_size=2))
    groups = draw(st.integers(0, 3))
    blocks = draw(
        st.sampled_from(
            [[*lead, groups, 16], [*lead, groups, 15], [16], [*lead, groups + 1, 16], []]
        )
    )
    scales = draw(st.sampled_from([[*lead, groups], [*lead, groups + 1], [groups], [], [1, 1]]))
    dtypes = draw(st.sampled_from([("U8", "U8"), ("I8", "U8"), ("U8", "F16"), ("BF16", "U8")]))
    stem = draw(st.sampled_from(["w", "mlp.experts.gate_up_proj", ""]))
    header = {}
    at = 0
    for suffix, shape, dtype in (("_blocks", blocks, dtypes[0]), ("_scales", scales, dtypes[1])):
        size = math.prod(shape) * DTYPES[dtype][1]
        header[stem + suffix] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + size]}
        at += size
    return header


# --- byte mutations --------------------------------------------------------------------------


@st.composite
def mutated_bytes(draw, raw: bytes) -> bytes:
    """``raw`` with 1-3 byte-level mutations: bit flips, truncation, a new header length,
    inserted or deleted bytes, junk appended."""
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "flip", "truncate", "length", "insert", "delete"]))
        if kind == "flip" and data:
            for _ in range(draw(st.integers(1, 8))):
                at = draw(st.integers(0, len(data) - 1))
                data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "length":
            size = len(data)
            value = draw(
                st.one_of(
                    st.sampled_from(
                        [0, 1, 2, size - 9, size - 8, size - 7, size, 2**31, 2**63, 2**64 - 1]
                    ),
                    st.integers(0, 2**64 - 1),
                    st.integers(0, max(size, 0) + 16),
                )
            )
            value %= 2**64
            data[:8] = struct.pack("<Q", value)
        elif kind == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete" and data:
            at = draw(st.integers(0, len(data) - 1))
            del data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


# --- whole cases -----------------------------------------------------------------------------

FILE = "fuzz.safetensors"


@st.composite
def random_bytes_case(draw) -> Case:
    """Random bytes, raw or behind a plausible header length."""
    body = draw(st.binary(max_size=400))
    if draw(st.booleans()):
        length = draw(st.one_of(st.integers(0, len(body) + 8), HUGE_INTS.map(lambda v: v % 2**64)))
        body = struct.pack("<Q", length) + body
    return Case({FILE: body}, FILE)


@st.composite
def random_json_case(draw) -> Case:
    """A correctly framed header holding random JSON: entries of random values, or anything."""
    header = draw(
        st.one_of(
            JSON_VALUES,
            st.dictionaries(NAMES, JSON_VALUES, max_size=4),
            st.dictionaries(
                NAMES,
                st.fixed_dictionaries(
                    {"dtype": JSON_VALUES, "shape": JSON_VALUES, "data_offsets": JSON_VALUES}
                ),
                max_size=3,
            ),
        )
    )
    data = draw(st.binary(max_size=64))
    raw = encode(header, draw(st.booleans()), pad=draw(st.booleans())) + data
    return Case({FILE: raw}, FILE)


@st.composite
def valid_file(draw, prefix: str = "", max_tensors: int = 4) -> tuple[dict, bytes]:
    """(header, data) of a valid file (possibly with gaps between tensors, and metadata)."""
    items = draw(tensors(prefix, max_tensors))
    gaps = draw(st.one_of(st.none(), st.lists(st.integers(0, 9), min_size=1, max_size=3)))
    header, data = layout(items, gaps)
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3)
        )
    data += bytes(draw(st.integers(0, 8)))  # trailing bytes nothing claims
    return header, data


@st.composite
def mutated_file_case(draw) -> Case:
    """A valid file, then header edits and/or byte mutations (sometimes none: it must load)."""
    header, data = draw(valid_file())
    notes = []
    if draw(st.booleans()):
        header = draw(edited_header(header, len(data)))
        notes.append("header edited")
    if draw(st.integers(0, 4)) == 0:
        extra = draw(mxfp4_mismatch(len(data)))
        for name, entry in extra.items():
            header.setdefault(name, entry)
        data += bytes(max(e["data_offsets"][1] for e in extra.values()))
        notes.append("mxfp4 mismatch")
    duplicate = draw(st.one_of(st.none(), NAMES)) if draw(st.integers(0, 5)) == 0 else None
    raw = encode(header, draw(st.booleans()), duplicate, pad=draw(st.booleans())) + data
    if draw(st.booleans()):
        raw = draw(mutated_bytes(raw))
        notes.append("bytes mutated")
    return Case({FILE: raw}, FILE, notes)


SHARD_NAMES = st.one_of(
    st.sampled_from(
        ["../outside.safetensors", "sub/dir.safetensors", "", ".", "..", "a\x00b", "missing"]
    ),
    st.text(max_size=10),
)


@st.composite
def sharded_case(draw) -> Case:
    """A directory: shards with an index (edited: missing shards, bad names, tensors in the
    wrong or in two shards, junk JSON), or shards alone, or ``model.safetensors``."""
    count = draw(st.integers(1, 3))
    files: dict[str, bytes] = {}
    weight_map: dict = {}
    for i in range(count):
        shard = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        header, data = draw(valid_file(prefix=f"s{i}.", max_tensors=3))
        files[shard] = encode(header) + data
        weight_map.update({n: shard for n in header if n != "__metadata__"})
        if draw(st.integers(0, 5)) == 0:
            files[shard] = draw(mutated_bytes(files[shard]))
    layout_kind = draw(st.sampled_from(["index", "index", "index", "glob", "single"]))
    if layout_kind == "single":
        name, raw = next(iter(files.items()))
        return Case({"model.safetensors": raw}, "")
    if layout_kind == "glob":
        return Case(files, "")
    index: object = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(
            st.sampled_from(
                ["missing", "bad_name", "wrong", "two", "drop_file", "junk", "map_junk", "nest"]
            )
        )
        if kind == "missing":
            weight_map[draw(NAMES)] = draw(st.sampled_from(["gone.safetensors", *files]))
        elif kind == "bad_name" and weight_map:
            weight_map[draw(st.sampled_from(sorted(weight_map)))] = draw(SHARD_NAMES)
        elif kind == "wrong" and weight_map and len(files) > 1:
            name = draw(st.sampled_from(sorted(weight_map)))
            weight_map[name] = draw(st.sampled_from(sorted(files)))
        elif kind == "two" and len(files) > 1:
            _source, target = draw(st.permutations(sorted(files)))[:2]
            header, data = draw(valid_file(prefix="s0.", max_tensors=2))
            files[target] = encode(header) + data
        elif kind == "drop_file" and files:
            del files[draw(st.sampled_from(sorted(files)))]
        elif kind == "junk":
            index = draw(JSON_VALUES)
        elif kind == "map_junk" and isinstance(index, dict):
            index["weight_map"] = draw(JSON_VALUES)
        elif kind == "nest" and isinstance(index, dict):
            index["metadata"] = nest_marker(draw(st.integers(500, 5000)))
    text = dumps(index, draw(st.booleans()))
    if draw(st.integers(0, 5)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    if draw(st.integers(0, 5)) == 0 and isinstance(index, dict):
        text = '{"weight_map": {}, ' + text[1:]  # a repeated key
    files["model.safetensors.index.json"] = text.encode("utf-8", errors="surrogatepass")
    return Case(files, "")


STRATEGIES: dict[str, st.SearchStrategy[Case]] = {
    "random_bytes": random_bytes_case(),
    "random_json": random_json_case(),
    "mutated_file": mutated_file_case(),
    "sharded": sharded_case(),
}
#: How a time budget is shared between the kinds (the unit run and bench/fuzz_loader.py).
SHARES = {"random_bytes": 0.10, "random_json": 0.20, "mutated_file": 0.45, "sharded": 0.25}

# --- running a case --------------------------------------------------------------------------


class Unexpected(AssertionError):
    """The loader broke its contract on a case."""


def write_case(case: Case, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, raw in case.files.items():
        (directory / name).write_bytes(raw)
    return directory / case.target if case.target else directory


def reference_tensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors the ``safetensors`` package itself reads from a file (it has no NumPy
    BF16 or F8, and refuses gaps between tensors): a second opinion on every byte."""
    if not path.is_file():
        return {}
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - a declared dependency
        return {}
    found = {}
    try:
        with safe_open(str(path), framework="np") as handle:
            for name in handle.keys():
                try:
                    found[name] = handle.get_tensor(name)
                except Exception:  # BF16, F8: not NumPy types
                    continue
    except Exception:  # it refused the file: nothing to compare
        return {}
    return found


def exercise(path: Path) -> str:
    """Open ``path``, list, describe and read every tensor. Returns 'loaded', 'refused' (at
    open) or 'partly' (some tensor refused on access); LoaderError is the only exception
    allowed out of kvq, what loads must agree with what the header said, and each tensor
    the safetensors package also reads must hold the same bytes."""
    try:
        ckpt = kvq.load_safetensors(path)
    except kvq.LoaderError:
        return "refused"
    reference = reference_tensors(path)
    names = list(ckpt)
    if len(names) != len(ckpt) or len(set(names)) != len(names):
        raise Unexpected(f"listing gave {names!r} but len() {len(ckpt)}")
    repr(ckpt)
    _ = ckpt.metadata, ckpt.nbytes, ckpt.files
    outcome = "loaded"
    for name in names:
        info = ckpt.info(name)
        if name not in ckpt:
            raise Unexpected(f"{name!r} listed but not contained")
        try:
            array = ckpt[name]
        except kvq.LoaderError:
            outcome = "partly"
            continue
        if array.shape != info.shape:
            raise Unexpected(f"{name!r}: read shape {array.shape}, info says {info.shape}")
        if info.dtype in ("BF16", "MXFP4") and array.dtype != np.float32:
            raise Unexpected(f"{name!r}: {info.dtype} read as {array.dtype}, not float32")
        data = array.tobytes()  # touches every byte: a view past the map's end would fault
        if name in reference:
            other = reference[name]
            if (array.dtype, array.shape, data) != (other.dtype, other.shape, other.tobytes()):
                raise Unexpected(
                    f"{name!r}: kvq read {array.dtype}{array.shape}, safetensors "
                    f"{other.dtype}{other.shape}, or different bytes"
                )
    return outcome


def check_case(case: Case, directory: Path) -> str:
    """Write ``case`` under ``directory``, exercise it while tracing allocations; raises
    Unexpected (or whatever kvq let escape) on a contract breach. Returns the outcome."""
    path = write_case(case, directory)
    tracing = tracemalloc.is_tracing()
    if tracing:
        tracemalloc.reset_peak()
    else:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        outcome = exercise(path)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if not tracing:
            tracemalloc.stop()
    limit = ALLOC_FIXED + ALLOC_PER_BYTE * case.nbytes
    if peak > limit:
        raise Unexpected(
            f"allocated {peak:,} bytes for {case.nbytes:,} bytes on disk (limit {limit:,})"
        )
    return outcome


def warm_up(directory: Path) -> None:
    """Compile (or load from Numba's cache) the BF16 and MXFP4 kernels outside any trace."""
    header, data = layout(
        [
            Tensor("b", "BF16", [2], bytes(4)),  # aligned: a read-only view reaches the kernel
            Tensor("o", "U8", [1], bytes(1)),
            Tensor("u", "BF16", [2], bytes(4)),  # unaligned: a writeable copy does
            Tensor("e_blocks", "U8", [1, 16], bytes(16)),
            Tensor("e_scales", "U8", [1], bytes([127])),
        ]
    )
    path = directory / "warm.safetensors"
    path.write_bytes(encode(header) + data)
    ckpt = kvq.loader.load_safetensors(path)
    for name in ckpt:
        ckpt[name]


@dataclass
class Report:
    """What a run did: inputs tried, outcomes, and each failure (kind, exception, seed)."""

    tried: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def fuzz(
    kind: str,
    seconds: float,
    base_seed: int,
    report: Report | None = None,
    stop_on_failure: bool = True,
    on_batch: Callable[[Report], None] | None = None,
) -> Report:
    """Run Hypothesis on ``STRATEGIES[kind]`` in batches of BATCH examples (batch i seeded
    with ``base_seed + i``, so a run is reproducible) until ``seconds`` have passed; at least
    one batch. A failing batch is shrunk by Hypothesis and re-raised, or, with
    ``stop_on_failure=False``, recorded in the report and the run goes on."""
    report = report or Report()
    strategy = STRATEGIES[kind]
    start = time.monotonic()
    threads = numba.get_num_threads()
    numba.set_num_threads(1)  # tiny files: a parallel launch costs more than the work
    try:
        _run_batches(kind, strategy, seconds, base_seed, report, stop_on_failure, on_batch, start)
    finally:
        numba.set_num_threads(threads)
    report.seconds += time.monotonic() - start
    return report


def _run_batches(kind, strategy, seconds, base_seed, report, stop_on_failure, on_batch, start):
    with tempfile.TemporaryDirectory(prefix="kvq-fuzz-") as tmp:
        root = Path(tmp)
        warm_up(root)
        directory = root / "case"

        def one(case: Case) -> None:
            try:
                outcome = check_case(case, directory)
            finally:
                for child in directory.iterdir():
                    child.unlink()
            report.outcomes[outcome] = report.outcomes.get(outcome, 0) + 1
            report.tried += 1

        batch = 0
        while batch == 0 or time.monotonic() - start < seconds:
            run = settings(
                max_examples=BATCH,
                deadline=None,
                database=None,
                phases=[Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck),
                print_blob=True,
            )(given(case=strategy)(one))
            run = hypothesis_seed(base_seed + batch)(run)
            try:
                run()
            except Exception as error:  # Hypothesis re-raises the shrunk failure
                message = (
                    f"{kind}: seed {base_seed + batch}: {type(error).__name__}: {str(error)[:500]}"
                )
                report.failures.append(message)
                if stop_on_failure:
                    raise
            batch += 1
            if on_batch is not None:
                on_batch(report)
