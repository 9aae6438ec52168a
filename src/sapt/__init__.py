"""SAPT: shared attentive parameter-efficient continual learning on stock HuggingFace models."""

__all__ = ["SaptConfig", "SaptModel", "load_checkpoint"]


def __getattr__(name):
    # Imported on first use, so light commands (generators, data preparation) do not load torch.
    if name == "load_checkpoint":
        from .checkpoint import load_checkpoint

        return load_checkpoint
    if name == "SaptConfig":
        from .config import SaptConfig

        return SaptConfig
    if name == "SaptModel":
        from .model import SaptModel

        return SaptModel
    raise AttributeError(f"module 'sapt' has no attribute {name!r}")
