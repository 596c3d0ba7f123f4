"""Checkpoint import/export: Hugging Face safetensors, orbax."""
