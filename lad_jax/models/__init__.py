"""Policy models: NNX decoder (Qwen2/2.5, Qwen3, Llama 3), KV cache, HF I/O and chunked log-probs."""
from lad_jax.models.cache import CACHE_LOGICAL_AXES, init_cache
from lad_jax.models.config import ModelConfig, tiny_config
from lad_jax.models.hf_io import from_pretrained, load_config, save_pretrained
from lad_jax.models.logprobs import chunked_head_logprobs, logprobs_from_logits, token_logprobs
from lad_jax.models.transformer import Transformer, create_model

__all__ = [
    "CACHE_LOGICAL_AXES", "ModelConfig", "Transformer", "chunked_head_logprobs", "create_model", "from_pretrained",
    "init_cache", "load_config", "logprobs_from_logits", "save_pretrained", "tiny_config", "token_logprobs",
]
