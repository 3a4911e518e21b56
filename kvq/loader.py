"""load_safetensors: a lazy, read-only mapping over a SafeTensors file or checkpoint directory."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from kvq import kernels
from kvq._bytes import in_unit
from kvq._safetensors import MAX_HEADER_BYTES, SafeTensorsFile, TensorInfo, parse_json, show
from kvq.errors import LoaderError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MXFP4_BLOCK_BYTES = 16
_FLOAT_KINDS = ("F16", "BF16", "F32", "F64")


class Checkpoint(Mapping):
    """Tensors by name, read on access from memory-mapped files; opening reads headers only.

    Values are NumPy arrays: F32, F16, F64 and integer tensors as read-only views of the file
    (no copy); BF16 converted to float32; GPT-OSS MXFP4 pairs ``NAME_blocks`` /
    ``NAME_scales`` also appear dequantized as float32 under ``NAME``. With ``dtype`` set,
    floating tensors are converted to it. ``info(name)`` describes a tensor without reading it.
    """

    def __init__(self, files: list[SafeTensorsFile], dtype=None, progress: bool = False):
        self._files = files
        self._dtype = None if dtype is None else np.dtype(dtype)
        if self._dtype is not None and self._dtype.kind != "f":
            raise TypeError(f"dtype must be a floating dtype or None, got {self._dtype}")
        self._where: dict[str, SafeTensorsFile] = {}
        for file in files:
            for name in file.tensors:
                if name in self._where:
                    raise LoaderError(
                        f"tensor {show(name)} is in two shards: {self._where[name].path} "
                        f"and {file.path}"
                    )
                self._where[name] = file
        self._mxfp4 = _mxfp4_pairs(self._where)
        self._progress = _progress_bar(self.nbytes) if progress else None

    # --- Mapping -----------------------------------------------------------------------------

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._mxfp4:
            array = self._dequantize_mxfp4(name)
        elif name in self._where:
            array = self._read(name)
        else:
            raise KeyError(name)
        if self._progress is not None:
            self._progress.update(self.info(name).nbytes)
        return array

    def __iter__(self) -> Iterator[str]:
        yield from self._where
        yield from self._mxfp4

    def __len__(self) -> int:
        return len(self._where) + len(self._mxfp4)

    def __contains__(self, name: object) -> bool:
        return name in self._where or name in self._mxfp4

    # --- description -------------------------------------------------------------------------

    def info(self, name: str) -> TensorInfo:
        """File, stored dtype ('MXFP4' for a dequantized pair), shape and bytes, unread."""
        if name in self._mxfp4:
            blocks = self._where[name + "_blocks"].tensors[name + "_blocks"]
            scales = self._where[name + "_scales"].tensors[name + "_scales"]
            shape = (*blocks.shape[:-2], blocks.shape[-2] * 32)
            return TensorInfo(blocks.file, "MXFP4", shape, 0, blocks.nbytes + scales.nbytes)
        if name not in self._where:
            raise KeyError(name)
        return self._where[name].tensors[name]

    @property
    def files(self) -> list[Path]:
        return [file.path for file in self._files]

    @property
    def metadata(self) -> dict[str, str]:
        """``__metadata__`` of the files, merged."""
        merged: dict[str, str] = {}
        for file in self._files:
            merged.update(file.metadata)
        return merged

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data stored in the files."""
        return sum(t.nbytes for file in self._files for t in file.tensors.values())

    def __repr__(self) -> str:
        return (
            f"Checkpoint({len(self)} tensors in {len(self._files)} file(s), "
            f"{in_unit(self.nbytes, 'GiB')}, {len(self._mxfp4)} MXFP4)"
        )

    # --- reading -----------------------------------------------------------------------------

    def _read(self, name: str) -> np.ndarray:
        file = self._where[name]
        info = file.tensors[name]
        raw = file.array(name)
        if info.dtype == "BF16":
            array = np.empty(info.shape, np.float32)
            if raw.size:
                bits = np.require(raw, requirements="CA").reshape(-1)
                bits.flags.writeable = False  # copy or map: one kernel type, one compile
                kernels.bf16_to_f32(bits, array.reshape(-1).view(np.uint32))
        elif info.dtype.startswith("F8_"):
            raise LoaderError(
                f"{file.path}: tensor {show(name)} has dtype {info.dtype}, which kvq does not "
                "convert; read the raw bytes with the safetensors package"
            )
        elif info.dtype == "BOOL" and raw.size and raw.view(np.uint8).max() > 1:
            # NumPy bools are bytes 0 and 1; other bytes make ~x, x ^ y, ... disagree
            bad = int(np.flatnonzero(raw.view(np.uint8).reshape(-1) > 1)[0])
            raise LoaderError(
                f"{file.path}: tensor {show(name)} is BOOL but holds byte "
                f"{int(raw.view(np.uint8).reshape(-1)[bad])} at flat index {bad}; only 0 and 1 "
                "are booleans"
            )
        else:
            array = raw
        if self._dtype is not None and info.dtype in _FLOAT_KINDS:
            array = array.astype(self._dtype, copy=False)
        return array

    def _dequantize_mxfp4(self, name: str) -> np.ndarray:
        blocks = self._read(name + "_blocks")
        scales = self._read(name + "_scales")
        out = np.empty(self.info(name).shape, np.float32)
        if out.size:
            kernels.mxfp4_to_f32(
                np.require(blocks, requirements="CA").reshape(-1),
                np.require(scales, requirements="CA").reshape(-1),
                out.reshape(-1),
            )
        if self._dtype is not None:
            out = out.astype(self._dtype, copy=False)
        return out


