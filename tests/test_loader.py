"""load_safetensors on files these tests write: dtypes, shards, BF16, MXFP4, broken files."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

import kvq
from kvq._safetensors import SafeTensorsFile
from kvq.errors import LoaderError
from kvq.loader import load_safetensors
from tests.safetensors_files import bf16_bits, mxfp4_reference, write_raw, write_tensors


@pytest.fixture
def tensors(rng):
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((4,)).astype(np.float16),
        "f64": rng.standard_normal((2, 2, 2)),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "i32": np.array([-1, 7], np.int32),
        "u8": np.arange(10, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
    }


def test_single_file_round_trip_zero_copy(tmp_path, tensors):
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "np"})
    ckpt = load_safetensors(tmp_path / "m.safetensors")
    assert set(ckpt) == set(tensors) and len(ckpt) == len(tensors)
    for name, expected in tensors.items():
        got = ckpt[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    assert not ckpt["f32"].flags.writeable  # a view of the read-only memory map
    assert ckpt["f32"].base is not None
    assert ckpt.metadata == {"format": "np"}
    info = ckpt.info("f64")
    assert (info.dtype, info.shape, info.nbytes) == ("F64", (2, 2, 2), 64)


def test_directory_with_model_safetensors(tmp_path, tensors):
    save_file(tensors, tmp_path / "model.safetensors")
    np.testing.assert_array_equal(load_safetensors(tmp_path)["i64"], tensors["i64"])


def make_sharded(tmp_path, rng, shards=3, per_shard=4):
    weight_map, expected = {}, {}
    for s in range(shards):
        part = {
            f"layer{s}.w{i}": rng.standard_normal((8, 16)).astype(np.float32)
            for i in range(per_shard)
        }
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, tmp_path / name)
        weight_map.update(dict.fromkeys(part, name))
        expected.update(part)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return expected


def test_sharded_directory(tmp_path, rng):
    expected = make_sharded(tmp_path, rng)
    ckpt = load_safetensors(tmp_path)
    assert set(ckpt) == set(expected)
    assert len(ckpt.files) == 3
    for name, value in expected.items():
        np.testing.assert_array_equal(ckpt[name], value)


def test_listing_reads_headers_only(tmp_path, rng, monkeypatch):
    make_sharded(tmp_path, rng)

    def refuse(self):
        raise AssertionError("listing must not map tensor data")

    monkeypatch.setattr(SafeTensorsFile, "_mapped", refuse)
    ckpt = load_safetensors(tmp_path)
    assert len(ckpt) == 12
    assert ckpt.info("layer1.w2").shape == (8, 16)
    assert ckpt.nbytes == 12 * 8 * 16 * 4
    assert "12 tensors in 3 file(s)" in repr(ckpt)


def test_bf16_to_float32_exact(tmp_path):
    values = np.array(
        [0.0, -0.0, 1.0, -2.5, 3.14159, 1e-40, -1e38, np.inf, -np.inf, np.nan, 65504.0],
        np.float32,
    )
    bits = bf16_bits(values)
    big = np.random.default_rng(1).integers(0, 2**16, 300_001, dtype=np.uint16)
    write_tensors(
        tmp_path / "bf.safetensors",
        {"small": ("BF16", (11,), bits.tobytes()), "big": ("BF16", (300_001,), big.tobytes())},
    )
    ckpt = load_safetensors(tmp_path / "bf.safetensors")
    got = ckpt["small"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), bits.astype(np.uint32) << 16)
    np.testing.assert_array_equal(ckpt["big"].view(np.uint32), big.astype(np.uint32) << 16)
    assert ckpt.info("small").dtype == "BF16"


def test_dtype_converts_floating_only(tmp_path, tensors):
    save_file(tensors, tmp_path / "m.safetensors")
    ckpt = load_safetensors(tmp_path / "m.safetensors", dtype=np.float32)
    assert ckpt["f16"].dtype == np.float32 and ckpt["f64"].dtype == np.float32
    np.testing.assert_array_equal(ckpt["f16"], tensors["f16"].astype(np.float32))
    assert ckpt["i64"].dtype == np.int64
    with pytest.raises(TypeError, match="floating dtype"):
        load_safetensors(tmp_path / "m.safetensors", dtype=np.int32)


def test_mxfp4_pairs_are_dequantized(tmp_path, rng):
    blocks = rng.integers(0, 256, (2, 3, 5, 16), dtype=np.uint8)
    scales = rng.integers(110, 140, (2, 3, 5), dtype=np.uint8)
    scales[0, 0, 0], scales[0, 0, 1], scales[1, 2, 4] = 0, 255, 127
    bias = rng.standard_normal((2, 3)).astype(np.float32)
    save_file(
        {"mlp.w_blocks": blocks, "mlp.w_scales": scales, "mlp.w_bias": bias},
        tmp_path / "model.safetensors",
    )
    ckpt = load_safetensors(tmp_path)
    assert set(ckpt) == {"mlp.w_blocks", "mlp.w_scales", "mlp.w_bias", "mlp.w"}
    got = ckpt["mlp.w"]
    assert got.shape == (2, 3, 5 * 32) and got.dtype == np.float32
    expected = mxfp4_reference(blocks, scales)
    np.testing.assert_array_equal(got, expected)  # NaN where the scale is 255
    assert np.isnan(got[0, 0, 32:64]).all()
    assert ckpt.info("mlp.w").dtype == "MXFP4"
    assert load_safetensors(tmp_path, dtype=np.float16)["mlp.w"].dtype == np.float16


def test_mxfp4_large_tensor_matches_reference(tmp_path, rng):
    blocks = rng.integers(0, 256, (4, 700, 16), dtype=np.uint8)  # several kernel chunks
    scales = rng.integers(100, 150, (4, 700), dtype=np.uint8)
    save_file({"e_blocks": blocks, "e_scales": scales}, tmp_path / "x.safetensors")
    np.testing.assert_array_equal(
        load_safetensors(tmp_path / "x.safetensors")["e"], mxfp4_reference(blocks, scales)
    )


def test_progress_bar(tmp_path, tensors, capsys):
    pytest.importorskip("tqdm", reason="tqdm not installed")
    save_file(tensors, tmp_path / "m.safetensors")
    ckpt = load_safetensors(tmp_path / "m.safetensors", progress=True)
    for name in ckpt:
        ckpt[name]
    assert "kvq load" in capsys.readouterr().err


# --- broken files --------------------------------------------------------------------------

F32_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"\x01\x02"), "truncated"),
        (lambda p: p.write_bytes((10_000).to_bytes(8, "little") + b"{}"), "runs past the end"),
        (lambda p: p.write_bytes((2**63).to_bytes(8, "little")), "runs past the end"),
        (lambda p: write_raw(p, "{not json"), "not valid JSON"),
        (lambda p: write_raw(p, [1, 2]), "JSON list, not an object"),
        (lambda p: write_raw(p, {"t": [1]}), "tensor 't': entry is a JSON list"),
        (
            lambda p: write_raw(p, {"t": {**F32_ENTRY, "dtype": "Q4"}}, bytes(8)),
            "unknown dtype 'Q4'",
        ),
        (lambda p: write_raw(p, {"t": {**F32_ENTRY, "shape": [3]}}, bytes(12)), "needs 12 bytes"),
        (lambda p: write_raw(p, {"t": {**F32_ENTRY, "shape": [-2]}}, bytes(8)), "non-negative"),
        (lambda p: write_raw(p, {"t": {**F32_ENTRY, "shape": "2"}}, bytes(8)), "shape must be"),
        (lambda p: write_raw(p, {"t": F32_ENTRY}, bytes(4)), "outside the 4 bytes of data"),
        (
            lambda p: write_raw(p, {"t": {**F32_ENTRY, "data_offsets": [8, 0]}}, bytes(8)),
            "data_offsets must be",
        ),
        (
            lambda p: write_raw(
                p, {"a": F32_ENTRY, "b": {**F32_ENTRY, "data_offsets": [4, 12]}}, bytes(12)
            ),
            "overlap",
        ),
        (lambda p: write_raw(p, {"__metadata__": {"a": 1}}), "__metadata__"),
    ],
)
def test_broken_files_raise_loader_error_naming_file(tmp_path, make, message):
    path = tmp_path / "broken.safetensors"
    make(path)
    with pytest.raises(LoaderError, match=r"broken\.safetensors") as raised:
        load_safetensors(path)
    assert message in str(raised.value)


def test_empty_file(tmp_path):
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(LoaderError, match="truncated"):
        load_safetensors(tmp_path / "e.safetensors")


def test_missing_paths(tmp_path):
    with pytest.raises(LoaderError, match="no such file"):
        load_safetensors(tmp_path / "nothing")
    with pytest.raises(LoaderError, match=r"no model\.safetensors\.index\.json"):
        load_safetensors(tmp_path)


def test_index_naming_missing_shard(tmp_path, rng):
    make_sharded(tmp_path, rng)
    os.remove(tmp_path / "model-00002-of-00003.safetensors")
    with pytest.raises(LoaderError, match=r"model-00002-of-00003\.safetensors"):
        load_safetensors(tmp_path)


def test_tensor_in_two_shards(tmp_path, rng):
    expected = make_sharded(tmp_path, rng, shards=2)
    second = {name: value for name, value in expected.items() if name.startswith("layer1.")}
    save_file(
        {**second, "layer0.w0": np.zeros(2, np.float32)},
        tmp_path / "model-00002-of-00002.safetensors",
    )
    with pytest.raises(LoaderError, match=r"'layer0.w0' is in two shards"):
        load_safetensors(tmp_path)


def test_index_tensor_not_in_its_shard(tmp_path, rng):
    make_sharded(tmp_path, rng, shards=2)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(LoaderError, match="'ghost' is not in its shard"):
        load_safetensors(tmp_path)


@pytest.mark.parametrize(
    "index", ["[]", "{}", '{"weight_map": [1]}', '{"weight_map": {"a": "../x.safetensors"}}']
)
def test_bad_index_files(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(LoaderError, match=r"model\.safetensors\.index\.json"):
        load_safetensors(tmp_path)


def test_mxfp4_pair_with_bad_shapes(tmp_path):
    save_file(
        {"w_blocks": np.zeros((3, 16), np.uint8), "w_scales": np.zeros((4,), np.uint8)},
        tmp_path / "m.safetensors",
    )
    with pytest.raises(LoaderError, match="MXFP4 pair 'w_blocks'"):
        load_safetensors(tmp_path / "m.safetensors")


def test_float8_is_refused_on_access_not_on_listing(tmp_path):
    write_tensors(tmp_path / "f8.safetensors", {"t": ("F8_E4M3", (4,), bytes(4))})
    ckpt = load_safetensors(tmp_path / "f8.safetensors")
    assert ckpt.info("t").dtype == "F8_E4M3"
    with pytest.raises(LoaderError, match="F8_E4M3"):
        ckpt["t"]


def test_loader_error_is_exported():
    assert kvq.errors.LoaderError is LoaderError
    assert issubclass(LoaderError, ValueError)


@pytest.mark.skipif(
    not os.environ.get("KVQ_GPT_OSS_20B"),
    reason="set KVQ_GPT_OSS_20B to a GPT-OSS-20B checkpoint directory to run",
)
def test_real_gpt_oss_20b_checkpoint():
    path = os.environ["KVQ_GPT_OSS_20B"]
    cfg = kvq.config.ModelConfig.from_pretrained(path)
    assert cfg == kvq.config.ModelConfig.gpt_oss_20b()
    ckpt = load_safetensors(path)
    k_proj = ckpt["model.layers.0.self_attn.k_proj.weight"]
    assert k_proj.shape == (cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size)
    assert k_proj.dtype == np.float32 and np.isfinite(k_proj).all()
    experts = ckpt.info("model.layers.0.mlp.experts.gate_up_proj")
    assert experts.dtype == "MXFP4" and experts.shape[0] == cfg.num_local_experts
    down = ckpt["model.layers.0.mlp.experts.down_proj"]
    assert down.shape[0] == 32 and np.isfinite(down).all()


def test_mxfp4_every_scale_and_byte_bit_exact(tmp_path):
    """All 256 scale codes x all 256 bytes: the exponent-folding fast path (scales 2..252)
    and the multiplying path agree with the NumPy reference bit for bit (NaN aside)."""
    blocks = np.tile(np.arange(256, dtype=np.uint8).reshape(16, 16), (256, 1, 1))
    scales = np.repeat(np.arange(256, dtype=np.uint8), 16).reshape(256, 16)
    save_file({"w_blocks": blocks, "w_scales": scales}, tmp_path / "m.safetensors")
    got = load_safetensors(tmp_path / "m.safetensors")["w"]
    expected = mxfp4_reference(blocks, scales)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])
