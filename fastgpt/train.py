"""``fastgpt train``: train :class:`fastgpt.GPT` on a text corpus, on one process or many (torchrun/DDP).

Runs with no arguments on any fresh machine: the default corpus is the Python standard library's own
source files, tokenised as bytes (vocabulary 256). ``--data`` takes a text file, a folder of text
files, or nanoGPT's pre-tokenised uint16 ``.bin`` files (a folder with train.bin and val.bin, or one
.bin split 90/10).

The run is exactly resumable: the batch of every (step, micro-step, rank) is a pure function of the
seed, so ``--resume`` continues from ``ckpt.pt`` (model, optimizer, grad scaler, step and every RNG
state) with the same data order and learning-rate schedule as an uninterrupted run.

Distributed: ``torchrun --nproc_per_node N -m fastgpt.train ...`` (or the ``fastgpt-train`` script)
wraps the model in DistributedDataParallel (nccl on CUDA, gloo on CPU), gives each rank its own shard
of the training data, and logs and checkpoints on rank 0 only. For models that do not fit on one GPU,
wrap with FSDP instead (fastgpt's modules hold plain nn.Parameters, so FSDP can shard them).

This file is also meant as a template to copy: the training loop is plain PyTorch.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

CKPT_FORMAT = "fastgpt-train-ckpt-1"
DEFAULT_CORPUS_LIMIT = 8 * 2**20  # bytes of the standard library used by default: plenty for a demo
VAL_FRACTION = 0.1


class TrainError(Exception):
    """A problem with the user's input (data, checkpoint, flags): reported without a traceback."""


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    train: Any  # 1-D uint8 or uint16 numpy array (or memmap) of token ids
    val: Any
    vocab_size: int
    description: str


def _stdlib_sources(limit: int) -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel and rel[0] in ("site-packages", "dist-packages"):
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    if not chunks:
        raise TrainError(f"no Python sources found under {root} for the default corpus; pass --data PATH")
    return b"\n".join(chunks)[:limit]


def _read_text_tree(path: Path) -> bytes:
    files = [p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    return b"\n".join(p.read_bytes() for p in files)


def _split_bytes(data, description: str, vocab_size: int) -> Corpus:
    n_val = max(1, int(len(data) * VAL_FRACTION))
    return Corpus(data[: len(data) - n_val], data[len(data) - n_val :], vocab_size, description)


def load_corpus(data: Optional[str], vocab_size: Optional[int] = None) -> Corpus:
    """The token streams to train on; raises TrainError with the reason for unusable data."""
    import numpy as np

    if data is None:
        raw = np.frombuffer(_stdlib_sources(DEFAULT_CORPUS_LIMIT), dtype=np.uint8)
        return _split_bytes(raw, f"Python {sys.version.split()[0]} standard library sources ({len(raw):,} bytes)", 256)
    path = Path(data)
    if not path.exists():
        raise TrainError(f"--data {data}: no such file or directory")
    if path.is_dir() and (path / "train.bin").is_file() and (path / "val.bin").is_file():
        train = np.memmap(path / "train.bin", dtype=np.uint16, mode="r")
        val = np.memmap(path / "val.bin", dtype=np.uint16, mode="r")
        if len(train) == 0 or len(val) == 0:
            raise TrainError(f"--data {data}: train.bin or val.bin is empty")
        vocab = vocab_size or _bin_vocab(train, val)
        return Corpus(train, val, vocab, f"nanoGPT token files in {path} ({len(train):,} + {len(val):,} tokens)")
    if path.is_file() and path.suffix == ".bin":
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        if len(tokens) == 0:
            raise TrainError(f"--data {data}: the token file is empty")
        return _split_bytes(tokens, f"nanoGPT token file {path} ({len(tokens):,} tokens)", vocab_size or _bin_vocab(tokens))
    raw_bytes = _read_text_tree(path) if path.is_dir() else path.read_bytes()
    if not raw_bytes:
        raise TrainError(f"--data {data}: no data (empty file or folder)")
    raw = np.frombuffer(raw_bytes, dtype=np.uint8)
    return _split_bytes(raw, f"bytes of {path} ({len(raw):,})", 256)


def _bin_vocab(*arrays) -> int:
    top = max(int(a.max()) for a in arrays) + 1
    return 50304 if top <= 50304 else int(math.ceil(top / 64) * 64)  # nanoGPT's padded GPT-2 vocabulary


def batch_offsets(n_tokens: int, block_size: int, batch_size: int, seed: int, step: int, micro: int, rank: int, split: str):
    """Start offsets of one batch: a pure function of its coordinates, which makes resuming exact."""
    import torch

    key = f"{seed}/{split}/{rank}/{step}/{micro}".encode()
    gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
    # a sequence starting at i reads tokens i .. i + block_size (inputs and the shifted targets)
    return torch.randint(n_tokens - block_size, (batch_size,), generator=gen)


def get_batch(tokens, block_size: int, offsets, device):
    import numpy as np
    import torch

    rows = np.stack([np.asarray(tokens[i : i + block_size + 1], dtype=np.int64) for i in offsets.tolist()])
    t = torch.from_numpy(rows)
    x, y = t[:, :-1], t[:, 1:]
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)


