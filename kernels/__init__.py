"""Kernels for the work that grows with the number of identities, and CondFace's dynamic group
convolution (imported as ``facekd.kernels``).

Every kernel lives beside a plain-torch reference of the same maths; ``FACEKD_KERNEL_BACKEND``
(see :mod:`facekd.kernels.backend`) chooses between them.
"""
from facekd.kernels.backend import requested_backend, use_triton
from facekd.kernels.dyn_group_conv import dyn_group_conv2d
from facekd.kernels.grouped_kd import grouped_kd_loss
from facekd.kernels.margin_ce import margin_softmax_ce

__all__ = ["dyn_group_conv2d", "grouped_kd_loss", "margin_softmax_ce", "requested_backend", "use_triton"]
