"""Fuzzing kvq.load_safetensors: every input gives a result or kvq.LoaderError, nothing else.

Inputs (strategies in ``tests/robustness/loader_fuzz.py``): random bytes; correctly framed
headers of random JSON; valid files with hostile header edits (wrong dtypes, offsets out of
range, overlapping or reversed, shapes whose product overflows, huge numbers, non-ASCII and
surrogate names, repeated keys, deep nesting, junk metadata, mismatched MXFP4 pairs) and byte
mutations (bit flips, truncation, header length field, inserted/deleted bytes); and sharded
directories (index naming missing or escaping shards, tensors in the wrong or in two shards,
junk or truncated index JSON). Each input is written to a temporary directory, opened, listed,
described and read tensor by tensor, with tracemalloc checking that no more is allocated than
4 MiB plus 64 bytes per byte on disk. Any other exception, or a crash, fails the test; so does
a tensor whose shape differs from its ``info()``, or whose bytes differ from what the
safetensors package reads from the same file (for the files and dtypes it reads).

Time budget: ``KVQ_FUZZ_SECONDS`` seconds for the four fuzz tests together (default 30 when
``CI=true``, else 10), shared 10/20/45/25 %. Each test runs Hypothesis in batches of 50
examples until its share is spent (at least one batch); the batches' seeds follow from
``KVQ_FUZZ_SEED`` (random unless set; a failure names it, and Hypothesis prints the shrunk
input). For longer runs by hand: ``python bench/fuzz_loader.py --seconds 600``.

The size-limit tests at the end check that a header claiming 100 GB tensors, a header length
of 2**63 and empty tensors with huge dimensions allocate nothing of the sort (tracemalloc peak,
peak RSS, and a child process under an address-space limit).
"""

import os
import random
import resource
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import kvq
from tests.robustness import loader_fuzz
from tests.safetensors_files import write_raw

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SECONDS = float(os.environ.get("KVQ_FUZZ_SECONDS", 30 if IN_CI else 10))
SEED = int(os.environ.get("KVQ_FUZZ_SEED", random.randrange(2**32)))
SHARES = loader_fuzz.SHARES


@pytest.mark.parametrize("kind", list(SHARES))
def test_fuzz(kind):
    base = SEED + 1_000_003 * list(SHARES).index(kind)
    try:
        report = loader_fuzz.fuzz(kind, SECONDS * SHARES[kind], base)
    except Exception as error:
        error.add_note(f"replay with KVQ_FUZZ_SEED={SEED} (this test's batches from {base})")
        raise
    assert report.tried >= loader_fuzz.BATCH  # the run did run
    assert not report.failures
    if kind in ("mutated_file", "sharded"):
        # the strategies must reach past the header checks, not only be refused
        assert report.outcomes.get("loaded", 0) > 0, report.outcomes


def test_exercise_reads_a_valid_file_and_counts_it_loaded(tmp_path):
    """The harness itself: a valid case loads, and a broken one is 'refused'."""
    header, data = loader_fuzz.layout(
        [
            loader_fuzz.Tensor("a", "F32", [2], struct.pack("<2f", 1.0, 2.0)),
            loader_fuzz.Tensor("m_blocks", "U8", [1, 16], bytes(range(16))),
            loader_fuzz.Tensor("m_scales", "U8", [1], bytes([127])),
        ]
    )
    good = loader_fuzz.Case({"x.safetensors": loader_fuzz.encode(header) + data}, "x.safetensors")
    assert loader_fuzz.check_case(good, tmp_path / "good") == "loaded"
    broken = loader_fuzz.Case({"x.safetensors": b"\x00" * 3}, "x.safetensors")
    assert loader_fuzz.check_case(broken, tmp_path / "broken") == "refused"


def test_harness_compares_bytes_with_the_safetensors_package(tmp_path, monkeypatch):
    """Tensors the safetensors package also reads are compared byte for byte: the same file
    passes, and a reference that differs in one value is reported."""
    header, data = loader_fuzz.layout(
        [loader_fuzz.Tensor("a", "F32", [2], struct.pack("<2f", 1.0, 2.0))]
    )
    case = loader_fuzz.Case({"x.safetensors": loader_fuzz.encode(header) + data}, "x.safetensors")
    path = loader_fuzz.write_case(case, tmp_path / "same")
    assert set(loader_fuzz.reference_tensors(path)) == {"a"}
    assert loader_fuzz.exercise(path) == "loaded"
    monkeypatch.setattr(
        loader_fuzz, "reference_tensors", lambda path: {"a": np.array([1.0, 3.0], np.float32)}
    )
    with pytest.raises(loader_fuzz.Unexpected, match="different bytes"):
        loader_fuzz.exercise(path)


