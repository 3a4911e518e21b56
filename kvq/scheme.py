"""Scheme and QuantConfig: how keys and values are quantized, as plain dataclasses."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace

import numpy as np

from kvq._format import SUB_BITS, SUPER_GROUPS
from kvq._validate import check_int, check_scale_dtype

BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class Scheme:
    """How one tensor is quantized.

    bits: 2, 3, 4 or 8 per code. group_size: consecutive elements along ``axis`` sharing a
    scale and min (the last group of a row is shorter when the axis length is not a multiple).
    axis: -1 groups along the last axis (per token along head_dim for a (heads, tokens,
    head_dim) tensor, as MLX and llama.cpp do); -2 groups across tokens per channel (KIVI's
    keys). scale_dtype: float32 or float16 for scales and mins. rotate: None, or a seed for a
    randomized Hadamard rotation along the last axis (a power of two long). double_quant:
    quantize the group scales and mins again (6-bit codes under float16 scales per
    SUPER_GROUPS groups, as llama.cpp's k-quants do). search: choose each group's range to
    minimise squared error instead of min/max (gives up the ``scale / 2`` bound on clipped
    values). ``scheme.quantize(x)`` is ``kvq.quantize(x, scheme=scheme)`` (bound in kvq.tensor,
    so that this module needs nothing from it).
    """

    bits: int = 8
    group_size: int = 32
    axis: int = -1
    scale_dtype: str = "float32"
    rotate: int | None = None
    double_quant: bool = False
    search: bool = False

    def __post_init__(self) -> None:
        bits = check_int("bits", self.bits, 1)
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "group_size", check_int("group_size", self.group_size, 1))
        if isinstance(self.axis, bool | np.bool_):
            raise TypeError(f"axis must be an integer, got {self.axis!r}")
        try:
            object.__setattr__(self, "axis", operator.index(self.axis))
        except TypeError:
            raise TypeError(f"axis must be an integer, got {self.axis!r}") from None
        object.__setattr__(self, "scale_dtype", str(check_scale_dtype(self.scale_dtype)))
        if self.rotate is not None:
            object.__setattr__(self, "rotate", check_int("rotate", self.rotate, 0))
        for name in ("double_quant", "search"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
            object.__setattr__(self, name, bool(getattr(self, name)))

    @property
    def levels(self) -> int:
        """Largest code: 2**bits - 1."""
        return (1 << self.bits) - 1

    @property
    def nominal_bits_per_element(self) -> float:
        """Stored bits per element for whole groups (a shorter last group costs a bit more)."""
        if self.double_quant:
            params = 2 * SUB_BITS + 2 * 16 / SUPER_GROUPS
        else:
            params = 2 * 8 * np.dtype(self.scale_dtype).itemsize
        return self.bits + params / self.group_size

    def describe(self) -> str:
        """Short label: 'int4 g32 per-channel f16 dq rot0'."""
        parts = [f"int{self.bits}", f"g{self.group_size}"]
        parts.append({-1: "per-token", -2: "per-channel"}.get(self.axis, f"axis{self.axis}"))
        parts.append("dq" if self.double_quant else self.scale_dtype.replace("float", "f"))
        if self.search:
            parts.append("search")
        if self.rotate is not None:
            parts.append(f"rot{self.rotate}")
        return " ".join(parts)


@dataclass(frozen=True)
class QuantConfig:
    """Schemes for keys and values, plus how many recent tokens stay in float32 (``residual``).

    ``rotate`` (a seed) overrides both schemes' rotation when set. Presets: :meth:`q8`,
    :meth:`q4`, :meth:`q3`, :meth:`q2`, :meth:`kivi`, :meth:`mlx`; their docstrings give
    the bits per element (averaged over K and V, whole groups, no residual).
    """

    k: Scheme = field(default_factory=Scheme)
    v: Scheme = field(default_factory=Scheme)
    residual: int = 0
    rotate: int | None = None

    def __post_init__(self) -> None:
        for name in ("k", "v"):
            if not isinstance(getattr(self, name), Scheme):
                raise TypeError(f"{name} must be a kvq.Scheme, got {getattr(self, name)!r}")
        object.__setattr__(self, "residual", check_int("residual", self.residual, 0))
        if self.rotate is not None:
            seed = check_int("rotate", self.rotate, 0)
            object.__setattr__(self, "rotate", seed)
            object.__setattr__(self, "k", replace(self.k, rotate=seed))
            object.__setattr__(self, "v", replace(self.v, rotate=seed))

    @property
    def bits_per_element(self) -> float:
        """Average of K's and V's nominal bits per element."""
        return (self.k.nominal_bits_per_element + self.v.nominal_bits_per_element) / 2

    @classmethod
    def q8(cls) -> QuantConfig:
        """8-bit keys per channel after a Hadamard rotation, values per token, groups of 32,
        second-level scales: 8.5 bits per element (llama.cpp q8_0's size), about 0.65x
        q8_0's attention error in bench/quality.py."""
        return cls(
            k=Scheme(8, 32, axis=-2, rotate=0, double_quant=True),
            v=Scheme(8, 32, axis=-1, double_quant=True),
        )

    @classmethod
    def q4(cls) -> QuantConfig:
        """4-bit, as :meth:`q8` plus a per-group range search: 4.5 bits per element (q4_0's
        size), about 0.65x q4_0's attention error in bench/quality.py."""
        return cls._searched(4)

    @classmethod
    def q3(cls) -> QuantConfig:
        """3-bit, as :meth:`q4`: 3.5 bits per element."""
        return cls._searched(3)

    @classmethod
    def q2(cls) -> QuantConfig:
        """2-bit, as :meth:`q4`: 2.5 bits per element."""
        return cls._searched(2)

    @classmethod
    def _searched(cls, bits: int) -> QuantConfig:
        return cls(
            k=Scheme(bits, 32, axis=-2, rotate=0, double_quant=True, search=True),
            v=Scheme(bits, 32, axis=-1, double_quant=True, search=True),
        )

    @classmethod
    def kivi(cls, bits: int = 2, group_size: int = 32, residual: int = 128) -> QuantConfig:
        """KIVI: keys per channel, values per token, float16 scale and min, the last
        ``residual`` tokens in full precision: bits + 1 bits per element at groups of 32
        (3.0 for 2 bits), plus the residual."""
        return cls(
            k=Scheme(bits, group_size, axis=-2, scale_dtype="float16"),
            v=Scheme(bits, group_size, axis=-1, scale_dtype="float16"),
            residual=residual,
        )

    @classmethod
    def mlx(cls, bits: int = 4, group_size: int = 64) -> QuantConfig:
        """mlx-lm's quantized cache layout: per token, float16 scale and min: bits + 0.5
        bits per element at groups of 64."""
        scheme = Scheme(bits, group_size, axis=-1, scale_dtype="float16")
        return cls(k=scheme, v=scheme)
