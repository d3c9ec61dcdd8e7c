import os

# Tests run on CPU; DeepSpeed must not look for CUDA on a machine without it.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
