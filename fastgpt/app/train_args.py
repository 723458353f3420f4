"""The flags of ``fastgpt train``: each with an argparse type that rejects a bad value in one line."""

import argparse

from fastgpt.app.common import brief_errors, device_name, float_in, int_at_least, positive_float, positive_int, seed_int
from fastgpt.app.train_data import TrainError

MODEL_FLAGS = ("arch", "n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "bias", "dropout")


def arch_name(text: str) -> str:
    """A named architecture of :data:`fastgpt.model.ARCHITECTURES`."""
    from fastgpt.model import ARCHITECTURES

    if text not in ARCHITECTURES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(ARCHITECTURES)}; got {text!r}")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    brief_errors(p)
    pos, nonneg = positive_int, int_at_least(0)
    p.add_argument("--data", help="text file, folder of text files, or nanoGPT uint16 .bin (default: Python's stdlib sources)")
    p.add_argument("--out-dir", default="out", help="where ckpt.pt and log.jsonl go (default: out)")
    p.add_argument(
        "--arch", type=arch_name, default="gpt2",
        help="gpt2: nanoGPT's (LayerNorm, learned positions, GELU MLP, tied embeddings); llama: RMSNorm, rotary "
        "positions, SwiGLU MLP, untied embeddings, trained with the fused linear cross-entropy (default: gpt2)",
    )
    p.add_argument("--n-layer", type=pos, default=4)
    p.add_argument("--n-head", type=pos, default=4)
    p.add_argument("--n-kv-head", type=pos, default=None, help="key/value heads: grouped-query attention (divides --n-head; default: --n-head)")
    p.add_argument("--n-embd", type=pos, default=128)
    p.add_argument("--block-size", type=pos, default=128)
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, default=False, help="biases in linear and layer norm layers")
    p.add_argument("--dropout", type=float_in(0.0, 1.0, high_open=True), default=0.0)
    p.add_argument("--vocab-size", type=pos, default=None, help="only for .bin data (default: from the data)")
    p.add_argument("--batch-size", type=pos, default=16, help="sequences per micro-step per process")
    p.add_argument("--grad-accum", type=pos, default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float_in(0.0, 1.0), default=0.1, help="final learning rate as a fraction of --lr")
    p.add_argument("--warmup-steps", type=nonneg, default=None, help="default: 5%% of --max-steps")
    p.add_argument("--max-steps", type=pos, default=200)
    p.add_argument("--weight-decay", type=float_in(0.0), default=0.1)
    p.add_argument("--grad-clip", type=float_in(0.0), default=1.0, help="0 disables clipping")
    p.add_argument("--eval-interval", type=pos, default=100)
    p.add_argument("--eval-iters", type=pos, default=10)
    p.add_argument("--log-interval", type=pos, default=10)
    p.add_argument("--ckpt-interval", type=pos, default=100, help="steps between checkpoints (one is always written at the end)")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--backend", choices=("auto", "cuda", "triton", "reference"), default="auto", help="fastgpt backend for every op")
    p.add_argument("--seed", type=seed_int, default=1337)
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an OUT_DIR that holds an earlier run, replacing it")
    p.add_argument(
        "--allow-config-change", action="store_true",
        help="let --resume continue with another seed, batch size, learning-rate schedule or data (no longer exact)",
    )
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (under torchrun; sharded checkpoints in OUT_DIR/ckpt.dcp)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block's activations in the backward pass")
    p.add_argument(
        "--consolidate", action="store_true",
        help="write OUT_DIR/ckpt.pt from the FSDP checkpoint OUT_DIR/ckpt.dcp (for fastgpt generate) and exit",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _validate(args: argparse.Namespace) -> None:
    """Every flag through its argparse type (for callers that build ``args`` themselves), then the
    rules that involve two flags."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if callable(action.type) and value is not None:
            try:
                action.type(str(value))
            except argparse.ArgumentTypeError as exc:
                raise TrainError(f"argument {action.option_strings[0]}: {exc}") from None
    if args.fsdp and args.compile:
        raise TrainError("--compile is not supported with --fsdp yet")
    if args.n_embd % args.n_head:
        raise TrainError(f"--n-embd ({args.n_embd}) must be a multiple of --n-head ({args.n_head})")
    if args.n_kv_head is not None and args.n_head % args.n_kv_head:
        raise TrainError(f"--n-kv-head ({args.n_kv_head}) must divide --n-head ({args.n_head})")
    if args.arch == "llama" and (args.n_embd // args.n_head) % 2:
        raise TrainError(f"--arch llama needs an even head size: --n-embd / --n-head = {args.n_embd // args.n_head}")
