"""MemoryPool: alignment, exact accounting, first-fit reuse, merging, errors, threads, a model."""

import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvq.errors import KvqError, PoolExhausted
from kvq.pool import MemoryPool


def address(a: np.ndarray) -> int:
    return a.ctypes.data


def reserved(a: np.ndarray) -> int:
    """Bytes the pool reserves for ``a``: its size rounded up to 64, at least 64."""
    return max(-(-a.nbytes // 64) * 64, 64)


# --- layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("nbytes, capacity", [(1, 64), (64, 64), (65, 128), (1000, 1024)])
def test_capacity_is_rounded_up_to_64(nbytes, capacity):
    pool = MemoryPool(nbytes)
    assert pool.capacity == capacity
    assert pool.stats()["capacity"] == capacity
    assert pool.stats()["largest_free"] == capacity


def test_every_view_is_aligned_contiguous_writeable_and_of_the_asked_type():
    pool = MemoryPool(1 << 16)
    requests = [  # (shape, dtype, shape wanted)
        ((3,), np.int8, (3,)),
        ((5, 7), np.float32, (5, 7)),
        ((2, 3, 4), np.float64, (2, 3, 4)),
        (1, np.uint8, (1,)),
        ((), np.int16, ()),
        ((4,), np.complex128, (4,)),
        ((2, 2), ">f4", (2, 2)),
        ((3,), [("a", "<i2"), ("b", "f8")], (3,)),
        ((0,), np.float32, (0,)),
        ((17, 0, 2), np.int64, (17, 0, 2)),
        (np.int64(9), np.float16, (9,)),
        ([2, 5], "uint32", (2, 5)),
    ]
    arrays = []
    for shape, dtype, want_shape in requests:
        a = pool.acquire(shape, dtype)
        assert a.shape == want_shape
        assert a.dtype == np.dtype(dtype)
        assert address(a) % 64 == 0
        assert a.flags.c_contiguous and a.flags.writeable
        arrays.append(a)
    # the arrays do not overlap: each keeps what was written into it
    for i, a in enumerate(arrays):
        a.reshape(-1).view(np.uint8)[...] = i
    for i, a in enumerate(arrays):
        assert np.all(a.reshape(-1).view(np.uint8) == i)
    starts = sorted(address(a) for a in arrays)
    assert len(set(starts)) == len(arrays)


def test_arrays_are_views_of_the_pool_buffer():
    pool = MemoryPool(4096)
    a = pool.acquire(100, np.uint8)
    b = pool.acquire(10, np.float32)
    assert address(b) - address(a) == 128  # first fit: b right after a's 128 reserved bytes
    assert a.base is b.base and a.base is not None


# --- accounting ------------------------------------------------------------------------------


def test_stats_are_exact():
    pool = MemoryPool(4096)
    empty = {"capacity": 4096, "in_use": 0, "peak": 0, "live": 0, "largest_free": 4096}
    assert pool.stats() == {**empty, "free_blocks": 1}
    a = pool.acquire(10, np.float32)  # 40 B -> 64
    b = pool.acquire(100, np.uint8)  # 100 B -> 128
    c = pool.acquire((0, 3), np.float64)  # 0 B -> 64
    d = pool.acquire((4, 16), np.float32)  # 256 B -> 256
    assert pool.stats() == {
        "capacity": 4096,
        "in_use": 512,
        "peak": 512,
        "live": 4,
        "largest_free": 3584,
        "free_blocks": 1,
    }
    pool.release(b)
    assert pool.stats() == {
        "capacity": 4096,
        "in_use": 384,
        "peak": 512,
        "live": 3,
        "largest_free": 3584,
        "free_blocks": 2,
    }
    pool.release(d)  # merges with the tail
    assert pool.stats()["free_blocks"] == 2
    assert pool.stats()["largest_free"] == 3840
    pool.release(a)  # merges with b's range: [0, 192) free, c at 192
    assert pool.stats() == {
        "capacity": 4096,
        "in_use": 64,
        "peak": 512,
        "live": 1,
        "largest_free": 3840,
        "free_blocks": 2,
    }
    pool.release(c)  # joins both sides: one range again
    assert pool.stats() == {**empty, "peak": 512, "free_blocks": 1}


def test_peak_keeps_the_highest_in_use():
    pool = MemoryPool(1024)
    a = pool.acquire(300, np.uint8)  # 320
    pool.release(a)
    b = pool.acquire(64, np.uint8)
    assert pool.stats()["peak"] == 320
    c = pool.acquire(512, np.uint8)
    assert pool.stats()["peak"] == 576
    pool.release(b)
    pool.release(c)
    assert pool.stats()["in_use"] == 0 and pool.stats()["peak"] == 576


def test_zero_size_requests_take_one_granule_each():
    pool = MemoryPool(256)
    a = pool.acquire(0, np.float32)
    b = pool.acquire((3, 0), np.float64)
    assert a.shape == (0,) and b.shape == (3, 0) and a.size == b.size == 0
    assert address(b) - address(a) == 64
    assert pool.stats()["in_use"] == 128 and pool.stats()["live"] == 2
    pool.release(a)
    with pytest.raises(ValueError, match="already released"):
        pool.release(a)
    pool.release(b)
    assert pool.stats()["in_use"] == 0


# --- reuse and merging -----------------------------------------------------------------------


def test_freed_space_is_reused_first_fit():
    pool = MemoryPool(4096)
    a = pool.acquire(256, np.uint8)
    b = pool.acquire(64, np.uint8)
    c = pool.acquire(512, np.uint8)
    pool.acquire(64, np.uint8)
    where_a, where_c = address(a), address(c)
    pool.release(a)
    pool.release(c)
    # lowest hole that fits: 100 B goes into a's hole, 300 B does not fit there but in c's
    small = pool.acquire(100, np.uint8)
    assert address(small) == where_a
    big = pool.acquire(300, np.uint8)
    assert address(big) == where_c
    # what is left of a's hole (128 B) takes the next small request
    assert address(pool.acquire(128, np.uint8)) == where_a + 128
    assert address(b) == where_a + 256


@pytest.mark.parametrize("order", ["ab", "ba"])
def test_neighbours_merge(order):
    pool = MemoryPool(1024)
    a = pool.acquire(128, np.uint8)
    b = pool.acquire(192, np.uint8)
    c = pool.acquire(64, np.uint8)
    rest = pool.acquire(640, np.uint8)  # the pool is full
    assert pool.stats()["largest_free"] == 0 and pool.stats()["free_blocks"] == 0
    for name in order:
        pool.release({"a": a, "b": b}[name])
    assert pool.stats()["free_blocks"] == 1
    assert pool.stats()["largest_free"] == 320
    joined = pool.acquire(320, np.uint8)  # A + B fits where A was
    assert address(joined) == address(a)
    for x in (c, rest, joined):
        pool.release(x)
    assert pool.stats()["largest_free"] == 1024 and pool.stats()["free_blocks"] == 1


def test_release_between_two_free_ranges_joins_all_three():
    pool = MemoryPool(192)
    a, b, c = (pool.acquire(64, np.uint8) for _ in range(3))
    pool.release(a)
    pool.release(c)
    assert pool.stats()["free_blocks"] == 2
    pool.release(b)
    assert pool.stats()["free_blocks"] == 1 and pool.stats()["largest_free"] == 192
    assert address(pool.acquire(192, np.uint8)) == address(a)


# --- errors ----------------------------------------------------------------------------------


def test_exhaustion_reports_request_free_bytes_and_largest_range():
    pool = MemoryPool(1024)
    _, b, _ = (pool.acquire(256, np.uint8) for _ in range(3))
    pool.release(b)  # free: a 256 B hole and a 256 B tail, 512 B in all
    before = pool.stats()
    with pytest.raises(PoolExhausted) as info:
        pool.acquire((75,), np.float32)  # 300 B -> 320
    message = str(info.value)
    assert "(75,)" in message and "float32" in message
    assert "needs 320 bytes (300 rounded up" in message
    assert "512 of 1,024 bytes are free" in message
    assert "largest free range is 256 bytes" in message
    assert isinstance(info.value, MemoryError) and isinstance(info.value, KvqError)
    assert pool.stats() == before  # nothing changed
    assert pool.acquire(64, np.float32).size == 64  # 256 B still fits


def test_huge_request_is_exhaustion_not_overflow():
    pool = MemoryPool(1024)
    with pytest.raises(PoolExhausted, match="largest free range is 1,024 bytes"):
        pool.acquire((1 << 40, 1 << 40), np.float64)


def test_double_release_raises():
    pool = MemoryPool(1024)
    a = pool.acquire(10, np.float32)
    pool.release(a)
    with pytest.raises(ValueError, match="already released"):
        pool.release(a)
    assert pool.stats()["in_use"] == 0


def test_stale_array_is_refused_after_its_memory_is_reused():
    pool = MemoryPool(1024)
    a = pool.acquire(10, np.float32)
    pool.release(a)
    b = pool.acquire(10, np.float32)
    assert address(b) == address(a) and b.nbytes == a.nbytes
    with pytest.raises(ValueError, match="not a live array"):
        pool.release(a)
    assert pool.stats()["live"] == 1  # b was not released by mistake
    pool.release(b)
    assert pool.stats()["live"] == 0


def test_views_of_a_live_array_are_refused():
    pool = MemoryPool(1024)
    a = pool.acquire((4, 8), np.float32)
    for view in (a[1:], a[:2], a[:], a.reshape(-1), a.view(np.uint8), a.T):
        with pytest.raises(ValueError, match="exact object acquire"):
            pool.release(view)
    assert pool.stats()["live"] == 1
    pool.release(a)


def test_foreign_arrays_are_refused():
    pool = MemoryPool(1024)
    other = MemoryPool(1024)
    theirs = other.acquire(16, np.float32)
    for foreign in (np.zeros(16, np.float32), theirs, np.zeros(0)):
        with pytest.raises(ValueError, match="did not come from this pool"):
            pool.release(foreign)
    with pytest.raises(TypeError, match="got list"):
        pool.release([1, 2, 3])
    other.release(theirs)


@pytest.mark.parametrize("nbytes", [0, -64])
def test_bad_capacity_values(nbytes):
    with pytest.raises(ValueError, match=f"nbytes must be >= 1, got {nbytes}"):
        MemoryPool(nbytes)


@pytest.mark.parametrize("nbytes", [1.5, "1024", None, True], ids=repr)
def test_bad_capacity_types(nbytes):
    with pytest.raises(TypeError, match="nbytes must be an integer"):
        MemoryPool(nbytes)


@pytest.mark.parametrize("shape", [(2.0,), 3.5, "4", None, (True, 2), [[2]]], ids=repr)
def test_bad_shape_types(shape):
    with pytest.raises(TypeError, match="shape must be an int or a tuple of ints"):
        MemoryPool(1024).acquire(shape, np.float32)


def test_negative_shape():
    with pytest.raises(ValueError, match=r"negative dimensions, got \(2, -1\)"):
        MemoryPool(1024).acquire((2, -1), np.float32)


@pytest.mark.parametrize("dtype", ["not-a-dtype", object, "S", [("a", "O")]], ids=repr)
def test_bad_dtypes(dtype):
    pool = MemoryPool(1024)
    with pytest.raises(TypeError, match="dtype must be"):
        pool.acquire(4, dtype)
    assert pool.stats()["live"] == 0


def test_repr():
    pool = MemoryPool(4096)
    pool.acquire(100, np.uint8)
    assert repr(pool) == (
        "MemoryPool(capacity=4,096, in_use=128, peak=128, live=1, largest_free=3,968)"
    )


# --- threads ---------------------------------------------------------------------------------


def test_threads_never_share_memory():
    """4 threads x 2000 operations: each array keeps its owner's pattern, none overlap."""
    pool = MemoryPool(64 * 1024)
    n_threads, n_ops, max_held = 4, 2000, 6
    tracker_lock = threading.Lock()
    live: dict[int, tuple[int, int]] = {}  # id(array) -> [start, end) in reserved bytes
    overlaps, errors, exhausted = [], [], [0]
    barrier = threading.Barrier(n_threads)

    def track(a: np.ndarray) -> None:
        start, end = address(a), address(a) + reserved(a)
        with tracker_lock:
            for other_start, other_end in live.values():
                if start < other_end and other_start < end:
                    overlaps.append(((start, end), (other_start, other_end)))
            live[id(a)] = (start, end)

    def worker(tid: int) -> None:
        rng = np.random.default_rng(1000 + tid)
        held: list[tuple[np.ndarray, np.uint32]] = []
        try:
            barrier.wait()
            for op in range(n_ops):
                if held and (len(held) == max_held or rng.random() < 0.45):
                    a, pattern = held.pop(int(rng.integers(len(held))))
                    if not np.all(a == pattern):
                        errors.append(f"thread {tid}: array overwritten before release")
                    with tracker_lock:
                        del live[id(a)]
                    pool.release(a)
                else:
                    try:
                        a = pool.acquire(int(rng.integers(0, 600)), np.uint32)
                    except PoolExhausted:
                        exhausted[0] += 1
                        continue
                    track(a)
                    pattern = np.uint32((tid << 24) | op)
                    a[...] = pattern
                    held.append((a, pattern))
            for a, pattern in held:
                if not np.all(a == pattern):
                    errors.append(f"thread {tid}: array overwritten before release")
                with tracker_lock:
                    del live[id(a)]
                pool.release(a)
        except Exception as error:  # reported below
            errors.append(f"thread {tid}: {error!r}")

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so races would show
    try:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert errors == []
    assert overlaps == []
    stats = pool.stats()
    assert stats["in_use"] == 0 and stats["live"] == 0
    assert stats["largest_free"] == pool.capacity and stats["free_blocks"] == 1
    assert 0 < stats["peak"] <= pool.capacity


# --- model -----------------------------------------------------------------------------------


def gaps(base: int, capacity: int, live: list[np.ndarray]) -> list[tuple[int, int]]:
    """Free ranges (offset, size) implied by the live arrays; asserts they do not overlap."""
    spans = sorted((address(a) - base, reserved(a)) for a in live)
    result, at = [], 0
    for offset, size in spans:
        assert offset >= at, "live arrays overlap"
        if offset > at:
            result.append((at, offset - at))
        at = offset + size
    assert at <= capacity
    if at < capacity:
        result.append((at, capacity - at))
    return result


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(0, 700), st.sampled_from(["u1", "f4", "f8"])),
        st.tuples(st.just("release"), st.integers(0, 1000), st.none()),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_random_sequences_match_a_model(ops):
    """The free ranges are the gaps between live arrays, placement is first-fit, and the
    counts are the model's."""
    pool = MemoryPool(2048)
    first = pool.acquire(0, np.uint8)  # first fit in an empty pool: the buffer's start
    base = address(first)
    live, peak = [first], 64
    for kind, n, dtype in ops:
        if kind == "acquire":
            itemsize = np.dtype(dtype).itemsize
            need = max(-(-n * itemsize // 64) * 64, 64)
            fits = [offset for offset, size in gaps(base, 2048, live) if size >= need]
            if fits:
                a = pool.acquire(n, dtype)
                assert address(a) - base == fits[0]
                assert address(a) % 64 == 0 and a.shape == (n,)
                live.append(a)
            else:
                with pytest.raises(PoolExhausted):
                    pool.acquire(n, dtype)
        elif live:
            pool.release(live.pop(n % len(live)))
        in_use = sum(reserved(a) for a in live)
        peak = max(peak, in_use)
        free = gaps(base, 2048, live)
        assert pool.stats() == {
            "capacity": 2048,
            "in_use": in_use,
            "peak": peak,
            "live": len(live),
            "largest_free": max((size for _, size in free), default=0),
            "free_blocks": len(free),
        }
    for a in live:
        pool.release(a)
    assert pool.stats()["in_use"] == 0 and pool.stats()["free_blocks"] == 1
