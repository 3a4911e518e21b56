"""Numba's on-disk cache, keyed on every kernel source file, not only the one a kernel is in.

Numba stamps a cached kernel with its own file's contents. The attention kernel inlines
helpers from ``_tiles.py``, ``_unpack.py``, ``_simd.py`` and ``_floatbits.py``, so an edit to
one of those alone (a ``git pull``, a patch) would leave the old machine code in the cache.
The locators here stamp each kernel with a hash of every ``.py`` file in ``kvq/kernels``:
any change there recompiles every kernel once.

They wrap Numba's own locators (user-provided directory, in-tree ``__pycache__``, user-wide)
and claim only files in this folder. ``install()`` puts them first in Numba's list; it must
run before any kernel module is imported: importing this module runs it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from numba.core import caching

KERNELS = Path(__file__).resolve().parent


def source_stamp(folder: Path = KERNELS) -> str:
    """SHA-256 of every ``.py`` file in ``folder`` (names and contents, sorted by name)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class _KernelsStamp:
    """Mixin: claim only kernels defined in ``kvq/kernels``; stamp them with the folder."""

    @classmethod
    def from_function(cls, py_func, py_file):
        if Path(py_file).resolve().parent != KERNELS:
            return None
        return super().from_function(py_func, py_file)

    def get_source_stamp(self):
        # Hashing the folder costs about 1 ms; a process looks it up once per kernel file,
        # keyed (like Numba's own stamp) on each file's mtime and size.
        return _folder_stamp(_folder_key())


def _folder_key() -> tuple:
    return tuple(
        (path.name, path.stat().st_mtime_ns, path.stat().st_size)
        for path in sorted(KERNELS.glob("*.py"))
    )


_STAMPS: dict[tuple, str] = {}


def _folder_stamp(key: tuple) -> str:
    if key not in _STAMPS:
        _STAMPS[key] = source_stamp()
    return _STAMPS[key]


def _stamped(base: type) -> type:
    return type(f"Kernels{base.__name__}", (_KernelsStamp, base), {})


def install() -> None:
    """Put the stamped locators first in Numba's list, once. A Numba without these private
    names keeps its own behaviour."""
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    classes = getattr(impl, "_locator_classes", None)
    if classes is None or any(issubclass(c, _KernelsStamp) for c in classes):
        return
    names = ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")
    bases = [getattr(caching, name, None) or getattr(caching, "_" + name, None) for name in names]
    if all(base is not None for base in bases):
        impl._locator_classes = [_stamped(base) for base in bases] + list(classes)


__all__ = ["install", "source_stamp"]

install()
