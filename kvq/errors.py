"""Exception classes shared by the package.

Each one derives from ``KvqError`` (catch everything kvq raises on purpose) and from the
built-in exception it refines, so ``except ValueError`` or ``except MemoryError`` still works.
"""


class KvqError(Exception):
    """Base class of the errors kvq raises on purpose."""


class DeviceError(KvqError, RuntimeError):
    """A device was asked for that this machine does not have (e.g. "gpu" without CUDA)."""


class PoolExhausted(KvqError, MemoryError):
    """A ``MemoryPool`` has no free range large enough for a request."""


class ConfigError(KvqError, ValueError):
    """A model configuration is missing a field, or holds a value of the wrong type or range."""


class LoaderError(KvqError, ValueError):
    """A weights file cannot be read: bad header, unknown dtype, or data out of bounds."""