def test_harness_reports_an_escaping_exception(tmp_path, monkeypatch):
    """A loader that lets anything but LoaderError out must fail the run (the fuzzer can fail)."""

    def broken_loader(path):
        raise TypeError("not a LoaderError")

    monkeypatch.setattr(kvq, "load_safetensors", broken_loader)
    report = loader_fuzz.fuzz("random_bytes", 0, SEED, stop_on_failure=False)
    assert report.failures and "TypeError" in report.failures[0]


# --- size limits ------------------------------------------------------------------------------

HUGE = 100 * 2**30  # 100 GB


def hostile_files(directory: Path) -> list[Path]:
    """Files whose headers claim far more than they hold."""
    directory.mkdir(exist_ok=True)
    files = [
        write_raw(
            directory / "f32_100gb.safetensors",
            {"t": {"dtype": "F32", "shape": [HUGE // 4], "data_offsets": [0, HUGE]}},
            bytes(64),
        ),
        write_raw(
            directory / "bf16_100gb.safetensors",
            {"t": {"dtype": "BF16", "shape": [2**20, HUGE // 2**21], "data_offsets": [0, HUGE]}},
        ),
        write_raw(
            directory / "mxfp4_100gb.safetensors",
            {
                "w_blocks": {"dtype": "U8", "shape": [HUGE // 16, 16], "data_offsets": [0, HUGE]},
                "w_scales": {
                    "dtype": "U8",
                    "shape": [HUGE // 16],
                    "data_offsets": [HUGE, HUGE + HUGE // 16],
                },
            },
        ),
        write_raw(
            directory / "empty_huge_dims.safetensors",
            {"t": {"dtype": "F64", "shape": [0, 2**40, 2**8], "data_offsets": [0, 0]}},
        ),
        write_raw(
            directory / "empty_absurd_dims.safetensors",
            {"t": {"dtype": "F64", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}},
        ),
    ]
    for length in (2**63, 2**64 - 1, HUGE):
        path = directory / f"length_{length}.safetensors"
        path.write_bytes(struct.pack("<Q", length) + b'{"a": 1}')
        files.append(path)
    return files


def open_and_read_all(path: Path) -> str:
    try:
        ckpt = kvq.load_safetensors(path)
        for name in ckpt:
            ckpt[name]
    except kvq.LoaderError:
        return "refused"
    return "loaded"


def test_huge_claims_allocate_nothing(tmp_path):
    files = hostile_files(tmp_path)
    outcomes = {}
    for path in files:  # warm: imports, kernels
        open_and_read_all(path)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for path in files:
        tracemalloc.start()
        try:
            outcomes[path.name] = open_and_read_all(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2**20, (path.name, peak)
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert rss_growth < 32 * 1024  # KiB
    assert outcomes.pop("empty_huge_dims.safetensors") == "loaded"
    assert set(outcomes.values()) == {"refused"}


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS semantics are Linux's")
def test_huge_claims_under_an_address_space_limit(tmp_path):
    """In a child whose address space may grow by only 256 MB, every hostile file is refused
    (or loads empty) with LoaderError: an attempt to reserve 100 GB, even lazily, would raise
    MemoryError there instead."""
    files = hostile_files(tmp_path)
    script = textwrap.dedent(
        f"""
        import resource, sys
        import kvq
        from tests.robustness.test_fuzz_loader import open_and_read_all
        paths = {[str(p) for p in files]!r}
        for p in paths:  # warm up before the limit: Numba loads its cached kernels
            open_and_read_all(p)
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + 256 * 2**20, resource.RLIM_INFINITY))
        for p in paths:
            print(p.rsplit("/", 1)[1], open_and_read_all(p))
        """
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NUMBA_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split() for line in done.stdout.splitlines())
    assert len(lines) == len(files)
    assert lines.pop("empty_huge_dims.safetensors") == "loaded"
    assert set(lines.values()) == {"refused"}, lines
