"""The dtypes the reference ops (and every kernel) compute and keep statistics in."""

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference (and every kernel) accumulates in for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of saved statistics (log-sum-exp, mean, rstd) for inputs of ``dtype``."""
    return compute_dtype(dtype)
