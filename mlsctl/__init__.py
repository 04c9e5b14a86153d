"""mlsctl: self-supervised and metric learning of vision transformers with memory banks."""

__version__ = "0.1.0"
