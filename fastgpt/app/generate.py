"""``fastgpt generate``: sample text from a checkpoint written by ``fastgpt train`` (byte-level models)."""

import argparse
import json
import math
import sys
from pathlib import Path

from fastgpt.app.common import (
    backend_notice, brief_errors, check_device, device_name, fallback_notices, positive_float, positive_int, seed_int, writable_json_path,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    brief_errors(p)
    p.add_argument("--ckpt", required=True, help="path to a ckpt.pt written by fastgpt train")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=positive_int, default=200)
    p.add_argument("--temperature", type=positive_float, default=0.8)
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--seed", type=seed_int, default=1337)
    p.add_argument("--device", type=device_name, default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--json", metavar="PATH", type=writable_json_path,
        help="also write {prompt, text, tokens} as JSON to PATH ('-' for stdout only)",
    )


def generate_text(ckpt_path: str, prompt: str, max_new_tokens: int, temperature: float, top_k, seed: int, device=None) -> dict:
    """Load the checkpoint's model and continue ``prompt``; returns {"prompt", "text", "tokens"}."""
    import torch

    from fastgpt.model import GPT
    from fastgpt.app.train import TrainError, load_checkpoint, model_config

    if max_new_tokens < 1:
        raise TrainError(f"--max-new-tokens must be at least 1; got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise TrainError(f"--temperature must be a finite number > 0; got {temperature}")
    if top_k is not None and top_k < 1:
        raise TrainError(f"--top-k must be at least 1; got {top_k}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    problem = check_device(dev)
    if problem:
        raise TrainError(problem)
    ckpt = load_checkpoint(Path(ckpt_path))
    config = model_config(ckpt["model_config"], Path(ckpt_path))  # the architecture it was trained with
    if config.vocab_size != 256:
        raise TrainError(
            f"{ckpt_path} has a {config.vocab_size}-token vocabulary; fastgpt generate decodes byte-level (256) models only"
        )
    model = GPT(config)
    model.load_state_dict(ckpt["model"])
    model.to(dev).eval()
    ids = list(prompt.encode("utf-8")) or [10]
    idx = torch.tensor([ids], dtype=torch.long, device=dev)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)
    new = out[0, len(ids) :].tolist()
    return {"prompt": prompt, "text": bytes(new).decode("utf-8", errors="replace"), "tokens": len(new)}


def main(args: argparse.Namespace) -> int:
    from fastgpt.app.train import TrainError

    import torch

    notice = backend_notice(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if notice:
        print(f"fastgpt generate: {notice}", file=sys.stderr)
    try:
        with fallback_notices("fastgpt generate", header_said_it=notice is not None):
            result = generate_text(args.ckpt, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, args.device)
    except TrainError as exc:
        print(f"fastgpt generate: error: {exc}", file=sys.stderr)
        return 2
    if args.json == "-":
        json.dump(result, sys.stdout)
        print()
        return 0
    sys.stdout.write(result["prompt"] + result["text"] + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f)
    return 0
