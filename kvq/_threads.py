"""Numba's threading layer for kvq: prefer a thread-safe one, else serialise kernel launches.

Numba picks its threading layer at the first parallel call. ``omp`` and ``tbb`` accept
parallel kernels launched from several Python threads at once; ``workqueue`` (Numba's last
resort when neither loads, or when asked for by name) aborts the whole process on a
concurrent launch. At import, before any kvq kernel runs, this module:

- asks Numba for ``'threadsafe'`` (tbb, then omp) when the layer is left at ``'default'`` and
  one of those loads; a layer chosen by name (``NUMBA_THREADING_LAYER``) is left alone;
- sets :data:`SERIALISE` when the layer Numba uses, or will use, is ``workqueue``; then
  :func:`serialised` wraps each kvq kernel so that one runs at a time, under
  :data:`KERNEL_LOCK`. Otherwise kernels are called directly, at no cost.

Only kvq's own launches are serialised: other ``parallel=True`` code run concurrently with
kvq under ``workqueue`` can still abort the process.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable

import numba
from numba.np.ufunc import parallel as _parallel

SAFE_LAYERS = ("tbb", "omp")
_MODULES = {"tbb": "tbbpool", "omp": "omppool", "workqueue": "workqueue"}
# what Numba tries, in order, for each purpose setting (as numba.np.ufunc.parallel does; GNU
# OpenMP, used on Linux, is not fork-safe)
_PURPOSES = {
    "safe": ("tbb",),
    "threadsafe": ("tbb", "omp"),
    "forksafe": ("tbb", "workqueue")
    if sys.platform.startswith("linux")
    else ("tbb", "omp", "workqueue"),
}

KERNEL_LOCK = threading.Lock()


def loads(layer: str) -> bool:
    """Whether Numba's ``layer`` backend ('tbb', 'omp' or 'workqueue') can be loaded here."""
    try:
        tbb_check = getattr(_parallel, "_check_tbb_version_compatible", None)
        if layer == "tbb" and tbb_check is not None:
            tbb_check()  # Numba refuses a TBB too old for it, as here
        importlib.import_module(f"numba.np.ufunc.{_MODULES[layer]}")
    except (ImportError, OSError):
        return False
    return True


def choose(
    requested: str, priority: tuple[str, ...], loadable: Callable[[str], bool]
) -> tuple[str, str | None]:
    """(setting to give Numba, layer it will then load) for a ``requested`` setting.

    'default' becomes 'threadsafe' when a thread-safe layer loads; any other setting is kept.
    The layer is None when nothing matching loads (Numba then raises at the first call).
    """
    requested = str(requested).lower()
    if requested == "default" and any(loadable(layer) for layer in SAFE_LAYERS):
        requested = "threadsafe"
    if requested == "default":
        candidates = tuple(priority)
    elif requested in _PURPOSES:
        candidates = _PURPOSES[requested]
    else:
        candidates = (requested,)
    layer = next((c for c in candidates if c in _MODULES and loadable(c)), None)
    return requested, layer


def configure() -> str | None:
    """Set Numba's threading layer as described above; return the layer in use or expected."""
    if getattr(_parallel, "_is_initialized", False):  # a parallel call ran: the layer is fixed
        return numba.threading_layer()
    setting, layer = choose(
        numba.config.THREADING_LAYER, tuple(numba.config.THREADING_LAYER_PRIORITY), loads
    )
    numba.config.THREADING_LAYER = setting
    return layer


LAYER: str | None = configure()
SERIALISE: bool = LAYER == "workqueue"


class SerialisedKernel:
    """A kernel that runs under :data:`KERNEL_LOCK`; other attributes come from the kernel."""

    __slots__ = ("kernel",)

    def __init__(self, kernel: Callable) -> None:
        self.kernel = kernel

    def __call__(self, *args):
        with KERNEL_LOCK:
            return self.kernel(*args)

    def __getattr__(self, name: str):
        return getattr(self.kernel, name)

    def __repr__(self) -> str:
        return f"SerialisedKernel({self.kernel!r})"


_thread_count: tuple[Callable, Callable] | None = None


def _thread_count_functions() -> tuple[Callable, Callable]:
    """(get, set) of the calling thread's Numba thread count: the ctypes functions that
    ``numba.get_num_threads``/``set_num_threads`` wrap (about 0.5 us each, against 2.5 us for
    the checked public ones), or the public ones when this Numba lacks them."""
    global _thread_count
    if _thread_count is None:
        numba.get_num_threads()  # launches Numba's threads (the layer configured above)
        get = getattr(_parallel, "_get_num_threads", None)
        set_ = getattr(_parallel, "_set_num_threads", None)
        if callable(get) and callable(set_) and get() == numba.get_num_threads():
            _thread_count = (get, set_)
        else:  # pragma: no cover - other Numba versions
            _thread_count = (numba.get_num_threads, numba.set_num_threads)
    return _thread_count


def on_calling_thread(function: Callable, *args):
    """``function(*args)`` with kvq's parallel kernels confined to the calling thread.

    For small work (a decode step's few hundred values): a parallel launch must wait for
    every worker thread to be scheduled, and on a loaded machine that can take a scheduler
    time slice (milliseconds) for microseconds of work. Numba's thread count is per Python
    thread, so other threads are unaffected; the caller's count is restored afterwards.
    """
    get, set_ = _thread_count_functions()
    previous = get()
    if previous == 1:
        return function(*args)
    set_(1)
    try:
        return function(*args)
    finally:
        set_(previous)


def serialised(kernel: Callable, force: bool = False) -> Callable:
    """``kernel`` itself, or wrapped to hold :data:`KERNEL_LOCK` when launches must be
    serialised (:data:`SERIALISE`, or ``force``)."""
    return SerialisedKernel(kernel) if SERIALISE or force else kernel
