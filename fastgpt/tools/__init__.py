"""Tools built on the fastgpt library: ``bench`` (benchmarks, timing and the roofline model), ``inspect``
(the static machine-code report) and ``cuda_emu`` (the CPU emulator of the CUDA kernels).

The library (everything in ``fastgpt`` outside this package) never imports a tool.
"""
