"""Kernel tests run the Triton kernels in the CPU interpreter.

Triton picks interpreted or compiled kernels when ``@triton.jit`` decorates them, i.e. when
``facekd.kernels`` is first imported, so TRITON_INTERPRET must be set before that import: here,
when pytest enters tests/kernels/, and at the top of each kernel test module.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
