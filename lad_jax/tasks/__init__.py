"""Built-in experiment tasks (data generation, tokenizer, reward, supervised warm-start)."""
