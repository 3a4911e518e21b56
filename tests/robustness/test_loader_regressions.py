"""One test per loader bug found by fuzzing (tests/robustness/test_fuzz_loader.py).

Each names the input that broke the contract ("a result or kvq.LoaderError, nothing else")
and what kvq did before the fix.
"""

import json
import struct
import tracemalloc

import numpy as np
import pytest

import kvq
from kvq._safetensors import MAX_DIMS, MAX_ELEMENTS, MAX_HEADER_BYTES
from tests.safetensors_files import write_raw, write_tensors

F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def write_text(path, text: str, data: bytes = b""):
    """A file whose header is ``text`` verbatim (repeated keys, deep nesting, ...)."""
    raw = text.encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def refused(path, *match: str) -> str:
    with pytest.raises(kvq.LoaderError) as raised:
        ckpt = kvq.load_safetensors(path)
        for name in ckpt:
            ckpt[name]
    message = str(raised.value)
    for part in match:
        assert part in message, message
    return message


# Before: np.empty / reshape raised a bare ValueError ("array is too big", "Maximum allowed
# dimension exceeded") when the empty tensor was read; listing had succeeded.
@pytest.mark.parametrize(
    "shape", [[0, 2**62], [0, 2**70], [0, 2**40, 2**40], [2**49, 0], [0, MAX_ELEMENTS + 1]]
)
def test_empty_tensor_with_absurd_dimensions_is_refused_at_open(tmp_path, shape):
    path = write_raw(
        tmp_path / "m.safetensors", {"t": {**F32, "shape": shape, "data_offsets": [0, 0]}}
    )
    refused(path, "m.safetensors", "tensor 't'", f"{MAX_ELEMENTS} element limit")


def test_empty_tensor_with_large_but_allowed_dimensions_loads_empty(tmp_path):
    shape = [0, 2**40, 2**8]  # product of non-zero dims 2**48: at the limit
    path = write_raw(
        tmp_path / "m.safetensors", {"t": {**F32, "shape": shape, "data_offsets": [0, 0]}}
    )
    tracemalloc.start()
    try:
        array = kvq.load_safetensors(path)["t"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert array.shape == tuple(shape) and array.size == 0 and array.dtype == np.float32
    assert peak < 2**20


# Before: the same MXFP4 case failed in np.empty of the dequantized (..., G * 32) output.
def test_empty_mxfp4_pair_with_absurd_groups_is_refused(tmp_path):
    header = {
        "w_blocks": {"dtype": "U8", "shape": [0, 2**58, 16], "data_offsets": [0, 0]},
        "w_scales": {"dtype": "U8", "shape": [0, 2**58], "data_offsets": [0, 0]},
    }
    refused(write_raw(tmp_path / "m.safetensors", header), "'w_blocks'", "element limit")


# Before: ValueError "maximum supported dimension for an ndarray is currently 64" on access.
@pytest.mark.parametrize("ndim", [MAX_DIMS + 1, 70])
def test_too_many_dimensions_is_refused(tmp_path, ndim):
    header = {"t": {**F32, "shape": [1] * ndim, "data_offsets": [0, 4]}}
    refused(write_raw(tmp_path / "m.safetensors", header, bytes(4)), f"{ndim} dimensions")


def test_thirty_two_dimensions_still_load(tmp_path):
    header = {"t": {**F32, "shape": [1] * MAX_DIMS, "data_offsets": [0, 4]}}
    path = write_raw(tmp_path / "m.safetensors", header, np.float32(1.5).tobytes())
    assert kvq.load_safetensors(path)["t"].reshape(-1).tolist() == [1.5]


# Before: RecursionError escaped from json.loads for a header nested ~1000 deep.
@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deeply_nested_header_is_refused(tmp_path, opener):
    closer = "]" if opener == "[" else "}"
    path = write_text(tmp_path / "m.safetensors", opener * 100_000 + "0" + closer * 100_000)
    refused(path, "m.safetensors", "nested too deeply")


def test_deeply_nested_index_is_refused(tmp_path):
    write_tensors(tmp_path / "a.safetensors", {"t": ("F32", (1,), bytes(4))})
    index = '{"weight_map": {"t": "a.safetensors"}, "metadata": ' + "[" * 50_000
    index += "0" + "]" * 50_000 + "}"
    (tmp_path / "model.safetensors.index.json").write_text(index)
    refused(tmp_path, "model.safetensors.index.json", "nested too deeply")


# Before: TypeError "unhashable type: 'list'" from `dtype not in DTYPES`.
@pytest.mark.parametrize("dtype", [[], ["F32"], {"F32": 1}])
def test_unhashable_dtype_is_refused(tmp_path, dtype):
    path = write_raw(tmp_path / "m.safetensors", {"t": {**F32, "dtype": dtype}}, bytes(8))
    refused(path, "tensor 't'", "unknown dtype")


# Before: json.loads kept the last copy of a repeated key, silently dropping a tensor (or a
# field, or a metadata value, or an index entry).
@pytest.mark.parametrize(
    "text",
    [
        '{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
        '"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
        '{"t": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}',
        '{"__metadata__": {"a": "1", "a": "2"}}',
    ],
)
def test_repeated_keys_are_refused(tmp_path, text):
    refused(write_text(tmp_path / "m.safetensors", text, bytes(8)), "repeats the key")


def test_repeated_key_in_index_is_refused(tmp_path):
    write_tensors(tmp_path / "a.safetensors", {"t": ("F32", (1,), bytes(4))})
    write_tensors(tmp_path / "b.safetensors", {"u": ("F32", (1,), bytes(4))})
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"t": "a.safetensors", "t": "b.safetensors", "u": "b.safetensors"}}'
    )
    refused(tmp_path, "model.safetensors.index.json", "repeats the key 't'")


