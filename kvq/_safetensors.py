"""Parse and validate one SafeTensors file's header; map its data lazily.

Layout: an 8-byte little-endian header length N, N bytes of JSON, then the data. The JSON maps
tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data) and may hold ``"__metadata__"`` (str -> str). Everything in the file is untrusted: every
field is checked before any tensor is touched, and every failure is a LoaderError naming the
file (and tensor).
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
import reprlib
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvq.errors import LoaderError

#: Largest JSON header accepted (the safetensors library's own limit is 100 MB); shard indexes
#: are held to the same limit.
MAX_HEADER_BYTES = 100 * 2**20
#: Most dimensions a tensor may have (NumPy 1.x's limit; NumPy 2 allows 64).
MAX_DIMS = 32
#: Largest product of a shape's non-zero dimensions. A non-empty tensor is bounded by the file
#: anyway; this bounds empty ones such as [0, 2**62], which NumPy cannot even describe.
MAX_ELEMENTS = 2**48

#: SafeTensors dtype -> (NumPy dtype it is read as, bytes per element). BF16 is read as its
#: uint16 bit patterns and the F8 types as uint8 bytes; the loader converts or refuses them.
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "BOOL": (np.dtype("?"), 1),
    "U8": (np.dtype("u1"), 1),
    "I8": (np.dtype("i1"), 1),
    "U16": (np.dtype("<u2"), 2),
    "I16": (np.dtype("<i2"), 2),
    "U32": (np.dtype("<u4"), 4),
    "I32": (np.dtype("<i4"), 4),
    "U64": (np.dtype("<u8"), 8),
    "I64": (np.dtype("<i8"), 8),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "F32": (np.dtype("<f4"), 4),
    "F64": (np.dtype("<f8"), 8),
    "F8_E4M3": (np.dtype("u1"), 1),
    "F8_E5M2": (np.dtype("u1"), 1),
}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lies: its file, SafeTensors dtype, shape and byte range in the data."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafeTensorsFile:
    """One file: the validated header now, a read-only memory map on first tensor access."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tensors, self.metadata, self.data_start = _read_header(self.path)
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()

    def array(self, name: str) -> np.ndarray:
        """The raw tensor as a read-only array on the memory map (no copy; BF16 as uint16)."""
        info = self.tensors[name]
        numpy_dtype, _ = DTYPES[info.dtype]
        count = math.prod(info.shape)
        if count == 0:
            return np.empty(info.shape, numpy_dtype)
        data = np.frombuffer(
            self._mapped(), numpy_dtype, count=count, offset=self.data_start + info.begin
        )
        return data.reshape(info.shape)

    def _mapped(self) -> mmap.mmap:
        with self._lock:
            if self._map is None:
                try:
                    with open(self.path, "rb") as handle:
                        size = os.fstat(handle.fileno()).st_size
                        if size < self.data_start + max(
                            (t.end for t in self.tensors.values()), default=0
                        ):
                            raise LoaderError(f"{self.path}: file shrank after it was opened")
                        self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                except OSError as error:
                    raise LoaderError(f"{self.path}: cannot map ({error})") from None
            return self._map


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """(tensors, metadata, data_start) from the file's header, every field checked."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise LoaderError(
                    f"{path}: truncated: {size} bytes, too short for the 8-byte header length"
                )
            header_length = int.from_bytes(prefix, "little")
            if header_length > size - 8:
                raise LoaderError(
                    f"{path}: header length {header_length} runs past the end of the file "
                    f"({size} bytes)"
                )
            if header_length > MAX_HEADER_BYTES:
                raise LoaderError(
                    f"{path}: header of {header_length} bytes exceeds the "
                    f"{MAX_HEADER_BYTES} byte limit"
                )
            raw = handle.read(header_length)
    except OSError as error:
        raise LoaderError(f"{path}: cannot read ({error.strerror or error})") from None
    if len(raw) != header_length:
        raise LoaderError(f"{path}: truncated header")
    header = parse_json(raw, f"{path}: header")
    if not isinstance(header, dict):
        raise LoaderError(f"{path}: header is a JSON {type(header).__name__}, not an object")
    data_start = 8 + header_length
    data_size = size - data_start
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise LoaderError(f"{path}: __metadata__ must map strings to strings")
    tensors = {name: _tensor_info(path, name, entry, data_size) for name, entry in header.items()}
    _check_no_overlap(path, tensors)
    return tensors, metadata, data_start


def parse_json(raw: bytes, what: str):
    """UTF-8 JSON text -> Python value; LoaderError starting with ``what`` for invalid text, an
    object with a repeated key (which copy would count?), or nesting too deep to parse."""

    def no_repeats(pairs: list[tuple[str, object]]) -> dict:
        result = dict(pairs)
        if len(result) != len(pairs):
            seen: set[str] = set()
            repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise LoaderError(f"{what} repeats the key {show(repeated)}")
        return result

    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=no_repeats)
    except (UnicodeDecodeError, ValueError) as error:
        if isinstance(error, LoaderError):
            raise
        raise LoaderError(f"{what} is not valid JSON ({error})") from None
    except RecursionError:
        raise LoaderError(f"{what} is nested too deeply to be a SafeTensors header") from None


def _tensor_info(path: Path, name: str, entry, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {show(name)}"
    if not isinstance(entry, dict):
        raise LoaderError(f"{where}: entry is a JSON {type(entry).__name__}, not an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise LoaderError(f"{where}: unknown dtype {show(dtype)}; known: {', '.join(DTYPES)}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise LoaderError(
            f"{where}: shape must be a list of non-negative integers, got {show(shape)}"
        )
    if len(shape) > MAX_DIMS:
        raise LoaderError(f"{where}: shape has {len(shape)} dimensions, more than {MAX_DIMS}")
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise LoaderError(
            f"{where}: shape {show(shape)} has dimensions whose product exceeds the "
            f"{MAX_ELEMENTS} element limit"
        )
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise LoaderError(
            f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, "
            f"got {show(offsets)}"
        )
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != expected:
        raise LoaderError(
            f"{where}: shape {tuple(shape)} of {dtype} needs {expected} bytes, but its byte "
            f"range [{begin}, {end}) holds {end - begin}"
        )
    if end > data_size:
        raise LoaderError(
            f"{where}: byte range [{begin}, {end}) lies outside the {data_size} bytes of data"
        )
    return TensorInfo(path, dtype, tuple(shape), begin, end)


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    spans = sorted((t.begin, t.end, name) for name, t in tensors.items() if t.end > t.begin)
    for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
        if begin < end:
            raise LoaderError(
                f"{path}: tensors {show(first)} and {show(second)} overlap "
                f"(byte {begin} is in both)"
            )


_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 120
_SHOW.maxlist = _SHOW.maxdict = 8
_SHOW.maxlevel = 3


def show(value) -> str:
    """A short repr of a value read from a file, for error messages: long strings and lists
    are cut and deep nesting elided (plain repr of a deeply nested list recurses)."""
    return _SHOW.repr(value)
