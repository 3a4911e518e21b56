"""kvq: JIT-compiled quantization of transformer key/value caches.

Public names are re-exported here; see the README for a tour.
"""

# _threads first: it sets Numba's threading layer before any kernel is compiled
from kvq import (  # kvq.testing, as np.testing
    _threads,  # noqa: F401
    formats,
    testing,
)
from kvq.allocation import allocate_channel_bits, channel_weights, value_channel_weights
from kvq.array import Array, devices
from kvq.attention import attention, attention_reference
from kvq.blocks import QuantizedBlocks
from kvq.cache import QuantizedKVCache
from kvq.config import ModelConfig
from kvq.errors import ConfigError, DeviceError, KvqError, LoaderError, PoolExhausted
from kvq.kvcache import CapacityError, KVCache
from kvq.layer_map import LayerMap
from kvq.loader import Checkpoint, load_safetensors
from kvq.model_cache import ModelKVCache
from kvq.plan import Plan, plan
from kvq.pool import MemoryPool
from kvq.rope import Rope
from kvq.scheme import QuantConfig, Scheme
from kvq.tensor import QuantizedTensor, quantize

__version__ = "0.1.0"

__all__ = [
    "Array",
    "CapacityError",
    "Checkpoint",
    "ConfigError",
    "DeviceError",
    "KVCache",
    "KvqError",
    "LayerMap",
    "LoaderError",
    "MemoryPool",
    "ModelConfig",
    "ModelKVCache",
    "Plan",
    "PoolExhausted",
    "QuantConfig",
    "QuantizedBlocks",
    "QuantizedKVCache",
    "QuantizedTensor",
    "Rope",
    "Scheme",
    "__version__",
    "allocate_channel_bits",
    "attention",
    "attention_reference",
    "channel_weights",
    "devices",
    "formats",
    "load_safetensors",
    "plan",
    "quantize",
    "testing",
    "value_channel_weights",
]
