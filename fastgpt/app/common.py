"""Pieces shared by the ``fastgpt train`` and ``fastgpt generate`` commands: argparse types that reject
bad values with a one-line error naming the flag, the device check, and the backend notice of their header.
"""

import argparse
import contextlib
import math
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional


def brief_errors(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` report a bad flag in one line (argparse prints its whole usage first)."""

    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message} (--help lists the flags)\n")

    parser.error = error  # type: ignore[method-assign]


def int_at_least(low: int, below: Optional[int] = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer; got {text!r}") from None
        if value < low or (below is not None and value >= below):
            bound = f"at least {low}" + (f" and below {below}" if below is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}; got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """A finite float in the interval [low, high] (ends opened as asked): nan and inf never pass."""
    lo, hi = ("(" if low_open else "["), (")" if high_open or math.isinf(high) else "]")
    interval = f"{lo}{low:g}, {high:g}{hi}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}; got {text}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


positive_int = int_at_least(1)
positive_float = float_in(0.0, low_open=True)
seed_int = int_at_least(0, 2**63)  # torch.manual_seed's range, with room for seed + rank


def device_name(text: str) -> str:
    """A device torch can parse (cpu, cuda, cuda:1, ...); whether it exists is checked by :func:`check_device`."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:1, ...)") from None
    return text


def check_device(device, flag: str = "--device") -> Optional[str]:
    """Why ``device`` cannot be used here (None when it can): CUDA asked for without a CUDA device."""
    import torch

    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return f"{flag} {device}: no CUDA device is available here (torch.cuda.is_available() is False); use --device cpu"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def writable_json_path(text: str) -> str:
    """``-`` or a file path whose folder exists (checked before any work is done)."""
    if text != "-" and not Path(text).expanduser().resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder of {text!r} does not exist")
    return text


def backend_notice(device) -> Optional[str]:
    """One line for a command's header when fastgpt's ops on ``device`` run the plain-torch reference."""
    from fastgpt import backends

    plan = backends.explain(as_dict=True, device=device)
    reference = [op for op, row in plan.items() if row["backend"] == "reference"]
    if not reference:
        return None
    which = "every op" if len(reference) == len(plan) else ", ".join(reference)
    reason = plan[reference[0]]["reason"]
    if device.type != "cuda" and backends.requested_backend() == "auto":
        reason = "fastgpt's GPU kernels need CUDA tensors"
    return f"{which} on {device} runs the plain-torch reference ({reason}); `fastgpt info` explains"


@contextlib.contextmanager
def fallback_notices(prog: str, header_said_it: bool, write: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """Inside the block, fastgpt's FallbackWarnings print as one clean line (``prog: note: ...``) through
    ``write`` (e.g. tqdm.write, so a progress bar stays intact), not as a raw Python warning; the
    once-per-process CPU notice is dropped when the header already said it."""
    from fastgpt.backends import FallbackWarning

    write = write or (lambda line: print(line, file=sys.stderr))
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, FallbackWarning):
            write(f"{prog}: note: {message}")
        else:
            previous(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        if header_said_it:
            warnings.filterwarnings("ignore", message="fastgpt: cpu tensors", category=FallbackWarning)
        warnings.showwarning = show
        yield
