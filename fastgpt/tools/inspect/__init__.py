"""``fastgpt inspect``: the kernels' machine code for real GPUs, read without one."""
