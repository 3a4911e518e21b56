"""kvq: JIT-compiled quantization of transformer key/value caches.

Public names are re-exported here; see the README for a tour.
"""

from kvq.blocks import QuantizedBlocks
from kvq.cache import QuantizedKVCache

__version__ = "0.1.0"

__all__ = ["QuantizedBlocks", "QuantizedKVCache", "__version__"]
