"""Codes of mixed widths: each row of a grid (a channel of a per-channel scheme) has its own
code width (``Scheme.channel_bits``), and its codes start on a byte of their own.

Row ``r`` of ``length`` codes, ``w`` bits each, occupies ``ceil(length * w / 8)`` bytes from
byte ``offsets[r]`` (the sum of the earlier rows' bytes), as a little-endian bit stream
(``kernels.pack_codes``'s format); the last byte's high bits are zero when ``length * w`` is
not a multiple of 8. A KV cache's key chunks of 32 tokens need no padding (32 codes of any
width are ``4 * w`` bytes).
"""

from __future__ import annotations

import numpy as np

from kvq import kernels


def row_widths(channel_bits: tuple, rows_shape: tuple[int, ...]) -> np.ndarray:
    """int64 (rows,): the width of each grid row, ``channel_bits`` broadcast over the leading
    axes of ``rows_shape`` (the tensor's shape without its grouping axis). ValueError unless
    ``channel_bits``'s shape is the trailing part of ``rows_shape``."""
    table = np.array(channel_bits, np.int64)
    trailing = tuple(rows_shape[len(rows_shape) - table.ndim :]) if table.ndim else ()
    if table.ndim > len(rows_shape) or trailing != table.shape:
        raise ValueError(
            f"channel_bits has shape {table.shape}, which must be the trailing axes of the "
            f"tensor's channels {tuple(rows_shape)} (its shape without the grouping axis -2)"
        )
    return np.ascontiguousarray(np.broadcast_to(table, tuple(rows_shape))).reshape(-1)


def row_bytes(widths: np.ndarray, length: int) -> np.ndarray:
    """int64 (rows,): bytes each row of ``length`` codes takes."""
    return (widths * length + 7) // 8


def row_offsets(widths: np.ndarray, length: int) -> np.ndarray:
    """int64 (rows + 1,): the byte where each row starts, then the total."""
    offsets = np.zeros(widths.size + 1, np.int64)
    np.cumsum(row_bytes(widths, length), out=offsets[1:])
    return offsets


def classes(widths: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """[(width, the rows of that width)] in increasing width."""
    return [(int(w), np.flatnonzero(widths == w)) for w in np.unique(widths)]


def _byte_index(offsets: np.ndarray, rows: np.ndarray, count: int) -> np.ndarray:
    """int64 (len(rows), count): the bytes of ``rows``, each ``count`` long."""
    return offsets[rows][:, None] + np.arange(count, dtype=np.int64)[None, :]


def pack_rows(codes: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """uint8 stream of ``codes`` (uint8 (rows, length), each < 2**width of its row)."""
    length = codes.shape[1]
    offsets = row_offsets(widths, length)
    packed = np.zeros(int(offsets[-1]), np.uint8)
    for width, members in classes(widths):
        count = (width * length + 7) // 8
        block = np.ascontiguousarray(codes[members]).reshape(-1)
        if width * length % 8 == 0:  # whole bytes a row: one packed stream of the class
            stream = np.empty(block.size * width // 8, np.uint8)
            if block.size:
                kernels.pack_codes(block, width, stream)
            packed[_byte_index(offsets, members, count)] = stream.reshape(members.size, count)
            continue
        bits = (block[:, None] >> np.arange(width, dtype=np.uint8)) & 1  # low bits first
        bits = bits.reshape(members.size, length * width)
        bits = np.pad(bits, ((0, 0), (0, 8 * count - length * width)))
        stream = np.packbits(bits.astype(np.uint8), axis=1, bitorder="little")
        packed[_byte_index(offsets, members, count)] = stream
    return packed


def unpack_rows(packed: np.ndarray, widths: np.ndarray, length: int) -> np.ndarray:
    """uint8 (rows, length): the codes :func:`pack_rows` packed."""
    offsets = row_offsets(widths, length)
    codes = np.empty((widths.size, length), np.uint8)
    for width, members in classes(widths):
        count = (width * length + 7) // 8
        stream = packed[_byte_index(offsets, members, count)]
        if width * length % 8 == 0:
            block = np.empty(members.size * length, np.uint8)
            if block.size:
                kernels.unpack_codes(np.ascontiguousarray(stream).reshape(-1), width, block)
            codes[members] = block.reshape(members.size, length)
            continue
        bits = np.unpackbits(stream, axis=1, bitorder="little")[:, : length * width]
        bits = bits.reshape(members.size, length, width)
        weights = (1 << np.arange(width, dtype=np.int64))[None, None, :]
        codes[members] = (bits * weights).sum(axis=2).astype(np.uint8)
    return codes
