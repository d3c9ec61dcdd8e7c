"""facekd: knowledge distillation of compact face-recognition networks at million-identity scale."""

__version__ = "0.1.0"
