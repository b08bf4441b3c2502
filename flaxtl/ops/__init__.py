"""Compute kernels and XLA:CPU tuning: how models run fast, apart from what.

`conv` holds the alternative 3x3 convolution forms (im2col, Winograd) and the
rule that picks one per layer shape; `cpu` the process and compiler settings.
Every threshold here was measured in `benchmarks/` (see benchmarks/README.md).
"""