# Before: `header.pop("__metadata__") or {}` accepted [], 0, "" and false as "no metadata".
@pytest.mark.parametrize("metadata", [[], 0, "", False, [["a", "b"]]])
def test_metadata_that_is_not_an_object_is_refused(tmp_path, metadata):
    path = write_raw(tmp_path / "m.safetensors", {"__metadata__": metadata})
    refused(path, "__metadata__ must map strings to strings")


def test_null_metadata_means_none(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", {"__metadata__": None, "t": F32}, bytes(8))
    ckpt = kvq.load_safetensors(path)
    assert ckpt.metadata == {} and list(ckpt) == ["t"]


# Before: bytes other than 0 and 1 came back as a NumPy bool array holding them, on which
# ~x and x ^ y give neither True nor False bit patterns.
def test_bool_tensor_with_other_bytes_is_refused_on_access(tmp_path):
    path = write_tensors(
        tmp_path / "m.safetensors",
        {"ok": ("BOOL", (3,), bytes([0, 1, 1])), "bad": ("BOOL", (2, 2), bytes([1, 0, 7, 1]))},
    )
    ckpt = kvq.load_safetensors(path)
    assert ckpt["ok"].tolist() == [False, True, True]
    with pytest.raises(kvq.LoaderError, match="'bad' is BOOL but holds byte 7 at flat index 2"):
        ckpt["bad"]


# Before (this branch's first index fix, caught by the fuzzer): reading the index with
# handle.read(limit + 1) allocated the whole 100 MB limit for a 30-byte file.
def test_index_read_allocates_its_size_not_the_limit(tmp_path):
    write_tensors(tmp_path / "a.safetensors", {"t": ("F32", (1,), bytes(4))})
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"t": "a.safetensors"}}'
    )
    kvq.load_safetensors(tmp_path)  # warm
    tracemalloc.start()
    try:
        ckpt = kvq.load_safetensors(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert list(ckpt) == ["t"] and peak < 2**20


def test_index_over_the_limit_is_refused_unread(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    with open(index, "wb") as handle:  # sparse: no disk is used
        handle.truncate(MAX_HEADER_BYTES + 1)
    tracemalloc.start()
    try:
        message = refused(tmp_path, "over the", "limit for an index")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(MAX_HEADER_BYTES + 1) in message and peak < 2**20


# Before: messages held the whole offending value: a 10 MB string in a shape made a 10 MB
# message (and a name of any length was repeated in full).
def test_messages_stay_short_whatever_the_file_holds(tmp_path):
    junk = "x" * 10_000_000
    header = {"n" * 1_000_000: {**F32, "shape": [junk]}}
    message = refused(write_raw(tmp_path / "m.safetensors", header, bytes(8)), "shape must be")
    assert len(message) < 600
    nested = '{"t": {"dtype": ' + "[" * 900 + "1" + "]" * 900 + ', "shape": [1]}}'
    message = refused(write_text(tmp_path / "d.safetensors", nested), "unknown dtype [[[")
    assert len(message) < 600


def test_valid_files_still_round_trip(tmp_path):
    """The fixes refuse nothing the safetensors package writes."""
    from safetensors.numpy import save_file

    tensors = {
        "b": np.array([[True, False]]),
        "f": np.arange(6, dtype=np.float32).reshape(1, 2, 3),
        "é中": np.zeros((0, 4), np.int16),
    }
    save_file(tensors, tmp_path / "m.safetensors", metadata={"k": "v"})
    ckpt = kvq.load_safetensors(tmp_path / "m.safetensors")
    assert ckpt.metadata == {"k": "v"}
    for name, expected in tensors.items():
        np.testing.assert_array_equal(ckpt[name], expected)
    assert json.loads(json.dumps(sorted(ckpt))) == sorted(tensors)
