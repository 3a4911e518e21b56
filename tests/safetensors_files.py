"""Hand-made SafeTensors files for loader tests, including broken ones."""

import json
import struct
from pathlib import Path

import numpy as np


def write_raw(path: Path, header: dict | list | str, data: bytes = b"") -> Path:
    """Write ``header`` (JSON-encoded unless already a str) and ``data`` as a SafeTensors file."""
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def write_tensors(path: Path, tensors: dict[str, tuple[str, tuple, bytes]], metadata=None) -> Path:
    """tensors: name -> (safetensors dtype, shape, little-endian bytes), laid out in order."""
    header: dict = {}
    data = b""
    for name, (dtype, shape, payload) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [len(data), len(data) + len(payload)],
        }
        data += payload
    if metadata is not None:
        header["__metadata__"] = metadata
    return write_raw(path, header, data)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 values, by truncation."""
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    np.float32,
)


def mxfp4_reference(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Plain NumPy MXFP4 -> float32: blocks uint8 (..., G, 16), scales uint8 (..., G)."""
    low = FP4_VALUES[blocks & 0x0F]
    high = FP4_VALUES[blocks >> 4]
    values = np.stack([low, high], axis=-1).reshape(*blocks.shape[:-1], 32)
    with np.errstate(over="ignore", invalid="ignore"):
        factor = np.ldexp(np.float32(1.0), scales.astype(np.int32) - 127).astype(np.float32)
        factor = np.where(scales == 255, np.float32(np.nan), factor)
        scaled = values * factor[..., None]
    return scaled.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)
