"""``python -m fastgpt.train`` and ``torchrun -m fastgpt.train``: the documented way to start the
training app, which lives in :mod:`fastgpt.app.train` (``fastgpt train`` and ``fastgpt-train`` run it too)."""

import sys

from fastgpt.app.train import cli_main

if __name__ == "__main__":
    sys.exit(cli_main())
