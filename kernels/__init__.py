"""Triton kernels of fastgpt, installed as ``fastgpt.kernels``."""
