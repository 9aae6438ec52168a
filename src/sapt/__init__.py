"""SAPT: shared attentive parameter-efficient continual learning on stock HuggingFace models."""
