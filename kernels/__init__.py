"""Kernels for the work that grows with the number of identities (imported as ``facekd.kernels``)."""
