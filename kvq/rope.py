"""Rotary position embedding (RoPE) as kvq applies it to keys kept before RoPE.

A config with ``pre_rope=True`` stores each key at position p un-rotated by RoPE's angles at
p (``R(-p) k``), where per-channel groups across tokens fit it far better (a channel's
offset no longer spins with position), and attention turns the decoded keys back
(``R(p)``). The layout is transformers' and GPT-OSS's "rotate half": channel j pairs with
j + head_dim / 2 and turns by ``position * inverse_frequencies[j]``.

Any fixed set of angles gives the same attention, quantization aside (the inverse and the
rotation cancel); the model's own frequencies make the stored keys smooth across tokens.
"""

from __future__ import annotations

import threading

import numpy as np

from kvq._validate import check_int


class Rope:
    """RoPE's inverse frequencies (head_dim / 2 of them, radians per position) and the
    float32 cos/sin tables (head_dim / 2, positions) the attention kernel reads, grown on
    demand and shared by every cache that holds this object."""

    def __init__(self, inverse_frequencies) -> None:
        freqs = np.asarray(inverse_frequencies, dtype=np.float64)
        if freqs.ndim != 1 or freqs.size < 1:
            raise ValueError(
                f"inverse_frequencies must be a 1-D array of head_dim / 2 values, got shape "
                f"{freqs.shape}"
            )
        if not np.isfinite(freqs).all():
            raise ValueError("inverse_frequencies must be finite")
        self.inverse_frequencies = freqs.copy()
        self.inverse_frequencies.flags.writeable = False
        self._tables = _EMPTY
        self._lock = threading.Lock()

    @classmethod
    def from_theta(cls, theta: float, head_dim: int) -> Rope:
        """Plain RoPE: ``theta ** (-2j / head_dim)`` for j < head_dim / 2 (Llama, Qwen,
        SmolLM2; no scaling)."""
        head_dim = check_int("head_dim", head_dim)
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        if not (isinstance(theta, int | float) and not isinstance(theta, bool) and theta > 0):
            raise ValueError(f"theta must be a positive number, got {theta!r}")
        return cls(float(theta) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))

    @property
    def head_dim(self) -> int:
        return 2 * self.inverse_frequencies.size

    def tables(self, positions: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 (cos, sin), each (head_dim / 2, P) with P >= ``positions``: column p holds
        the angles of position p (computed in float64). Shared: do not write to them (they
        stay writable so that the kernel sees one array type for every stream)."""
        tables = self._tables
        if tables[0].shape[0] and tables[0].shape[1] >= positions:
            return tables
        with self._lock:
            tables = self._tables
            if not (tables[0].shape[0] and tables[0].shape[1] >= positions):
                size = max(1024, 1 << (max(positions, 1) - 1).bit_length())
                angles = self.inverse_frequencies[:, None] * np.arange(size, dtype=np.float64)
                cos = np.cos(angles).astype(np.float32)
                sin = np.sin(angles).astype(np.float32)
                tables = self._tables = (cos, sin)
        return tables

    def rotate(self, x: np.ndarray, first: int, inverse: bool = False) -> np.ndarray:
        """float32 (heads, t, head_dim) ``x`` turned by the angles of positions first ..
        first + t - 1 (backwards with ``inverse``), with the kernel's float32 tables."""
        heads, t, dim = x.shape
        if dim != self.head_dim:
            raise ValueError(f"x has head_dim {dim}, this Rope {self.head_dim}")
        cos, sin = self.tables(first + t)
        c = cos[:, first : first + t].T  # (t, half)
        s = sin[:, first : first + t].T
        if inverse:
            s = -s
        half = dim // 2
        a, b = x[..., :half], x[..., half:]
        out = np.empty((heads, t, dim), np.float32)
        out[..., :half] = a * c - b * s
        out[..., half:] = b * c + a * s
        return out

    def __eq__(self, other) -> bool:
        return isinstance(other, Rope) and np.array_equal(
            self.inverse_frequencies, other.inverse_frequencies
        )

    def __hash__(self) -> int:
        return hash(self.inverse_frequencies.tobytes())

    def __getstate__(self) -> dict:
        return {"inverse_frequencies": self.inverse_frequencies}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["inverse_frequencies"])

    def __repr__(self) -> str:
        return f"Rope(head_dim={self.head_dim})"


_EMPTY = (np.empty((0, 0), np.float32), np.empty((0, 0), np.float32))