# --------------------------------------------------------------------------------------------
# schedule, checkpoint
# --------------------------------------------------------------------------------------------


def learning_rate(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    min_lr = lr * min_lr_ratio
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def _rng_state() -> Dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def content_digest(obj: Any) -> str:
    """sha256 of a checkpoint's content (tensors by dtype, shape and bytes; containers in order).

    torch.load checks the zip structure but not the tensor bytes: a flipped bit inside a weight loads
    silently. The digest stored in the checkpoint catches that.
    """
    import numpy as np
    import torch

    h = hashlib.sha256()

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, np.ndarray):
            h.update(f"N{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for key in sorted(x, key=repr):
                h.update(repr(key).encode())
                visit(x[key])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for item in x:
                visit(item)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    visit(obj)
    return h.hexdigest()


def save_checkpoint(path: Path, payload: Dict[str, Any]) -> None:
    """Write atomically (temporary file, fsync, rename): a crash leaves the previous checkpoint intact."""
    import torch

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    content = {"format": CKPT_FORMAT, **payload}
    with open(tmp, "wb") as f:
        torch.save({**content, "sha256": content_digest(content)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Load and validate ``ckpt.pt``; a truncated, corrupt or foreign file raises TrainError."""
    import torch

    if not path.is_file():
        raise TrainError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for damaged zip archives
        raise TrainError(f"{path} is corrupt or incomplete and was not loaded ({type(exc).__name__}: {exc})") from None
    required = {"format", "model", "optimizer", "step", "model_config", "train_args", "rng", "sha256"}
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT or not required <= set(ckpt):
        raise TrainError(f"{path} is not a fastgpt training checkpoint (format {CKPT_FORMAT})")
    stored = ckpt.pop("sha256")
    if content_digest(ckpt) != stored:
        raise TrainError(f"{path} is corrupt (its content does not match the digest written with it) and was not loaded")
    return ckpt


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------

MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "dropout")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="text file, folder of text files, or nanoGPT uint16 .bin (default: Python's stdlib sources)")
    p.add_argument("--out-dir", default="out", help="where ckpt.pt and log.jsonl go (default: out)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, default=False, help="biases in linear and layer norm layers")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--vocab-size", type=int, default=None, help="only for .bin data (default: from the data)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-step per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --max-steps")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--eval-iters", type=int, default=10)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--ckpt-interval", type=int, default=100, help="steps between checkpoints (one is always written at the end)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--backend", choices=("auto", "cuda", "triton", "reference"), default="auto", help="fastgpt backend for every op")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _validate(args: argparse.Namespace) -> None:
    positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "max_steps", "log_interval", "ckpt_interval", "eval_interval", "eval_iters")
    for name in positive:
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if args.n_embd % args.n_head:
        raise TrainError(f"--n-embd ({args.n_embd}) must be a multiple of --n-head ({args.n_head})")
    if not 0.0 <= args.dropout < 1.0:
        raise TrainError(f"--dropout must be in [0, 1); got {args.dropout}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise TrainError(f"--warmup-steps must be >= 0; got {args.warmup_steps}")


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_arg: Optional[str]):
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
        return Dist(), device
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = (device_arg or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(d.local_rank)
        device = torch.device("cuda", d.local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return d, device


class _Log:
    """log.jsonl on rank 0; on resume, entries after the checkpoint's step are dropped (they will be redone)."""

    def __init__(self, path: Path, enabled: bool, resume_step: Optional[int]) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: Dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run training as configured by ``args`` (the parsed CLI flags); returns a summary dict."""
    import torch

    import fastgpt
    from fastgpt.model import GPT, GPTConfig

    _validate(args)
    dist_info, device = _init_distributed(args.device)
    try:
        with fastgpt.use_backend(args.backend):
            return _train(args, dist_info, device, torch, GPT, GPTConfig)
    finally:
        if dist_info.world_size > 1:
            torch.distributed.destroy_process_group()


def _train(args, d: Dist, device, torch, GPT, GPTConfig) -> Dict[str, Any]:
    out_dir = Path(args.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path) if args.resume else None

    corpus = load_corpus(args.data, args.vocab_size)
    for name, split in (("training", corpus.train), ("validation", corpus.val)):
        if len(split) < args.block_size + 1:
            raise TrainError(
                f"the {name} split of {corpus.description} has {len(split)} tokens, fewer than --block-size + 1 "
                f"({args.block_size + 1}); use more data or a smaller --block-size"
            )
    shard_len = len(corpus.train) // d.world_size
    if shard_len < args.block_size + 1:
        raise TrainError(f"each of the {d.world_size} ranks' data shards is shorter than --block-size + 1")
    train_shard = corpus.train[d.rank * shard_len : (d.rank + 1) * shard_len]

    config = GPTConfig(
        block_size=args.block_size, vocab_size=corpus.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
        n_embd=args.n_embd, dropout=args.dropout, bias=args.bias,
    )
    if ckpt is not None:
        saved = ckpt["model_config"]
        mismatched = {k: (saved.get(k), v) for k, v in asdict(config).items() if saved.get(k) != v}
        if mismatched:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
            raise TrainError(f"{ckpt_path} was trained with another model configuration ({detail})")

    if device.type == "cuda":
        amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype or "bfloat16"]
    else:
        if args.dtype == "float16":
            raise TrainError("--dtype float16 needs a CUDA device (CPU autocast supports bfloat16)")
        amp_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 only

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = GPT(config).to(device)
    torch.manual_seed(args.seed + 1 + d.rank)  # but each rank its own dropout masks
    optimizer = model.configure_optimizers(args.weight_decay, args.lr, (0.9, 0.95), device.type)
    start_step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        start_step = int(ckpt["step"])
        if len(ckpt["rng"]) != d.world_size:
            raise TrainError(f"{ckpt_path} was written by {len(ckpt['rng'])} processes; resume it with as many")
        _set_rng_state(ckpt["rng"][d.rank])
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[d.local_rank] if device.type == "cuda" else None)

    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.max_steps // 20)
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * d.world_size
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = _Log(out_dir / "log.jsonl", d.main, start_step if ckpt is not None else None)
    if d.main:
        print(
            f"fastgpt train: {raw_model.get_num_params() / 1e6:.2f}M parameters, {corpus.description}, "
            f"{tokens_per_step:,} tokens/step on {d.world_size} x {device}"
            + (f", resuming at step {start_step}" if ckpt is not None else ""),
            file=sys.stderr,
        )

    def evaluate() -> float:
        model.eval()
        losses = []
        with torch.no_grad(), autocast():
            for i in range(args.eval_iters):
                offsets = batch_offsets(len(corpus.val), args.block_size, args.batch_size, args.seed, 0, i, 0, "val")
                x, y = get_batch(corpus.val, args.block_size, offsets, device)
                losses.append(raw_model(x, y)[1].float().item())
        model.train()
        return sum(losses) / len(losses)

    def checkpoint(step: int) -> None:
        rng = _rng_state()
        if d.world_size > 1:
            gathered: List[Any] = [None] * d.world_size
            torch.distributed.all_gather_object(gathered, rng)
            rng = gathered
        else:
            rng = [rng]
        if d.main:
            save_checkpoint(
                ckpt_path,
                {
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "step": step, "model_config": asdict(config), "train_args": vars(args), "rng": rng,
                },
            )

    progress = None
    if d.main and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.max_steps, initial=start_step, unit="step", dynamic_ncols=True)
    model.train()
    last_loss, t_last, steps_since = float("nan"), time.perf_counter(), 0
    for step in range(start_step, args.max_steps):
        lr = learning_rate(step, args.lr, warmup, args.max_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            offsets = batch_offsets(len(train_shard), args.block_size, args.batch_size, args.seed, step, micro, d.rank, "train")
            x, y = get_batch(train_shard, args.block_size, offsets, device)
            sync = contextlib.nullcontext()
            if d.world_size > 1 and micro < args.grad_accum - 1:
                sync = model.no_sync()  # all-reduce the gradients once per optimizer step
            with sync:
                with autocast():
                    _, loss = model(x, y)
                loss = loss / args.grad_accum
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if args.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        steps_since += 1
        if d.world_size > 1:
            torch.distributed.all_reduce(loss_sum)  # gloo has no AVG
            loss_sum /= d.world_size
        if done % args.log_interval == 0 or done == 1 or done == args.max_steps:
            last_loss = loss_sum.item()
            now = time.perf_counter()
            tps = tokens_per_step * steps_since / max(now - t_last, 1e-9)
            t_last, steps_since = now, 0
            log.write({"step": done, "loss": last_loss, "lr": lr, "tokens_per_s": tps})
            if progress is not None:
                progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
        if done % args.eval_interval == 0 or done == args.max_steps:
            val = evaluate()
            log.write({"step": done, "val_loss": val})
            if progress is not None:
                progress.write(f"step {done}: val loss {val:.4f}")
        if done % args.ckpt_interval == 0 or done == args.max_steps:
            checkpoint(done)
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()

    summary = {"step": args.max_steps, "loss": last_loss, "out_dir": str(out_dir)}
    if d.world_size > 1:
        digests: List[Any] = [None] * d.world_size
        # equal digests of every parameter's bytes on all ranks: DDP kept them identical
        torch.distributed.all_gather_object(digests, content_digest(raw_model.state_dict()))
        summary["ranks_in_sync"] = len(set(digests)) == 1
        log.write({"step": args.max_steps, "param_digests": digests, "ranks_in_sync": summary["ranks_in_sync"]})
        if not summary["ranks_in_sync"]:
            raise RuntimeError(f"ranks ended with different parameters: {digests}")
    return summary


def main(args: argparse.Namespace) -> int:
    try:
        train(args)
    except TrainError as exc:
        print(f"fastgpt train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def cli_main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m fastgpt.train`` and the ``fastgpt-train`` script (torchrun-friendly)."""
    parser = argparse.ArgumentParser(prog="fastgpt-train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli_main())
