"""KVCache: a quantized key/value cache that grows by appends while decoding.

Each of K and V is a :class:`TensorStream`: recent tokens wait in a float32 *residual*; once
``residual + chunk`` tokens wait, the oldest ``chunk`` tokens are quantized together, exactly
once, into the next slot of a preallocated chunk store. ``chunk`` is the scheme's token
granularity: 1 token for per-token groups, ``group_size`` tokens for per-channel groups
(more when second-level scales or bit packing need whole super-groups or bytes). Chunks are
stacked so that any run of them is itself a :class:`QuantizedTensor`. With a ``window``, the
store is a ring and chunks that fall wholly out of the window are dropped.
"""

from __future__ import annotations

import copy
import operator
import threading
import warnings
import weakref
from dataclasses import dataclass, replace
from functools import partial
from typing import NamedTuple

import numpy as np

from kvq import kernels
from kvq._bytes import in_unit
from kvq._format import FLOAT16_MAX, FLOAT32_MAX, MIN_OFFSET, SUPER_GROUPS
from kvq._threads import on_calling_thread
from kvq._validate import check_finite, check_float_dtype, check_int
from kvq.errors import KvqError
from kvq.kernels.attention import StreamView
from kvq.pool import MemoryPool
from kvq.rope import Rope
from kvq.rotation import hadamard_rotation, rotate, unrotate
from kvq.scheme import QuantConfig, Scheme
from kvq.tensor import QuantizedTensor, quantize

FLOAT32_BYTES = 4
_FLOAT32 = np.dtype(np.float32)
_NO_ROTATION = np.zeros((0, 0), np.float32)  # a stream without rotation (read-only)
_NO_ROTATION.flags.writeable = False
_NO_ORDER = np.zeros(0, np.int64)  # a stream without per-channel widths
_NO_PARAMS = np.zeros((1, 1), np.uint8)  # p2/p3 of a StreamView without second-level scales
_NO_TABLES = (np.zeros((0, 0), np.float32),) * 2  # rope_cos/rope_sin of a stream without RoPE
# channel_bits, channel_at, channel_runs, channel_order of a stream of one width
_NO_CHANNELS = (
    np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.int64),
    np.zeros(0, np.int64),
)  # fmt: skip
#: Runs of equal width a head's channels can form (one per width of CHANNEL_BITS, and one spare).
CHANNEL_RUNS = 8
_INITIAL_CHUNKS = 16
# Appends of at most this many new values (K and V together) run their kernels on the calling
# thread: a parallel launch for a decode step's few hundred values costs more than it saves,
# and on a loaded machine it waits for every worker thread to be scheduled (milliseconds).
SERIAL_VALUES = 1 << 15


def value_limit(scheme: Scheme) -> tuple[float, str]:
    """(largest |value| a chunk of ``scheme`` is sure to quantize, what to do past it).

    A token may wait in the residual, or in an unfilled per-channel chunk, before it is
    quantized; checking this bound when it arrives means no later append can fail on it.
    Float16 scales and mins hold +-65504; double_quant's float16 min steps hold max|min| / 32;
    float32 groups need max - min <= 2**127.
    """
    if scheme.scale_dtype == "float16":
        return FLOAT16_MAX, "use scale_dtype='float32'"
    if scheme.double_quant:
        return FLOAT16_MAX * MIN_OFFSET, "turn double_quant off or rescale the values"
    return 2.0**126, "rescale the values"


class CapacityError(KvqError, ValueError):
    """An append would exceed a KVCache's fixed ``capacity``."""


