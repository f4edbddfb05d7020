"""Triton kernels, shipped as ``qwenrl.kernels``."""
