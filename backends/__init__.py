"""Backends: MLX and PyTorch behind one small protocol (imported lazily, never by the core)."""
