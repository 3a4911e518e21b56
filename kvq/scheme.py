"""Scheme and QuantConfig: how keys and values are quantized, as plain dataclasses."""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from kvq._format import SUB_BITS, SUPER_GROUPS
from kvq._validate import check_int, check_scale_dtype

BITS = (2, 3, 4, 8)
#: Code widths a channel of a per-channel scheme can take (``Scheme.channel_bits``).
CHANNEL_BITS = (1, 2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class Scheme:
    """How one tensor is quantized.

    bits: 2, 3, 4 or 8 per code. group_size: consecutive elements along ``axis`` sharing a
    scale and min (the last group of a row is shorter when the axis length is not a multiple).
    axis: the grouping axis; for a (heads, tokens, head_dim) tensor -1 groups each token
    along head_dim (as MLX and llama.cpp do) and -2 groups each channel across tokens (KIVI's
    keys). scale_dtype: float32 or float16 for scales and mins. rotate: apply a randomized
    Hadamard rotation (chosen by ``seed``) along the last axis, which must be a power of two
    long. double_quant: quantize the group scales and mins again (6-bit codes under float16
    steps per SUPER_GROUPS groups, as llama.cpp's k-quants do). search: choose each group's
    range to minimise squared error instead of min/max (gives up the ``scale / 2`` bound on
    clipped values). seed: the rotation's seed (used only with ``rotate``).

    channel_bits: a code width per channel, for per-channel groups (``axis=-2``): an integer
    array (nested sequence) of widths in :data:`CHANNEL_BITS`, shaped like the trailing axes
    of a tensor's channels (``(num_kv_heads, head_dim)`` for a KV cache's keys). Each channel
    keeps its own scale and min per group, as with one width; only its codes' width differs.
    ``bits`` must then be the widest channel's width. Not with ``rotate`` (a rotation mixes
    channels). ``kvq.allocate_channel_bits`` chooses them from the queries' energy and the
    keys' ranges; ``kvq.hf.calibrate_channels`` does it for a model.

    Deprecated: an integer ``rotate`` (the seed); pass ``rotate=True, seed=N``.

    ``scheme.quantize(x)`` is ``kvq.quantize(x, scheme=scheme)`` (bound in kvq.tensor, so
    that this module needs nothing from it).
    """

    bits: int = 8
    group_size: int = 32
    axis: int = -1
    scale_dtype: str = "float32"
    rotate: bool = False
    double_quant: bool = False
    search: bool = False
    seed: int = 0
    channel_bits: tuple | None = None

    def __post_init__(self) -> None:
        bits = check_int("bits", self.bits, 1)
        table = _check_channel_bits(self.channel_bits)
        if table is None and bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        if table is not None and bits != int(table.max()):
            raise ValueError(
                f"bits must be the widest of channel_bits ({int(table.max())}), got {bits}"
            )
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "channel_bits", None if table is None else _nested(table))
        object.__setattr__(self, "group_size", check_int("group_size", self.group_size, 1))
        if isinstance(self.axis, bool | np.bool_):
            raise TypeError(f"axis must be an integer, got {self.axis!r}")
        try:
            object.__setattr__(self, "axis", operator.index(self.axis))
        except TypeError:
            raise TypeError(f"axis must be an integer, got {self.axis!r}") from None
        object.__setattr__(self, "scale_dtype", str(check_scale_dtype(self.scale_dtype)))
        object.__setattr__(self, "seed", check_int("seed", self.seed, 0))
        rotate = self.rotate
        if rotate is None:
            rotate = False
        elif not isinstance(rotate, bool | np.bool_):
            seed = check_int("rotate", rotate, 0)  # the old API: rotate=seed
            if self.seed not in (0, seed):
                raise ValueError(f"rotate={rotate!r} (a seed) conflicts with seed={self.seed}")
            warnings.warn(
                f"Scheme(rotate={seed}) is deprecated: pass rotate=True, seed={seed}",
                DeprecationWarning,
                stacklevel=3,
            )
            object.__setattr__(self, "seed", seed)
            rotate = True
        object.__setattr__(self, "rotate", bool(rotate))
        for name in ("double_quant", "search"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
            object.__setattr__(self, name, bool(getattr(self, name)))
        if table is not None and self.axis != -2:
            raise ValueError(
                f"channel_bits needs per-channel groups (axis=-2), got axis={self.axis}"
            )
        if table is not None and self.rotate:
            raise ValueError(
                "channel_bits cannot be used with rotate=True: a rotation mixes channels of "
                "different widths"
            )

    @property
    def channel_widths(self) -> np.ndarray | None:
        """``channel_bits`` as an int64 array (a copy), or None for one width."""
        return None if self.channel_bits is None else np.array(self.channel_bits, np.int64)

    @property
    def mean_bits(self) -> float:
        """Mean code width: ``bits``, or the mean of ``channel_bits``."""
        if self.channel_bits is None:
            return float(self.bits)
        return float(np.mean(self.channel_bits))

    @property
    def rotation_seed(self) -> int | None:
        """The rotation's seed, or None when the scheme does not rotate."""
        return self.seed if self.rotate else None

    @property
    def max_code(self) -> int:
        """Largest code: 2**bits - 1."""
        return (1 << self.bits) - 1

    @property
    def levels(self) -> int:
        """Deprecated alias of :attr:`max_code`."""
        warnings.warn(
            "Scheme.levels is deprecated: use Scheme.max_code", DeprecationWarning, stacklevel=2
        )
        return self.max_code

    @property
    def nominal_bits_per_element(self) -> float:
        """Stored bits per element for whole groups (a shorter last group costs a bit more)."""
        if self.double_quant:
            params = 2 * SUB_BITS + 2 * 16 / SUPER_GROUPS
        else:
            params = 2 * 8 * np.dtype(self.scale_dtype).itemsize
        return self.mean_bits + params / self.group_size

    def describe(self) -> str:
        """Short label: 'int4 g32 axis-2 dq search rot0' (rot and the seed when rotated;
        'int2-6:4.12' for channel_bits: the widths' range and mean)."""
        width = f"int{self.bits}"
        if self.channel_bits is not None:
            widths = self.channel_widths
            width = f"int{widths.min()}-{widths.max()}:{widths.mean():.2f}"
        parts = [width, f"g{self.group_size}", f"axis{self.axis}"]
        parts.append("dq" if self.double_quant else self.scale_dtype.replace("float", "f"))
        if self.search:
            parts.append("search")
        if self.rotate:
            parts.append(f"rot{self.seed}")
        return " ".join(parts)


def _check_channel_bits(table) -> np.ndarray | None:
    """``channel_bits`` as an int64 array (None stays None); ValueError or TypeError naming
    the first bad width."""
    if table is None:
        return None
    array = np.asarray(table)
    if array.ndim == 0 or array.size == 0:
        raise ValueError(f"channel_bits must be a non-empty array, got shape {array.shape}")
    if array.dtype == object or array.dtype.kind not in "iu":
        raise TypeError(f"channel_bits must hold integers, got {array.dtype} values")
    bad = ~np.isin(array, CHANNEL_BITS)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"channel_bits{list(where)} is {int(array[where])}; widths must be one of "
            f"{CHANNEL_BITS}"
        )
    return array.astype(np.int64)