def chunk_tokens(scheme: Scheme, num_kv_heads: int, head_dim: int) -> int:
    """Tokens quantized together for ``scheme``: the smallest multiple of its token group
    whose codes fill whole bytes and whose groups fill whole second-level super-groups.

    With double_quant, per-channel groups number num_kv_heads * head_dim per chunk whatever
    its length, so that product must be a multiple of 8 (ValueError otherwise).
    """
    base = scheme.group_size if scheme.axis in (-2, 1) else 1
    widths = (scheme.bits,) if scheme.channel_bits is None else set(scheme.channel_widths.flat)
    for multiple in range(1, 9):
        tokens = base * multiple
        values = num_kv_heads * tokens * head_dim
        if scheme.axis in (-2, 1):
            groups = num_kv_heads * head_dim
        else:
            groups = num_kv_heads * tokens * -(-head_dim // min(scheme.group_size, head_dim))
        if scheme.channel_bits is None:
            whole = values * scheme.bits % 8 == 0
        else:  # each channel's run of codes starts on a byte of its own
            whole = all(tokens * width % 8 == 0 for width in widths)
        if whole and (not scheme.double_quant or groups % SUPER_GROUPS == 0):
            return tokens
    raise ValueError(
        f"no chunk of whole bytes and super-groups for {scheme.describe()} with "
        f"{num_kv_heads} heads of {head_dim}"
    )


@dataclass(frozen=True)
class HeldLayout:
    """Which tokens a stream holds after ``appended`` tokens (shared by KVCache and plan)."""

    appended: int
    first_chunk: int  # index of the oldest chunk still held
    chunks: int  # chunks quantized so far (held or dropped)
    residual: int  # float32 tokens after the last chunk

    @property
    def held_chunks(self) -> int:
        return self.chunks - self.first_chunk


def held_layout(appended: int, chunk: int, residual: int, window: int | None) -> HeldLayout:
    """Chunks quantized once ``residual + chunk`` tokens wait; a window drops chunks whose
    tokens are all older than the last ``window`` tokens."""
    chunks = max(0, (appended - residual) // chunk)
    first = 0
    if window is not None:
        first = min(chunks, max(0, (appended - window) // chunk))
    return HeldLayout(appended, first, chunks, appended - chunks * chunk)


@dataclass
class _Staged:
    pending: np.ndarray
    sinks: np.ndarray  # the float32 copy of positions < sink_tokens, as it will be
    dropped: int  # chunks completed but out of the window before ever being read
    rows: dict[str, np.ndarray]  # per part, one row per kept chunk (chunks after the dropped)
    appended: int
    first_chunk: int
    store: tuple[dict[str, np.ndarray], int] | None


class TensorStream:
    """One of K or V: a chunk store (ring when windowed), a float32 residual, and a float32
    copy of the first ``sink_tokens`` positions (``sinks``, held while position 0 is)."""

    def __init__(
        self,
        name: str,
        scheme: Scheme,
        num_kv_heads: int,
        head_dim: int,
        residual: int,
        window: int | None,
        capacity: int | None,
        pool: MemoryPool | None,
        sink_tokens: int = 0,
        rope: Rope | None = None,
    ) -> None:
        self.name = name
        self.sink_tokens = sink_tokens
        self.rope = rope  # keys held before RoPE: un-rotated on append, turned back on read
        if scheme.axis >= 0:  # 1 and 2 of a (heads, tokens, head_dim) chunk; the stream
            scheme = replace(scheme, axis=scheme.axis - 3)  # also quantizes 4-D batches
        self.scheme = scheme
        self.heads = num_kv_heads
        self.head_dim = head_dim
        self.residual_target = residual
        self.window = window
        self.pool = pool
        self.chunk = chunk_tokens(scheme, num_kv_heads, head_dim)
        self.chunk_shape = (num_kv_heads, self.chunk, head_dim)
        # Residual tokens wait in the scheme's rotated basis (the kernels read them with
        # rotated queries); chunks are quantized from them with rotation already applied.
        self.rotation_seed = scheme.rotation_seed
        self.plain_scheme = replace(scheme, rotate=False)
        self.limit, self.limit_hint = value_limit(scheme)
        # per-channel widths: each head's channels are stored widest first (order[h, j] is
        # the channel held at j), so equal widths form a few runs the kernel reads as one
        self.order = self.inverse = None
        self.stored_scheme = scheme
        self.channel_tables = _NO_CHANNELS
        if scheme.channel_bits is not None:
            widths = scheme.channel_widths
            if widths.shape != (num_kv_heads, head_dim):
                raise ValueError(
                    f"config.{name}.channel_bits has shape {widths.shape}; a cache of "
                    f"{num_kv_heads} KV heads of {head_dim} needs ({num_kv_heads}, {head_dim})"
                )
            # flat (heads * head_dim) gathers: stored channel j of head h is the model's
            # order[h, j]; the model's channel c of head h is stored at inverse[h, c]
            heads = np.arange(num_kv_heads)[:, None] * head_dim
            self.order = np.argsort(-widths, axis=1, kind="stable") + heads
            self.inverse = np.argsort(self.order - heads, axis=1) + heads
            held = widths.reshape(-1)[self.order]
            self.plain_scheme = self.stored_scheme = replace(scheme, channel_bits=held)
            order = np.ascontiguousarray(self.order - heads, np.int64).reshape(-1)
            self.channel_tables = (*channel_tables(held, self.chunk), order)
        template = quantize(np.zeros(self.chunk_shape, np.float32), scheme=scheme).parts()
        self.part_layout = {key: (part.dtype, part.size) for key, part in template.items()}
        # Several chunks quantize as one tensor (one kernel launch for a whole prefill) when
        # each chunk's codes, groups and second-level super-blocks start on their own byte:
        # then the batch's parts are the chunks' parts end to end (chunk_tokens sees to it;
        # checked once here).
        pair = quantize(np.zeros((2, *self.chunk_shape), np.float32), scheme=scheme).parts()
        self.batchable = all(
            pair[key].size == 2 * size for key, (_, size) in self.part_layout.items()
        )
        self.chunk_nbytes = sum(part.nbytes for part in template.values())
        if window is not None:
            slots = -(-window // self.chunk) + 1
        elif capacity is not None:
            slots = max(1, -(-capacity // self.chunk))
        else:
            slots = _INITIAL_CHUNKS
        self.store = self._allocate(slots)
        self.slots = slots
        # the residual never holds more than residual + chunk - 1 tokens between appends
        self.pending = np.empty((num_kv_heads, 0, head_dim), np.float32)
        # decode steps write the residual in place: ``pending`` is then ``buffered``, the
        # first tokens of ``buffer`` (float32 (heads, residual + chunk, head_dim))
        self.buffer = self.buffered = None
        self._entry_tables()
        # positions 0 .. sinks.shape[1] - 1, rotated as the residual is
        self.sinks = np.empty((num_kv_heads, 0, head_dim), np.float32)
        self.appended = 0
        self.first_chunk = 0
        self.chunks = 0

    def __getstate__(self) -> dict:
        """For pickle and copies: everything but the cached byte views of the params."""
        state = dict(self.__dict__)
        state.pop("_param_bytes", None)
        state["pending"] = np.ascontiguousarray(state["pending"])  # the residual alone
        state["buffer"] = state["buffered"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "sinks" not in state:  # pickled before sink tokens
            self.sink_tokens = 0
            self.sinks = np.empty((self.heads, 0, self.head_dim), np.float32)
        self.__dict__.setdefault("rope", None)
        for name, default in (
            ("order", None),
            ("inverse", None),
            ("channel_tables", _NO_CHANNELS),
        ):
            self.__dict__.setdefault(name, default)
        self.__dict__.setdefault("stored_scheme", self.scheme)
        if "rotation" not in state:  # pickled before decode steps wrote in place
            self.buffer = self.buffered = None
            self._entry_tables()

    def _entry_tables(self) -> None:
        """What a decode step's token goes through on its way in (``kernels.stage_tokens``):
        ``rotation`` float32 (head_dim, head_dim), empty without one (read-only: one kernel
        type), and ``gather`` int64 (heads * head_dim), the flat channel order (empty: none)."""
        seed = self.rotation_seed
        self.rotation = _NO_ROTATION if seed is None else hadamard_rotation(self.head_dim, seed)
        order = self.order
        self.gather = _NO_ORDER if order is None else np.ascontiguousarray(order, np.int64).ravel()

    # --- storage ----------------------------------------------------------------------------

    def _allocate(self, slots: int) -> dict[str, np.ndarray]:
        store = {}
        for key, (dtype, size) in self.part_layout.items():
            shape = (slots, size)
            store[key] = (
                np.empty(shape, dtype) if self.pool is None else self.pool.acquire(shape, dtype)
            )
        return store

    def release(self) -> None:
        """Return pooled storage (a no-op without a pool)."""
        if self.pool is not None:
            for array in self.store.values():
                self.pool.release(array)
            self.store = {}

    @property
    def reserved_nbytes(self) -> int:
        return sum(array.nbytes for array in self.store.values())

    def clone(self) -> TensorStream:
        """An independent copy: its own store (from the same pool, if any) and residual."""
        twin = copy.copy(self)
        twin.store = self._allocate(self.slots)
        for key, array in self.store.items():
            twin.store[key][...] = array
        twin.pending = self.pending.copy()
        twin.buffer = twin.buffered = None  # never the original's
        twin.sinks = self.sinks.copy()
        return twin

    def truncation(self, length: int) -> HeldLayout | str:
        """The layout after keeping only the first ``length`` tokens, or why that is not exact.

        Exact means no quantized token is cut out of its chunk (and later re-quantized) and no
        token the window already dropped is needed again: the result is what appending just
        those ``length`` tokens would have held.
        """
        target = held_layout(length, self.chunk, self.residual_target, self.window)
        if target.first_chunk < self.first_chunk:
            return (
                f"the window already dropped the tokens before position {self.first_position} "
                f"that {length} tokens would still hold"
            )
        cut = min(length, self.chunks * self.chunk)
        if target.chunks < self.chunks and cut > target.chunks * self.chunk:
            return (
                f"{self.name} tokens {target.chunks * self.chunk} to {cut - 1} are quantized "
                f"together with later ones ({self.chunk}-token chunks, "
                f"{self.residual_target} float32 residual tokens)"
            )
        return target

    def truncate(self, target: HeldLayout) -> None:
        """Apply a :meth:`truncation` layout."""
        keep = target.appended - target.chunks * self.chunk
        self.sinks = np.ascontiguousarray(self.sinks[:, : target.appended])
        if target.chunks == self.chunks:
            self.pending = np.ascontiguousarray(self.pending[:, :keep])
        else:
            self.pending = np.empty((self.heads, 0, self.head_dim), np.float32)
        self.chunks = target.chunks
        self.first_chunk = target.first_chunk
        self.appended = target.appended

    # --- appending ----------------------------------------------------------------------------

    def stage(self, new: np.ndarray) -> _Staged:
        """Quantize the chunks ``new`` completes and allocate any larger store, changing no
        state; :meth:`commit` applies the result (or :meth:`discard` undoes allocations)."""
        appended = self.appended + new.shape[1]
        if self.rope is not None:
            new = self.rope.rotate(new, self.appended, inverse=True)
            if not float(np.abs(new).max()) <= self.limit:  # checked before RoPE in _check
                self.raise_out_of_range(new, rotated=True)
        if self.rotation_seed is not None:
            new = rotate(new, self.rotation_seed)
            if not float(np.abs(new).max()) <= self.limit:  # checked unrotated in _check
                self.raise_out_of_range(new, rotated=True)
        if self.order is not None:  # the stored channel order (widest first)
            new = _gather_channels(new, self.order)
        pending = np.concatenate([self.pending, new], axis=1) if self.pending.size else new
        sinks = self.sinks
        if self.appended < self.sink_tokens:
            take = min(self.sink_tokens - self.appended, new.shape[1])
            sinks = np.concatenate([sinks, new[:, :take]], axis=1)
        return self._stage_chunks(pending, sinks, appended)

    def stage_token(self) -> _Staged:
        """:meth:`stage` of the token :meth:`token_slot`'s slot received (checked, rotated
        and in the stored channel order already; never a sink token)."""
        return self._stage_chunks(
            self.buffer[:, : self.pending.shape[1] + 1], self.sinks, self.appended + 1
        )

    def _stage_chunks(self, pending: np.ndarray, sinks: np.ndarray, appended: int) -> _Staged:
        """The rest of :meth:`stage`: ``pending`` is the residual with the new tokens, as
        held (rotated, channels ordered); ``sinks`` the sink copy with them."""
        layout = held_layout(appended, self.chunk, self.residual_target, self.window)
        count = layout.chunks - self.chunks
        base = self.chunks * self.chunk  # pending's first position
        if count and base < self.sink_tokens:
            pending = self._without_sinks(pending, base, count)
        # chunks out of the window before they are ever read are never quantized
        dropped = min(count, max(0, layout.first_chunk - self.chunks))
        kept = count - dropped
        rows = {}  # one row per kept chunk, in order; most decode steps complete none
        if kept > 1 and self.batchable:
            values = pending[:, dropped * self.chunk : count * self.chunk]
            batch = values.reshape(self.heads, kept, self.chunk, self.head_dim)
            parts = quantize(batch.transpose(1, 0, 2, 3), scheme=self.plain_scheme).parts()
        elif kept:
            each = [
                quantize(
                    pending[:, i * self.chunk : (i + 1) * self.chunk], scheme=self.plain_scheme
                ).parts()
                for i in range(dropped, count)
            ]
            parts = each[0]  # most often one chunk: a decode step's
            if kept > 1:
                parts = {key: np.concatenate([p[key] for p in each]) for key in self.part_layout}
        if kept:
            layout_sizes = self.part_layout.items()
            rows = {key: parts[key].reshape(kept, size) for key, (_, size) in layout_sizes}
        store = None
        if self.window is None and layout.chunks > self.slots:
            slots = max(layout.chunks, 2 * self.slots)
            store = (self._allocate(slots), slots)
        rest = np.ascontiguousarray(pending[:, count * self.chunk :])
        if layout.first_chunk > 0:  # position 0 left the window: its copy goes too
            sinks = sinks[:, :0]
        return _Staged(rest, sinks, dropped, rows, appended, layout.first_chunk, store)

    def _without_sinks(self, pending: np.ndarray, base: int, count: int) -> np.ndarray:
        """A copy of ``pending`` (positions from ``base``) in whose first ``count`` chunks
        each sink position holds its chunk's first later token (zeros in a chunk of sinks
        only): the values the chunk quantizes; the sinks themselves are read from the copy.
        Residual tokens past the chunks keep their values."""
        out = pending.copy()
        for first in range(base, min(base + count * self.chunk, self.sink_tokens), self.chunk):
            stop = min(self.sink_tokens, first + self.chunk)
            if stop < first + self.chunk:
                out[:, first - base : stop - base] = out[:, stop - base : stop - base + 1]
            else:
                out[:, first - base : stop - base] = 0.0
        return out

    def raise_out_of_range(self, values: np.ndarray, rotated: bool = False) -> None:
        """ValueError naming the first token (of ``values``, about to be appended) past
        :attr:`limit`."""
        head, token, channel = (int(i) for i in np.argwhere(~(np.abs(values) <= self.limit))[0])
        value = float(values[head, token, channel])
        where = f"at head {head}, token {token} (position {self.appended + token})"
        beyond = (
            f"beyond +-{self.limit:g}, the largest magnitude {self.scheme.describe()} "
            f"stores; {self.limit_hint}"
        )
        if rotated:
            raise ValueError(f"{self.name} {where} reaches {value:g} after rotation, {beyond}")
        raise ValueError(f"{self.name} has {value!r} {where}, channel {channel}, {beyond}")

    def discard(self, staged: _Staged) -> None:
        if staged.store is not None and self.pool is not None:
            for array in staged.store[0].values():
                self.pool.release(array)

    def commit(self, staged: _Staged) -> None:
        """Apply :meth:`stage`'s result: grow, write chunks (wrapping a ring), keep the rest."""
        if staged.store is not None:
            bigger, slots = staged.store
            for key, array in self.store.items():
                bigger[key][: self.chunks] = array[: self.chunks]
            self.release()
            self.store, self.slots = bigger, slots
        self.chunks += staged.dropped
        kept = next(iter(staged.rows.values())).shape[0] if staged.rows else 0
        done = 0
        while done < kept:  # contiguous runs of slots: at most two unless a ring wraps often
            slot = self.chunks % self.slots
            run = min(kept - done, self.slots - slot)
            for key, rows in staged.rows.items():
                self.store[key][slot : slot + run] = rows[done : done + run]
            done += run
            self.chunks += run
        self.pending = staged.pending
        self.sinks = staged.sinks
        self.appended = staged.appended
        self.first_chunk = staged.first_chunk

    # --- reading ------------------------------------------------------------------------------

    @property
    def held(self) -> int:
        """Tokens held: those of the held chunks plus the residual."""
        return (self.chunks - self.first_chunk) * self.chunk + self.pending.shape[1]

    @property
    def first_position(self) -> int:
        return self.first_chunk * self.chunk

    @property
    def nbytes(self) -> int:
        quantized = (self.chunks - self.first_chunk) * self.chunk_nbytes
        return quantized + self.pending.nbytes + self.sinks.nbytes + table_bytes(self.scheme)

    def token_slot(self) -> tuple[np.ndarray, int, bool] | None:
        """(residual buffer, slot, whether the token completes a chunk) for one more token,
        or None when it is a sink token or the keys are held before RoPE (the general path of
        :meth:`stage`). Moves the residual into the buffer if it is not there (same values).
        Then :meth:`commit_token` counts a token that only waits there, and
        :meth:`stage_token` quantizes the chunk one completes."""
        appended = self.appended + 1
        if appended <= self.sink_tokens or self.rope is not None:
            return None
        chunks = max(0, (appended - self.residual_target) // self.chunk)
        completes = chunks != self.chunks
        if self.window is not None and not completes:
            first = min(chunks, max(0, (appended - self.window) // self.chunk))
            completes = first != self.first_chunk  # drops chunks: the general commit
        held = self.pending.shape[1]
        if self.pending is not self.buffered:
            buffer = self.buffer
            if buffer is None or buffer.shape[1] <= held:
                size = max(self.residual_target + self.chunk, held + 1)
                buffer = np.empty((self.heads, size, self.head_dim), np.float32)
                self.buffer = buffer
            buffer[:, :held] = self.pending
            self.pending = self.buffered = buffer[:, :held]
        return self.buffer, held, completes

    def commit_token(self) -> None:
        """Count the token :meth:`token_slot`'s slot received."""
        self.pending = self.buffered = self.buffer[:, : self.pending.shape[1] + 1]
        self.appended += 1

    def kernel_view(self) -> StreamView:
        """The store as the attention kernel reads it: the scheme's integers and the store's
        arrays by name (params as bytes). Valid until the next append or truncate."""
        scheme = self.scheme
        store = self.store
        cached = self.__dict__.get("_param_bytes")
        if cached is None or cached[0] is not store:  # a new store: its params as bytes
            if scheme.double_quant:
                keys = ("scale_codes", "min_codes", "super_scales", "super_mins")
                params = [store[key] for key in keys]
            else:
                params = [store["scales"], store["mins"], _NO_PARAMS, _NO_PARAMS]
            cached = (store, *(p.view(np.uint8) for p in params))
            self._param_bytes = cached
        _, p0, p1, p2, p3 = cached
        return StreamView(
            scheme.bits,
            scheme.axis in (-2, 1),
            scheme.group_size,
            self.chunk,
            self.chunks,
            self.slots,
            scheme.double_quant,
            scheme.scale_dtype == "float16",
            store["codes"],
            p0,
            p1,
            p2,
            p3,
            # the kernel reads the residual's first tokens only: the whole buffer (contiguous)
            self.buffer if self.pending is self.buffered else self.pending,
            *(_NO_TABLES if self.rope is None else self.rope.tables(self.appended)),
            *self.channel_tables,
        )

    def chunk_view(self, first: int, last: int) -> QuantizedTensor:
        """Chunks ``[first, last)`` (absolute indices, held, not wrapping) as one tensor of
        shape (last - first, heads, chunk, head_dim)."""
        lo, hi = first % self.slots, (last - 1) % self.slots + 1
        parts = {key: array[lo:hi].reshape(-1) for key, array in self.store.items()}
        shape = (last - first, *self.chunk_shape)
        return QuantizedTensor.from_parts(parts, shape, np.float32, self.stored_scheme)

    def read(self, start: int, end: int) -> np.ndarray:
        """float32 (heads, end - start, head_dim) of held tokens ``[start, end)``."""
        out = np.empty((self.heads, end - start, self.head_dim), np.float32)
        quantized = (self.chunks - self.first_chunk) * self.chunk
        if start < min(end, quantized):
            first = self.first_chunk + start // self.chunk
            last = self.first_chunk + -(-min(end, quantized) // self.chunk)
            pieces = []
            while first < last:  # a ring view may wrap once
                stop = min(last, first + self.slots - first % self.slots)
                values = self.chunk_view(first, stop).dequantize()
                pieces.append(np.moveaxis(values, 0, 1).reshape(self.heads, -1, self.head_dim))
                first = stop
            block = np.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0]
            offset = start % self.chunk
            take = min(end, quantized) - start
            out[:, :take] = block[:, offset : offset + take]
        if end > quantized:
            lo = max(start, quantized)
            residual = self.pending[:, lo - quantized : end - quantized]
            if self.rotation_seed is not None:
                residual = unrotate(residual, self.rotation_seed)
            out[:, lo - start :] = residual
        exact = min(end, self.sinks.shape[1])  # held sinks: positions from 0
        if start < exact:
            sinks = self.sinks[:, start:exact]
            if self.rotation_seed is not None:
                sinks = unrotate(sinks, self.rotation_seed)
            out[:, : exact - start] = sinks
        if self.order is not None:  # back to the model's channel order
            out = _gather_channels(out, self.inverse)
        if self.rope is not None:  # held index i is position appended - held + i
            out = self.rope.rotate(out, self.appended - self.held + start)
        return out

    def exact_sinks(self, count: int) -> np.ndarray:
        """float32 (heads, count, head_dim): the sink copy of positions 0 .. count - 1 in the
        basis the kernel's queries meet (Hadamard-rotated as the residual is, RoPE applied,
        channels in the stored order)."""
        sinks = self.sinks[:, :count]
        return sinks if self.rope is None else self.rope.rotate(sinks, 0)


def _gather_channels(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """float32 (heads, t, head_dim): channel j of head h of the result is x's channel
    ``index[h, j]`` of heads and channels flattened (h * head_dim + c)."""
    heads, t, dim = x.shape
    if t == 1:  # a decode step: one gather
        return x.reshape(heads * dim)[index].reshape(heads, 1, dim)
    tokens = np.ascontiguousarray(x.transpose(1, 0, 2)).reshape(t, heads * dim)
    return np.ascontiguousarray(tokens[:, index].reshape(t, heads, dim).transpose(1, 0, 2))


def table_bytes(scheme: Scheme) -> int:
    """Bytes of a stream's width table: one per channel of ``channel_bits`` (0 without)."""
    return 0 if scheme.channel_bits is None else scheme.channel_widths.size


def channel_tables(widths: np.ndarray, chunk: int) -> tuple[np.ndarray, ...]:
    """The kernel's tables of per-channel widths ``widths`` (int64 (heads, head_dim), each
    head's widest first) for chunks of ``chunk`` tokens: (channel_bits int64 (heads *
    head_dim), channel_at int64 (heads * head_dim): the byte of a slot row where each
    channel's codes start, channel_runs int64 (heads, CHANNEL_RUNS): the end of each run of
    equal widths, then head_dim)."""
    heads, dim = widths.shape
    flat = np.ascontiguousarray(widths, np.int64).reshape(-1)
    starts = np.zeros(flat.size, np.int64)
    np.cumsum(flat[:-1] * chunk // 8, out=starts[1:])
    runs = np.full((heads, CHANNEL_RUNS), dim, np.int64)
    for head in range(heads):
        ends = [j for j in range(1, dim) if widths[head, j] != widths[head, j - 1]] + [dim]
        runs[head, : len(ends)] = ends
    return flat, starts, runs


class CacheView(NamedTuple):
    """A consistent state of a KVCache for a reader (``with cache.reading() as view``)."""

    appended: int  # len(cache): tokens appended, the position after the last
    held: int  # tokens held and readable (the last ``held`` positions)
    window: int | None
    k: StreamView
    v: StreamView
    k_sinks: np.ndarray  # float32 (heads, n, head_dim): exact positions 0 .. n-1, rotated
    v_sinks: np.ndarray  # as the streams' residuals are (keys with RoPE applied); n = 0
    # without sink tokens


class _Reading:
    """``with cache.reading() as view``: the cache's lock held, and its :class:`CacheView`."""

    __slots__ = ("cache",)

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache

    def __enter__(self) -> CacheView:
        cache = self.cache
        cache._lock.acquire()
        k, v = cache._k, cache._v
        exact = cache._sink_count()
        return CacheView(
            k.appended, min(k.held, v.held), cache.window, k.kernel_view(), v.kernel_view(),
            k.exact_sinks(exact), v.exact_sinks(exact),
        )  # fmt: skip

    def __exit__(self, *exc) -> None:
        self.cache._lock.release()


class KVCache:
    """A streaming quantized KV cache for one attention layer.

    ``append(k, v)`` with float arrays of (num_kv_heads, t, head_dim); ``keys(start, end)`` and
    ``values(...)`` give float32 (num_kv_heads, end - start, head_dim) of the tokens held
    (indices into what is held; ``positions`` maps them to absolute positions); ``len()`` is
    the number of tokens appended. ``window=W`` keeps at least the last W + max_queries - 1
    tokens in a ring (whole chunks, so up to chunk - 1 more): enough for
    :func:`kvq.attention` of up to ``max_queries`` query tokens (a prefill chunk) right after
    they are appended, each seeing the last W positions, itself included. ``capacity``
    (tokens) preallocates and fixes the size (CapacityError past it); with neither, storage
    doubles as needed (amortised O(1) per token). ``pool`` supplies the chunk storage,
    returned when the cache is collected.

    Copies: ``copy.copy`` and ``copy.deepcopy`` both give an independent cache with its own
    data and lock; a pool-backed cache's copy takes its storage from the same pool. Pickling
    a pool-backed cache raises TypeError (a pool does not travel between processes).

    Input: k and v must be finite; NaN or +-Inf (or float64 beyond the float32 range) raises
    ValueError naming the tensor, head, token (and its absolute position) and channel, and the
    cache stays as it was. So does a value the scheme cannot store (:func:`value_limit`:
    +-65504 with float16 scales), checked when it arrives even if it is quantized later.

    Threads: every operation on one cache holds the cache's lock (a ``threading.RLock``), so
    appends from several threads never corrupt it: each append is applied whole, one at a
    time, in whichever order the threads get the lock (append from one thread when the token
    order matters). ``keys``, ``values``, ``stats`` and ``kvq.attention`` read a consistent
    state and wait for a running append. Separate caches share nothing and run in parallel.
    """

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        config: QuantConfig | None = None,
        capacity: int | None = None,
        window: int | None = None,
        pool: MemoryPool | None = None,
        max_queries: int = 1,
        rope: Rope | None = None,
    ) -> None:
        self.num_kv_heads = check_int("num_kv_heads", num_kv_heads)
        self.head_dim = check_int("head_dim", head_dim)
        self.config = QuantConfig() if config is None else config
        if not isinstance(self.config, QuantConfig):
            raise TypeError(f"config must be a kvq.QuantConfig, got {self.config!r}")
        self.capacity = None if capacity is None else check_int("capacity", capacity)
        self.window = None if window is None else check_int("window", window)
        self.max_queries = check_int("max_queries", max_queries)
        self.pool = pool
        if self.capacity is not None and self.window is not None:
            raise ValueError("give capacity or window, not both: a windowed cache is a ring")
        if rope is not None and not isinstance(rope, Rope):
            raise TypeError(f"rope must be a kvq.Rope, got {rope!r}")
        if rope is not None and rope.head_dim != self.head_dim:
            raise ValueError(f"rope has head_dim {rope.head_dim}, the cache {self.head_dim}")
        if self.config.pre_rope and rope is None:
            raise ValueError(
                "config.pre_rope keeps keys before RoPE, so the cache needs the model's RoPE "
                "frequencies: pass rope=kvq.Rope.from_theta(theta, head_dim) (or "
                "kvq.Rope(inverse_frequencies))"
            )
        self.rope = rope
        for name, scheme in (("k", self.config.k), ("v", self.config.v)):
            if scheme.axis not in (-1, -2, 1, 2):
                raise ValueError(
                    f"config.{name}.axis must be -1 (per token) or -2 (per channel), "
                    f"got {scheme.axis}"
                )
            if scheme.rotate and self.head_dim & (self.head_dim - 1):
                raise ValueError(
                    f"config.{name} rotates, which needs head_dim to be a power of two, got "
                    f"{head_dim}: use a scheme without rotation, e.g. kvq.QuantConfig.q8("
                    "rotate=False)"
                )
        streams = [
            TensorStream(
                name,
                scheme,
                self.num_kv_heads,
                self.head_dim,
                self.config.residual,
                kept_window(self.window, self.max_queries),
                self.capacity,
                pool,
                self.config.sink_tokens,
                rope if name == "k" and self.config.pre_rope else None,
            )
            for name, scheme in (("k", self.config.k), ("v", self.config.v))
        ]
        self._k, self._v = streams
        self._lock = threading.RLock()
        if pool is not None:
            weakref.finalize(self, _release_all, streams)

    def append(self, k, v) -> None:
        """Append t >= 1 tokens: k and v of (num_kv_heads, t, head_dim), finite floats.

        Validates everything and quantizes what completes a chunk before changing anything:
        on any error the cache is as it was. Appends of at most ``SERIAL_VALUES`` new values
        (K and V together: a decode step) run their kernels on the calling thread only. One
        float32 token past the sink tokens (a model's decode step; keys not held before RoPE)
        is checked, rotated and stored by a single kernel call (``kernels.stage_tokens``):
        about 9 us instead of 50 on SmolLM2's shape, the same values bit for bit.
        """
        with self._lock:
            if self._append_token(k, v):
                return
            k_new, v_new = self._check_pair(k, v)
            stage_k, stage_v = partial(self._k.stage, k_new), partial(self._v.stage, v_new)
            self._commit_pair(k_new.size, stage_k, stage_v)

    def _append_token(self, k, v) -> bool:
        """A decode step's append: a token of float32 k and v (heads, 1, head_dim) checked,
        rotated and put in the residual by one kernel call (see
        :meth:`TensorStream.token_slot`), and the chunks it completes quantized. False,
        changing nothing the general path would not, when it is not one (a sink token, keys
        before RoPE) or when a value is bad (the general path then says which)."""
        if type(k) is not np.ndarray or type(v) is not np.ndarray:
            return False
        shape = (self.num_kv_heads, 1, self.head_dim)
        if k.shape != shape or v.shape != shape or k.dtype != _FLOAT32 or v.dtype != _FLOAT32:
            return False
        k = k if k.flags.c_contiguous else np.ascontiguousarray(k)  # one kernel type
        v = v if v.flags.c_contiguous else np.ascontiguousarray(v)
        if self.capacity is not None and self._k.appended >= self.capacity:
            return False
        ks, vs = self._k, self._v
        k_slot = ks.token_slot()
        v_slot = None if k_slot is None else vs.token_slot()
        if v_slot is None:
            return False
        (k_buffer, k_held, k_completes), (v_buffer, v_held, v_completes) = k_slot, v_slot
        status = kernels.stage_tokens(
            k, v, ks.rotation, vs.rotation, ks.gather, vs.gather, ks.limit, vs.limit,
            k_buffer, v_buffer, k_held, v_held,
        )  # fmt: skip
        if status:
            return False
        # a chunk the token completes is quantized as the general path's are
        stage_k = ks.stage_token if k_completes else None
        stage_v = vs.stage_token if v_completes else None
        self._commit_pair(k.size, stage_k, stage_v)
        return True

    def _commit_pair(self, size: int, stage_k, stage_v) -> None:
        """Stage K, then V (``stage_k``/``stage_v``: callables giving a stream's staged
        append; None for a decode token that only waits in the residual), undoing K's
        allocations if V's staging raises; then commit both. Appends of at most
        ``SERIAL_VALUES`` values (``size`` each of K and V) run on the calling thread."""
        quantizes = stage_k is not None or stage_v is not None
        if quantizes and 2 * size <= SERIAL_VALUES:  # a decode step: no parallel launch
            on_calling_thread(self._stage_and_commit, stage_k, stage_v)
        else:
            self._stage_and_commit(stage_k, stage_v)

    def check_append(self, k, v) -> None:
        """Raise what :meth:`append` would raise for ``k`` and ``v`` (bad dtype, shape,
        non-finite or unstorable values, capacity), appending nothing. Lets a caller that
        appends to several caches check them all first."""
        with self._lock:
            k_new, v_new = self._check_pair(k, v)
            for stream, new in ((self._k, k_new), (self._v, v_new)):
                if stream.rotation_seed is None and stream.rope is None:
                    continue
                # the range after rotation, as stage() checks it; a rotation keeps each
                # row's L2 norm, so rows within the limit in norm need no rotating here
                norms = np.sqrt(np.einsum("htd,htd->ht", new, new, dtype=np.float64))
                if float(norms.max()) <= stream.limit:
                    continue
                if stream.rope is not None:
                    rotated = stream.rope.rotate(new, stream.appended, inverse=True)
                else:
                    rotated = rotate(new, stream.rotation_seed)
                if not float(np.abs(rotated).max()) <= stream.limit:
                    stream.raise_out_of_range(rotated, rotated=True)

    def _check_pair(self, k, v) -> tuple[np.ndarray, np.ndarray]:
        k_new = self._check("k", k)
        v_new = self._check("v", v)
        if k_new.shape != v_new.shape:
            raise ValueError(
                f"k and v must have the same shape, got {k_new.shape} and {v_new.shape}"
            )
        if self.capacity is not None and len(self) + k_new.shape[1] > self.capacity:
            raise CapacityError(
                f"appending {k_new.shape[1]} tokens to {len(self)} would pass this "
                f"cache's capacity of {self.capacity} tokens"
            )
        return k_new, v_new

    def _stage_and_commit(self, stage_k, stage_v) -> None:
        staged_k = None if stage_k is None else stage_k()
        try:
            staged_v = None if stage_v is None else stage_v()
        except BaseException:
            if staged_k is not None:
                self._k.discard(staged_k)
            raise
        for stream, staged in ((self._k, staged_k), (self._v, staged_v)):
            if staged is None:
                stream.commit_token()
            else:
                stream.commit(staged)

    def _check(self, name: str, x) -> np.ndarray:
        array = np.asarray(x)
        check_float_dtype(name, array.dtype)
        expected = (self.num_kv_heads, "t", self.head_dim)
        if (
            array.ndim != 3
            or array.shape[0] != self.num_kv_heads
            or array.shape[2] != self.head_dim
        ):
            raise ValueError(f"{name} must have shape {expected} with t >= 1, got {array.shape}")
        if array.shape[1] < 1:
            raise ValueError(f"{name} must hold at least one token, got shape {array.shape}")
        if array.dtype.itemsize == 8:  # float64 beyond float32 becomes inf: reported below
            with np.errstate(over="ignore"):
                values = np.ascontiguousarray(array, dtype=np.float32)
        else:  # float16 and float32 convert exactly (errstate costs a microsecond)
            values = np.ascontiguousarray(array, dtype=np.float32)
        # one pass for NaN (which fails every comparison), Inf and values the scheme cannot
        # store; a rotating stream checks its range after the rotation, in stage()
        stream = self._k if name == "k" else self._v
        rotates = stream.rotation_seed is not None or stream.rope is not None
        limit = FLOAT32_MAX if rotates else stream.limit
        if not float(np.abs(values).max()) <= limit:

            def at(index: int) -> str:
                head, token, channel = (int(i) for i in np.unravel_index(index, values.shape))
                return (
                    f"head {head}, token {token} (position {stream.appended + token}), "
                    f"channel {channel}"
                )

            check_finite(name, values, "kvq caches finite values only", array, at=at)
            stream.raise_out_of_range(values)
        return values

    def _sink_count(self) -> int:
        """Sink tokens both streams hold exactly (positions 0 .. count - 1)."""
        return min(self._k.sinks.shape[1], self._v.sinks.shape[1])

    def reading(self) -> _Reading:
        """A context manager holding the cache's lock (appends wait) and giving its state as a
        :class:`CacheView`, for readers such as :func:`kvq.attention`::

            with cache.reading() as view:
                ...  # view.k, view.v: the streams' StreamViews, valid inside the block
        """
        return _Reading(self)

    def __len__(self) -> int:
        with self._lock:
            return self._k.appended

    @property
    def held(self) -> int:
        """Tokens held (and readable); fewer than ``len(self)`` once a window drops chunks."""
        with self._lock:
            return min(self._k.held, self._v.held)

    @property
    def positions(self) -> np.ndarray:
        """Absolute positions (int64) of the tokens ``keys()`` and ``values()`` return."""
        with self._lock:
            return np.arange(len(self) - self.held, len(self), dtype=np.int64)

    def keys(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """float32 (num_kv_heads, end - start, head_dim): held keys ``[start, end)``."""
        with self._lock:
            start, end = self._range(start, end)
            skip = self._k.held - self.held
            return self._k.read(start + skip, end + skip)

    def values(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """float32 (num_kv_heads, end - start, head_dim): held values ``[start, end)``."""
        with self._lock:
            start, end = self._range(start, end)
            skip = self._v.held - self.held
            return self._v.read(start + skip, end + skip)

    def _range(self, start, end) -> tuple[int, int]:
        held = self.held
        try:
            if isinstance(start, bool | np.bool_) or isinstance(end, bool | np.bool_):
                raise TypeError
            start = operator.index(start)
            end = held if end is None else operator.index(end)
        except TypeError:
            raise TypeError(f"start and end must be integers, got {start!r} and {end!r}") from None
        if not 0 <= start <= end <= held:
            raise IndexError(f"token range [{start}, {end}) is outside the {held} tokens held")
        return start, end

    @property
    def nbytes(self) -> int:
        """Bytes of data held: codes, scales and mins of held chunks, plus the residual."""
        with self._lock:
            return self._k.nbytes + self._v.nbytes

    @property
    def bits_per_element(self) -> float:
        """Measured bits per held element: 8 * nbytes over the K and V elements held (NaN
        when empty). Counts codes, scales, mins, second-level scales and residual floats."""
        with self._lock:
            held_values = 2 * self.held * self.num_kv_heads * self.head_dim
            return 8 * self.nbytes / held_values if held_values else float("nan")

    def stats(self) -> dict[str, float | int]:
        """Counts and bytes: appended, held, quantized and residual tokens, chunks, nbytes,
        reserved bytes, and ``bits_per_element`` (measured; the key ``bits_per_value`` is a
        deprecated alias)."""
        with self._lock:
            return self._stats()

    def _stats(self) -> dict[str, float | int]:
        return Stats(
            {
                "appended": len(self),
                "held": self.held,
                "k_quantized": self._k.held - self._k.pending.shape[1],
                "v_quantized": self._v.held - self._v.pending.shape[1],
                "k_residual": self._k.pending.shape[1],
                "v_residual": self._v.pending.shape[1],
                "sink_tokens": self._sink_count(),
                "k_chunk_tokens": self._k.chunk,
                "v_chunk_tokens": self._v.chunk,
                "nbytes": self.nbytes,
                "reserved_nbytes": self._k.reserved_nbytes + self._v.reserved_nbytes,
                "bits_per_element": self.bits_per_element,
            }
        )

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` tokens appended (``transformers``' ``crop``).

        Exact or refused: ValueError, leaving the cache as it was, when a token to remove is
        quantized in the same chunk as a token to keep (cut at a chunk boundary, or within
        the float32 residual), or when a window already dropped a token that ``length``
        tokens would hold. Afterwards the cache is what appending those tokens would give.
        """
        with self._lock:
            targets = self._truncation(length)
            self._k.truncate(targets[0])
            self._v.truncate(targets[1])

    def check_truncate(self, length: int) -> None:
        """Raise what :meth:`truncate` would raise for ``length``, changing nothing."""
        with self._lock:
            self._truncation(length)

    def _truncation(self, length) -> list[HeldLayout]:
        length = check_int("length", length, 0)
        if length > len(self):
            raise ValueError(f"length {length} exceeds the {len(self)} tokens appended")
        targets = [stream.truncation(length) for stream in (self._k, self._v)]
        for target in targets:
            if isinstance(target, str):
                raise ValueError(
                    f"cannot truncate {len(self)} tokens to {length} exactly: {target}"
                )
        return targets

    def __copy__(self) -> KVCache:
        return self.__deepcopy__({})

    def __deepcopy__(self, memo: dict) -> KVCache:
        """An independent cache: copied data, its own lock, storage from the same pool."""
        with self._lock:
            twin = object.__new__(type(self))
            twin.__dict__.update(self.__dict__)
            twin._k, twin._v = self._k.clone(), self._v.clone()
            twin._lock = threading.RLock()
        if self.pool is not None:
            weakref.finalize(twin, _release_all, [twin._k, twin._v])
        memo[id(self)] = twin
        return twin

    def __getstate__(self) -> dict:
        """For pickle: everything but the lock (each copy gets its own)."""
        if self.pool is not None:
            raise TypeError(
                "a KVCache whose storage comes from a MemoryPool cannot be pickled; copy it "
                "with copy.deepcopy (same pool), or build it without a pool"
            )
        with self._lock:
            return {key: value for key, value in self.__dict__.items() if key != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("max_queries", 1)  # pickled before these attributes
        self.__dict__.setdefault("pool", None)
        self.__dict__.setdefault("rope", None)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        window = f", window={self.window}" if self.window else ""
        sinks = f", sink_tokens {self.config.sink_tokens}" if self.config.sink_tokens else ""
        with self._lock:
            counts = f"{len(self)} tokens appended, {self.held} held{window}"
            size = in_unit(self.nbytes, "MiB")
        return (
            f"KVCache({self.num_kv_heads} heads x {self.head_dim}, {counts}, "
            f"K {_label(self.config.k)}, V {_label(self.config.v)}, "
            f"residual {self.config.residual}{sinks}, {size})"
        )


def _label(scheme: Scheme) -> str:
    """``scheme.describe()`` with the axis named for a (heads, tokens, head_dim) cache."""
    layout = {-1: "per token", 2: "per token", -2: "per channel", 1: "per channel"}
    return f"{scheme.describe()} ({layout.get(scheme.axis, 'axis ' + str(scheme.axis))})"


class Stats(dict):
    """A plain dict of :meth:`KVCache.stats`; the old key ``bits_per_value`` still reads
    ``bits_per_element``, with a DeprecationWarning."""

    def __getitem__(self, key):
        if key == "bits_per_value":
            warnings.warn(
                "stats()['bits_per_value'] is deprecated: use stats()['bits_per_element']",
                DeprecationWarning,
                stacklevel=2,
            )
            key = "bits_per_element"
        return super().__getitem__(key)

    def get(self, key, default=None):
        return self[key] if key in self or key == "bits_per_value" else default


def _release_all(streams: list[TensorStream]) -> None:
    for stream in streams:
        stream.release()


def kept_window(window: int | None, max_queries: int) -> int | None:
    """Tokens a windowed stream must keep: the window of the first of ``max_queries`` queries
    appended together reaches back ``window + max_queries - 1`` tokens."""
    return None if window is None else window + max_queries - 1


def stream_bytes(
    scheme: Scheme,
    num_kv_heads: int,
    head_dim: int,
    appended: int,
    residual: int,
    window,
    max_queries: int = 1,
    sink_tokens: int = 0,
) -> int:
    """Bytes one stream holds after ``appended`` tokens (what TensorStream.nbytes reports)."""
    chunk = chunk_tokens(scheme, num_kv_heads, head_dim)
    layout = held_layout(appended, chunk, residual, kept_window(window, max_queries))
    template = quantize(np.zeros((num_kv_heads, chunk, head_dim), np.float32), scheme=scheme)
    exact = layout.residual + (min(sink_tokens, appended) if layout.first_chunk == 0 else 0)
    floats = exact * num_kv_heads * head_dim * 4
    return layout.held_chunks * template.nbytes + floats + table_bytes(scheme)
