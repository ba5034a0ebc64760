"""Nova Embeddings V1: the tooling around the model repository (tiny checkpoint, loading, conversion,
training and evaluation). The model itself is the remote code at the repository root."""

__version__ = "1.0.0"
