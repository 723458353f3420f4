"""``fastgpt info``: versions, devices, the CUDA toolchain and the backend of every op, and why."""

import argparse
import importlib.metadata
import json
import platform
import sys
from typing import Any, Dict


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> Dict[str, Any]:
    """Everything `fastgpt info` reports, as plain data."""
    import torch

    import fastgpt
    from fastgpt import backends, cuda_ext

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(
                {
                    "index": i,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "sms": props.multi_processor_count,
                }
            )
    cuda_ok, cuda_reason = cuda_ext.status()
    return {
        "fastgpt": fastgpt.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda_available": torch.cuda.is_available(),
        "devices": devices,
        "toolchain": backends.tool_status(),
        "triton_interpret": backends.triton_interpreter_enabled(),
        "cuda_extension": {"available": cuda_ok, "reason": cuda_reason},
        "requested_backend": backends.requested_backend(),
        "strict": backends.strict_mode(),
        "ops": backends.explain(as_dict=True),
    }


def format_text(info: Dict[str, Any]) -> str:
    from fastgpt import backends

    lines = [
        f"fastgpt {info['fastgpt']}  python {info['python']}  torch {info['torch']} (CUDA {info['torch_cuda']})"
        f"  triton {info['triton']}  transformers {info['transformers']}",
        f"platform: {info['platform']}",
    ]
    if info["devices"]:
        for d in info["devices"]:
            lines.append(f"device {d['index']}: {d['name']} (sm_{d['capability'].replace('.', '')}, {d['memory_gib']} GiB, {d['sms']} SMs)")
    else:
        lines.append("device: none (torch.cuda.is_available() is False); GPU kernels cannot run here")
    tools = info["toolchain"]
    lines.append(
        f"nvcc: {tools['nvcc'] or 'not on PATH'}   CUDA_HOME: {tools['CUDA_HOME'] or 'not set'}   "
        f"CUDA toolkit for the extension: {tools['toolkit'] or 'not found'}"
    )
    ext = info["cuda_extension"]
    lines.append(f"cuda extension: {'available' if ext['available'] else 'unavailable'} ({ext['reason']})")
    lines.append(f"TRITON_INTERPRET: {'on' if info['triton_interpret'] else 'off'}")
    lines.append(f"backends (requested: {info['requested_backend']}, strict: {'on' if info['strict'] else 'off'}):")
    lines += backends.format_plan(info["ops"])
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH ('-' for stdout only)")


def main(args: argparse.Namespace) -> int:
    from fastgpt import backends

    try:
        backends.check_env()
    except ValueError as exc:
        print(f"fastgpt info: {exc}", file=sys.stderr)
        return 2
    info = collect()
    if args.json == "-":
        json.dump(info, sys.stdout, indent=2)
        print()
        return 0
    print(format_text(info))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
    return 0
