"""lorapipe: a DVC pipeline that fine-tunes LLMs with LoRA on MLX."""
