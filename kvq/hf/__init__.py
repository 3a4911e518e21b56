"""kvq inside Hugging Face transformers: the KVQCache and the "kvq" attention.

``import kvq.hf`` registers the attention function and its mask function with transformers
under the name ``"kvq"``, so ``from_pretrained(..., attn_implementation="kvq")`` or
``model.set_attn_implementation("kvq")`` selects them; then
``model.generate(**inputs, past_key_values=kvq.hf.KVQCache(model, kvq.QuantConfig.q4()))``.
Needs the ``hf`` extra (torch, transformers, accelerate, gguf).
"""

try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"kvq.hf needs torch and transformers ({error}); install them with the 'hf' extra: "
        "pip install 'kvq-numba[hf]' (or '.[hf]' from a checkout)"
    ) from error

from kvq.hf.attention import kvq_attention, kvq_mask
from kvq.hf.cache import ATTN_IMPLEMENTATION, KVQCache, model_config_of
from kvq.hf.calibrate import calibrate  # the function, as evaluate below
from kvq.hf.channels import calibrate_channels
from kvq.hf.evaluate import evaluate  # the function; the module is sys.modules["kvq.hf.evaluate"]

AttentionInterface.register(ATTN_IMPLEMENTATION, kvq_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, kvq_mask)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "KVQCache",
    "calibrate",
    "calibrate_channels",
    "evaluate",
    "kvq_attention",
    "kvq_mask",
    "model_config_of",
]
