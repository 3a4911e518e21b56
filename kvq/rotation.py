"""Randomized Hadamard rotations: orthogonal maps that spread outlier channels evenly.

``R = diag(signs) @ H / sqrt(d)`` with ``H`` the Sylvester Hadamard matrix of order ``d`` (a
power of two) and random signs from the seed. ``R`` is orthogonal, so ``(q R) . (k R) = q . k``
and attention computed on rotated queries and keys is unchanged in exact arithmetic.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=32)
def hadamard_rotation(d: int, seed: int) -> np.ndarray:
    """float32 (d, d) orthogonal matrix for rotating the last axis: ``x @ R``."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"rotate needs the last axis to be a power of two long, got {d}")
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    # random_raw is stable across NumPy versions, unlike Generator methods
    signs = np.where(np.random.PCG64(seed).random_raw(d) & 1, -1.0, 1.0)
    rotation = (signs[:, None] * h / np.sqrt(d)).astype(np.float32)
    rotation.flags.writeable = False
    return rotation


def rotate(x: np.ndarray, seed: int) -> np.ndarray:
    """float32 ``x @ R`` along the last axis, row by row (independent of the batch)."""
    return _apply(x, hadamard_rotation(x.shape[-1], seed))


def unrotate(x: np.ndarray, seed: int) -> np.ndarray:
    """float32 ``x @ R.T``, the inverse of :func:`rotate`."""
    return _apply(x, _transposed(x.shape[-1], seed))


@functools.lru_cache(maxsize=32)
def _transposed(d: int, seed: int) -> np.ndarray:
    """``hadamard_rotation(d, seed).T``, C-contiguous and read-only (one kernel type)."""
    matrix = np.ascontiguousarray(hadamard_rotation(d, seed).T)
    matrix.flags.writeable = False
    return matrix


def _apply(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """float32 ``x @ matrix`` row by row; ``matrix`` read-only (as hadamard_rotation's: one
    kernel type, one compile)."""
    from kvq import kernels

    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, matrix.shape[0])
    out = np.empty_like(rows)
    if rows.size:
        kernels.rotate_rows(rows, matrix, out)
    return out.reshape(np.shape(x))
