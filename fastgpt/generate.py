"""``fastgpt generate``: sample text from a checkpoint written by ``fastgpt train`` (byte-level models)."""

import argparse
import json
from pathlib import Path
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="path to a ckpt.pt written by fastgpt train")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--json", metavar="PATH", help="also write {prompt, text, tokens} as JSON to PATH ('-' for stdout only)")


def generate_text(ckpt_path: str, prompt: str, max_new_tokens: int, temperature: float, top_k, seed: int, device=None) -> dict:
    """Load the checkpoint's model and continue ``prompt``; returns {"prompt", "text", "tokens"}."""
    import torch

    from fastgpt.model import GPT, GPTConfig
    from fastgpt.train import TrainError, load_checkpoint

    if max_new_tokens < 1:
        raise TrainError(f"--max-new-tokens must be at least 1; got {max_new_tokens}")
    if temperature <= 0:
        raise TrainError(f"--temperature must be positive; got {temperature}")
    ckpt = load_checkpoint(Path(ckpt_path))
    config = GPTConfig(**ckpt["model_config"])
    if config.vocab_size != 256:
        raise TrainError(
            f"{ckpt_path} has a {config.vocab_size}-token vocabulary; fastgpt generate decodes byte-level (256) models only"
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
    from fastgpt.train import TrainError

    try:
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