def _nested(array: np.ndarray) -> tuple:
    """A nested tuple of ints (hashable, JSON-able) of an int array."""
    if array.ndim == 1:
        return tuple(int(x) for x in array)
    return tuple(_nested(row) for row in array)


def _q8_keys(rotate: bool = True) -> Scheme:
    return Scheme(8, 32, axis=-2, rotate=rotate, double_quant=True, search=True)


def _q8_values(rotate: bool = True) -> Scheme:
    return Scheme(8, 64, axis=-1, rotate=rotate, double_quant=True, search=True)


# QuantConfig's default: the first token exact (issue 15: on SmolLM2 it is an attention sink
# whose keys and values dwarf the rest); the presets pay for it with values in groups of 64.
SINK_TOKENS = 1


@dataclass(frozen=True)
class QuantConfig:
    """Schemes for keys and values, plus how many recent tokens stay in float32 (``residual``)
    and how many first tokens are kept exactly (``sink_tokens``).

    ``sink_tokens=S`` keeps a float32 copy of positions 0 .. S-1 (attention-sink tokens,
    whose keys and values dwarf the rest in decoder models): attention and ``keys()`` /
    ``values()`` read the copy, and the chunk that quantizes them sees the first later token
    of its chunk in their place, so their range does not widen its groups. The copy counts
    in ``nbytes`` and ``bits_per_element`` (one token of SmolLM2's 3 KV heads of 64 adds
    0.008 bits per element to a 4K-token cache). The default is 1; the peers' layouts
    (:meth:`kivi`, :meth:`mlx`, :meth:`original`) use 0, as those engines do.

    ``QuantConfig()`` is :meth:`q8`, the best 8-bit scheme measured (size, quality and speed);
    ``config=None`` means this default everywhere kvq takes a config. Presets: :meth:`q8`,
    :meth:`q4`, :meth:`q3`, :meth:`q2`, :meth:`kivi`, :meth:`mlx`, and :meth:`original` (the
    original design's scheme); their docstrings give the nominal bits per element (averaged
    over K and V, whole groups, no residual, no sink tokens) and the measured ones.

    ``pre_rope=True`` stores keys before RoPE: the cache un-rotates each appended key by
    RoPE's angles at its position and attention turns the decoded keys back (keys are still
    appended and read back as the model made them, RoPE applied). A channel's range then no
    longer spins with position, so per-channel groups fit it far better (SmolLM2, 1K
    tokens: q4 mean KLD 0.022 -> 0.015, q3 0.10 -> 0.063). The cache needs the model's
    frequencies (``KVCache(..., rope=kvq.Rope(...))``; ``KVQCache`` and ``ModelKVCache``
    find them), and the key scheme must not rotate. The presets take ``pre_rope=True``.

    Deprecated: ``rotate`` (a seed for both schemes); set ``rotate`` on each :class:`Scheme`.
    It raises when a scheme already rotates with another seed.
    """

    k: Scheme = field(default_factory=_q8_keys)
    v: Scheme = field(default_factory=_q8_values)
    residual: int = 0
    rotate: int | None = None
    sink_tokens: int = SINK_TOKENS
    pre_rope: bool = False

    def __post_init__(self) -> None:
        for name in ("k", "v"):
            if not isinstance(getattr(self, name), Scheme):
                raise TypeError(f"{name} must be a kvq.Scheme, got {getattr(self, name)!r}")
        object.__setattr__(self, "residual", check_int("residual", self.residual, 0))
        object.__setattr__(self, "sink_tokens", check_int("sink_tokens", self.sink_tokens, 0))
        if not isinstance(self.pre_rope, bool | np.bool_):
            raise TypeError(f"pre_rope must be a bool, got {self.pre_rope!r}")
        object.__setattr__(self, "pre_rope", bool(self.pre_rope))
        if self.pre_rope and self.k.channel_bits is not None:
            raise ValueError(
                "pre_rope=True turns keys by RoPE's channel pairs, which channel_bits reorders "
                "(widest first): use one or the other"
            )
        if self.pre_rope and (self.k.rotate or self.rotate is not None):
            raise ValueError(
                "pre_rope=True keeps keys before RoPE, which the kernel turns back per "
                "position; a Hadamard rotation of the keys would have to be undone per token "
                "first: use a key scheme with rotate=False"
            )
        if self.rotate is not None:
            seed = check_int("rotate", self.rotate, 0)
            for name in ("k", "v"):
                scheme = getattr(self, name)
                if scheme.rotate and scheme.seed != seed:
                    raise ValueError(
                        f"rotate={seed} conflicts with {name}'s own rotation (seed "
                        f"{scheme.seed}); set the rotation on each Scheme instead"
                    )
            warnings.warn(
                "QuantConfig(rotate=...) is deprecated: set rotate=True, seed=N on each Scheme",
                DeprecationWarning,
                stacklevel=3,
            )
            object.__setattr__(self, "rotate", seed)
            object.__setattr__(self, "k", replace(self.k, rotate=True, seed=seed))
            object.__setattr__(self, "v", replace(self.v, rotate=True, seed=seed))

    @property
    def nominal_bits_per_element(self) -> float:
        """Average of K's and V's nominal bits per element (whole groups, no residual, no
        sink tokens: those depend on the length; a cache's ``bits_per_element`` counts them)."""
        return (self.k.nominal_bits_per_element + self.v.nominal_bits_per_element) / 2

    @property
    def bits_per_element(self) -> float:
        """Deprecated alias of :attr:`nominal_bits_per_element`."""
        warnings.warn(
            "QuantConfig.bits_per_element is deprecated: use nominal_bits_per_element (a "
            "config's promise; caches and tensors report the measured bits_per_element)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.nominal_bits_per_element

    @classmethod
    def q8(cls, rotate: bool = True, pre_rope: bool = False) -> QuantConfig:
        """8-bit, the layout of :meth:`q4`: keys per channel in groups of 32 tokens after a
        Hadamard rotation, values per token in groups of 64, also rotated, both
        range-searched, second-level scales, the first token exact: 8.375 bits per element
        nominal, 8.383 measured over a 4K-token cache of SmolLM2's shape with the sink token
        (at most llama.cpp q8_0's 8.5). The default, ``QuantConfig()``. On SmolLM2-135M over
        real text (``kvq eval``; mean KLD against the float32 cache, through KVQCache in
        chunks of 64): 7.9e-5 at 1K tokens and 6.9e-5 at 4K (unrotated values without the
        search: 9.4e-5 and 7.7e-5); GGML q8_0 7.0e-4 and 5.6e-4. ``rotate=False`` rotates
        neither (a rotation needs a power-of-two head_dim); ``pre_rope=True`` keeps keys
        before RoPE, unrotated (see the class)."""
        return cls._searched(8, rotate, pre_rope)

    @classmethod
    def original(cls) -> QuantConfig:
        """The original design's scheme: 8-bit codes in groups of 32 along head_dim (per
        token), float32 scale and min: 10 bits per element."""
        return cls(k=Scheme(8, 32, axis=-1), v=Scheme(8, 32, axis=-1), sink_tokens=0)

    @classmethod
    def q4(cls, rotate: bool = True, pre_rope: bool = False) -> QuantConfig:
        """4-bit, as :meth:`q8`: 4.375 bits per element nominal, 4.383 over a 4K-token SmolLM2
        cache with the sink token (at most q4_0's 4.5). On SmolLM2-135M (as :meth:`q8`): mean KLD
        0.021 at 1K tokens and 0.0177 (+1.3% perplexity) at 4K; before the sink token (unrotated
        values in groups of 32) 0.025 and 0.022; llama.cpp's Hadamard-rotated q4_0 0.073 and 0.064.
        About 0.65x q4_0's attention error in bench/quality.py. Calibrated for a model, per-channel
        key widths at the same budget halve the divergence (``kvq.hf.calibrate_channels(model,
        tokenizer, 4.5)``; SmolLM2: 0.0097 and 0.0078)."""
        return cls._searched(4, rotate, pre_rope)

    @classmethod
    def q3(cls, rotate: bool = True, pre_rope: bool = False) -> QuantConfig:
        """3-bit, as :meth:`q4`: 3.375 bits per element nominal, 3.383 over a 4K-token
        SmolLM2 cache with the sink token. On SmolLM2-135M: mean KLD 0.086 (+4.9% perplexity)
        at 1K tokens and 0.075 (+6.2%) at 4K; before the sink token (values in groups of 32)
        0.113 (+11.6%) and 0.087 (+8.7%). ``rotate=False`` rotates neither. With per-channel
        key widths at the same budget (``kvq.hf.calibrate_channels(model, tokenizer, 3.5)``):
        0.048 (+2.3%) and 0.038 (+2.4%)."""
        return cls._searched(3, rotate, pre_rope)

    @classmethod
    def q2(cls, rotate: bool = True, pre_rope: bool = False) -> QuantConfig:
        """2-bit, as :meth:`q3`: 2.375 bits per element nominal, 2.383 over a 4K-token
        SmolLM2 cache with the sink token. On SmolLM2-135M: mean KLD 0.40 (+38% perplexity)
        at 1K tokens and 0.39 (+45%) at 4K; before the sink token 0.43 and 0.47 (+52%).
        ``rotate=False`` rotates neither. With per-channel key widths at the same budget
        (``kvq.hf.calibrate_channels(model, tokenizer, 2.5)``): 0.21 (+13.5%) and 0.19
        (+17.6%)."""
        return cls._searched(2, rotate, pre_rope)

    @classmethod
    def _searched(cls, bits: int, rotate: bool, pre_rope: bool = False) -> QuantConfig:
        """Keys per channel in groups of 32 tokens (rotated unless ``pre_rope``), values per
        token in groups of 64, both range-searched with second-level scales."""
        return cls(
            k=Scheme(
                bits, 32, axis=-2, rotate=rotate and not pre_rope, double_quant=True, search=True
            ),
            v=Scheme(bits, 64, axis=-1, rotate=rotate, double_quant=True, search=True),
            pre_rope=pre_rope,
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
            sink_tokens=0,
        )

    @classmethod
    def mlx(cls, bits: int = 4, group_size: int = 64) -> QuantConfig:
        """mlx-lm's quantized cache layout: per token, float16 scale and min: bits + 0.5
        bits per element at groups of 64."""
        scheme = Scheme(bits, group_size, axis=-1, scale_dtype="float16")
        return cls(k=scheme, v=scheme, sink_tokens=0)
