"""Kernel benchmarks (``facekd bench …``): programs that write JSON, markdown tables and PNG charts.

Each benchmark module offers ``add_arguments(parser)`` and ``run(args)``; shared machinery
(device and peak, timing, memory, results files) is in :mod:`facekd.bench.common`.
"""
