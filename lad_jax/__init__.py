"""lad_jax: RL post-training of LLM reasoners with LAD (Learning Advantage Distribution) in JAX/Flax."""

__version__ = "0.1.0"
