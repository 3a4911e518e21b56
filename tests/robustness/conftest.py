"""Fixtures shared by the robustness tests."""

import sys

import numba
import pytest


@pytest.fixture
def one_numba_thread():
    """Run kernels on the calling thread: these tests make thousands of calls on tiny arrays,
    and on a loaded machine each parallel launch waits milliseconds for its workers (25 s
    against 3 s for this directory on the 2-core development machine). The contracts tested
    here do not depend on the thread count; the kernels' own tests run them in parallel."""
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(previous)


def pytest_terminal_summary(terminalreporter):
    """Name the loader fuzz's seed after every run that imported it, failed or not, so any
    run can be replayed (KVQ_FUZZ_SEED=... KVQ_FUZZ_SECONDS=...)."""
    fuzz = sys.modules.get("tests.robustness.test_fuzz_loader")
    if fuzz is not None:
        terminalreporter.write_line(
            f"loader fuzz: KVQ_FUZZ_SEED={fuzz.SEED} KVQ_FUZZ_SECONDS={fuzz.SECONDS:g}"
        )
