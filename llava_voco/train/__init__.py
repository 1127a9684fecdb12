"""Training like LLaVA (its flags, data format and templates), plus ``--voco_tokens``."""
