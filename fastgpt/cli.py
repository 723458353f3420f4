"""The ``fastgpt`` console script: ``fastgpt info | bench | inspect | train | generate``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``main(args) -> int``; this file only routes to them (and imports only the one that runs).
"""

import argparse
import importlib
import sys
from typing import List, Optional

SUBCOMMANDS = {
    "info": ("fastgpt.info", "versions, devices, the CUDA toolchain and the backend of each op"),
    "bench": ("fastgpt.tools.bench.cli", "parity check and benchmarks of every op available here"),
    "inspect": ("fastgpt.tools.inspect.report", "compile the kernels for sm_80/sm_90 and read their machine code"),
    "train": ("fastgpt.app.train", "train a small GPT on a text corpus (default: Python's own sources)"),
    "generate": ("fastgpt.app.generate", "sample text from a checkpoint written by `fastgpt train`"),
}


def build_parser() -> argparse.ArgumentParser:
    from fastgpt import __version__

    parser = argparse.ArgumentParser(prog="fastgpt", description="fastgpt: fast GPT kernels for PyTorch")
    parser.add_argument("--version", action="version", version=f"fastgpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            p.set_defaults(_missing=True)
            continue
        module.add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        print(f"fastgpt {args.command}: not available in this version of fastgpt", file=sys.stderr)
        return 2
    module = importlib.import_module(args._module)
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
