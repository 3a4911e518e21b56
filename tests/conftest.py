import sys

import numba
import numpy as np
import pytest

import kvq.attention  # noqa: F401  (the module, for its SERIAL_WORK)


@pytest.fixture
def rng():
    return np.random.default_rng(20261129)


@pytest.fixture(params=["serial", 1, 2], ids=lambda t: f"threads-{t}")
def threads(request, monkeypatch):
    """kvq.attention on the calling thread (small calls), or in the parallel path at 1 or 2
    Numba threads, so that every split and partition path runs on any machine."""
    attention_module = sys.modules["kvq.attention"]
    if request.param == "serial":
        monkeypatch.setattr(attention_module, "SERIAL_WORK", 1 << 62)
        yield 1
        return
    if request.param > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"Numba has only {numba.config.NUMBA_NUM_THREADS} threads")
    monkeypatch.setattr(attention_module, "SERIAL_WORK", -1)
    before = numba.get_num_threads()
    numba.set_num_threads(request.param)
    yield request.param
    numba.set_num_threads(before)
