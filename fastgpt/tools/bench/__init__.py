"""``fastgpt bench`` and ``pytest benchmarks``: op cases, CPU dispatch cases, GPT steps, timers."""