def load_safetensors(path: str | Path, dtype=None, progress: bool = False) -> Checkpoint:
    """Open a ``.safetensors`` file, or a directory holding ``model.safetensors`` or a shard
    index (``model.safetensors.index.json``) with its shards; returns a lazy :class:`Checkpoint`.

    Only headers are read here. ``dtype`` converts floating tensors on access (e.g.
    ``np.float32``). ``progress=True`` shows a tqdm bar of bytes read. Bad files raise
    :class:`kvq.LoaderError` naming the file and tensor.
    """
    path = Path(path)
    if path.is_dir():
        if (path / INDEX_FILE).is_file():
            files = _open_index(path / INDEX_FILE)
        elif (path / SINGLE_FILE).is_file():
            files = [SafeTensorsFile(path / SINGLE_FILE)]
        else:
            found = sorted(path.glob("*.safetensors"))
            if not found:
                raise LoaderError(f"{path}: no {INDEX_FILE}, {SINGLE_FILE} or *.safetensors")
            files = [SafeTensorsFile(file) for file in found]
    elif path.is_file():
        files = [SafeTensorsFile(path)]
    else:
        raise LoaderError(f"{path}: no such file or directory")
    return Checkpoint(files, dtype=dtype, progress=progress)


def _open_index(index: Path) -> list[SafeTensorsFile]:
    """Open the shards an index names, checking that each tensor is where the index says."""
    try:
        with open(index, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_HEADER_BYTES:
                raise LoaderError(
                    f"{index}: {size} bytes, over the {MAX_HEADER_BYTES} byte limit for an index"
                )
            raw = handle.read(size)
    except OSError as error:
        raise LoaderError(f"{index}: cannot read ({error.strerror or error})") from None
    content = parse_json(raw, str(index))
    if not isinstance(content, dict) or "weight_map" not in content:
        raise LoaderError(f"{index}: not a shard index: no 'weight_map' object")
    weight_map = content["weight_map"]
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise LoaderError(f"{index}: 'weight_map' must map tensor names to file names")
    shards: dict[str, SafeTensorsFile] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / shard
        if Path(shard).name != shard or not shard_path.is_file():
            raise LoaderError(f"{index}: names shard {show(shard)}, which is not a file beside it")
        shards[shard] = SafeTensorsFile(shard_path)
    for name, shard in weight_map.items():
        if name not in shards[shard].tensors:
            raise LoaderError(f"{index}: tensor {show(name)} is not in its shard {show(shard)}")
    return list(shards.values())


def _mxfp4_pairs(where: dict[str, SafeTensorsFile]) -> dict[str, None]:
    """Names ``NAME`` for which ``NAME_blocks`` (U8 [..., G, 16]) and ``NAME_scales``
    (U8 [..., G]) both exist; checks their shapes agree."""
    pairs: dict[str, None] = {}
    for blocks_name, file in where.items():
        if not blocks_name.endswith("_blocks"):
            continue
        name = blocks_name[: -len("_blocks")]
        scales_name = name + "_scales"
        if scales_name not in where:
            continue
        blocks = file.tensors[blocks_name]
        scales = where[scales_name].tensors[scales_name]
        if name in where:
            raise LoaderError(f"{file.path}: {show(name)} is both a tensor and an MXFP4 pair")
        if (
            blocks.dtype != "U8"
            or scales.dtype != "U8"
            or len(blocks.shape) < 2
            or blocks.shape[-1] != MXFP4_BLOCK_BYTES
            or blocks.shape[:-1] != scales.shape
        ):
            raise LoaderError(
                f"{file.path}: MXFP4 pair {show(blocks_name)} {blocks.dtype}{list(blocks.shape)}"
                f" / {show(scales_name)} {scales.dtype}{list(scales.shape)} must be "
                "U8 [..., G, 16] and U8 [..., G]"
            )
        pairs[name] = None
    return pairs


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError("progress=True needs tqdm: pip install tqdm") from None
    return tqdm(total=total, unit="B", unit_scale=True, desc="kvq load")
