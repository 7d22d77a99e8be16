"""Architecture fields of the published `config.json` files the recipes start from (`init_from`), so the memory
plan (`lad_jax.plan`) and the recipe tests run offline, with no download. Values copied from each hub repo's
config.json; `ModelConfig.from_hf_config` reads them exactly like a downloaded file."""
from __future__ import annotations

_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rms_norm_eps": 1e-6, "hidden_act": "silu",
          "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151643}

HF_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen2.5-Math-1.5B": {**_QWEN2, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                               "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                               "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-0.5B-Instruct": {**_QWEN2, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                                   "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                                   "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                                   "tie_word_embeddings": True, "eos_token_id": 151645},
    "Qwen/Qwen2.5-1.5B-Instruct": {**_QWEN2, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                                   "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                                   "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                                   "tie_word_embeddings": True, "eos_token_id": 151645},
    "Qwen/Qwen2.5-7B": {**_QWEN2, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                        "max_position_embeddings": 131072, "rope_theta": 1000000.0, "tie_word_embeddings": False},
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": {
        **_QWEN2, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "max_position_embeddings": 131072, "rope_theta": 10000.0, "tie_word_embeddings": False},
}


def known_hf_config(name: str) -> dict | None:
    """A copy of the built-in config.json dict for hub id `name`, or None."""
    hf = HF_CONFIGS.get(name)
    return None if hf is None else dict(hf)
