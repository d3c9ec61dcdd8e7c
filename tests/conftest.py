import os

# Tests run on CPU; DeepSpeed must not look for CUDA on a machine without it.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Triton decides between compiled and interpreted kernels when @triton.jit runs, i.e. when facekd.kernels
# is first imported, which any test module may do: switch the CPU interpreter on before collection.
os.environ.setdefault("TRITON_INTERPRET", "1")
