"""The training and generation application built on the fastgpt library: ``fastgpt train``
(:mod:`fastgpt.app.train`, with its data, checkpoint, argument and FSDP modules) and ``fastgpt generate``
(:mod:`fastgpt.app.generate`). The library never imports it."""
