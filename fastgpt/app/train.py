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
of the training data, and logs and checkpoints on rank 0 only. ``--fsdp`` shards the model with FSDP2
instead, for models that do not fit on one GPU (see :mod:`fastgpt.app.train_fsdp`).

This file is also meant as a template to copy: the training loop is plain PyTorch.
"""

import argparse
import contextlib
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from fastgpt.app import train_fsdp
from fastgpt.app.common import backend_notice, check_device, fallback_notices
from fastgpt.app.train_args import MODEL_FLAGS, _validate, add_arguments  # noqa: F401
from fastgpt.app.train_checkpoint import (  # noqa: F401  (re-exported: the public names of fastgpt.train)
    CKPT_FORMAT, OutDirLock, _Log, _rng_state, check_fresh_start, _set_rng_state, content_digest, load_checkpoint, model_config,
    save_checkpoint,
)
from fastgpt.app.train_data import (  # noqa: F401
    Corpus, TrainError, batch_offsets, fingerprint, get_batch, load_corpus, rank_shard,
)


def learning_rate(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    min_lr = lr * min_lr_ratio
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# --------------------------------------------------------------------------------------------
# the run, step by step
# --------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_arg: Optional[str], fsdp: bool = False):
    import torch
    import torch.distributed as dist

    problem = check_device(torch.device(device_arg)) if device_arg else None
    if problem:
        raise TrainError(problem)
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
        if fsdp and not dist.is_initialized():  # FSDP shards over a process group, here a group of one
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
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


@dataclass
class _Run:
    """Everything one training run holds, filled in by the steps of :func:`_train` in order."""

    args: argparse.Namespace
    d: Dist
    device: Any
    out_dir: Path
    ckpt_path: Path
    ckpt: Optional[Dict[str, Any]] = None
    corpus: Optional[Corpus] = None
    train_shard: Any = None
    config: Any = None
    autocast: Callable[[], Any] = contextlib.nullcontext
    scaler: Any = None
    model: Any = None  # what the loop calls: compiled and/or DDP-wrapped
    raw_model: Any = None  # the GPT itself: state dicts, evaluation, clipping
    optimizer: Any = None
    start_step: int = 0
    warmup: int = 1
    tokens_per_step: int = 0
    log: Optional[_Log] = None
    progress: Any = None
    backend_notice: Optional[str] = None
    data_fingerprint: str = ""
    last_loss: float = float("nan")


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run training as configured by ``args`` (the parsed CLI flags); returns a summary dict."""
    import torch

    import fastgpt

    _validate(args)
    if args.consolidate:
        return {"consolidated": str(train_fsdp.consolidate(Path(args.out_dir), args.overwrite))}
    caller_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    dist_info, device = _init_distributed(args.device, args.fsdp)
    lock = OutDirLock(Path(args.out_dir))
    try:
        _on_rank0(dist_info, lambda: _claim_out_dir(args, lock))
        with fastgpt.use_backend(args.backend):
            return _train(args, dist_info, device)
    finally:
        lock.release()
        if not caller_group and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the group this call made


def _on_rank0(d: "Dist", step: Callable[[], None]) -> None:
    """Run ``step`` on rank 0 only; its TrainError is raised on every rank (no rank is left waiting)."""
    import torch

    error = None
    if d.main:
        try:
            step()
        except TrainError as exc:
            error = str(exc)
    if d.world_size > 1:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise TrainError(error)


def _claim_out_dir(args: argparse.Namespace, lock: OutDirLock) -> None:
    """Lock --out-dir for this run; a fresh run refuses an earlier run's files unless --overwrite."""
    lock.acquire()
    out_dir = Path(args.out_dir)
    for partial in out_dir.glob("ckpt.pt.tmp*"):  # a save cut short by a crash: never renamed, never read
        partial.unlink()
    train_fsdp.recover(out_dir)
    for path in check_fresh_start(out_dir, args.resume, args.overwrite):
        if path.name != "log.jsonl":  # an old checkpoint must not outlive the run that replaces it
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _train(args: argparse.Namespace, d: Dist, device) -> Dict[str, Any]:
    out_dir = Path(args.out_dir)
    run = _Run(args, d, device, out_dir, out_dir / (train_fsdp.DCP_NAME if args.fsdp else "ckpt.pt"))
    if args.resume:
        if not args.fsdp and not run.ckpt_path.exists() and (out_dir / train_fsdp.DCP_NAME).exists():
            raise TrainError(f"{out_dir} holds an FSDP checkpoint: resume with --fsdp, or --consolidate it into {run.ckpt_path}")
        run.ckpt = train_fsdp.load_meta(out_dir) if args.fsdp else load_checkpoint(run.ckpt_path)
    _load_data(run)
    _model_config(run)
    _precision(run)
    _build_model(run)
    _resume(run)
    _wrap_model(run)
    _open_log(run)
    write = None if d.main else (lambda line: None)  # rank 0 speaks for all
    if run.progress is not None:
        write = lambda line: run.progress.write(line, file=sys.stderr)  # noqa: E731
    with fallback_notices("fastgpt train", header_said_it=run.backend_notice is not None, write=write):
        _loop(run)
    return _finish(run)


def _load_data(run: _Run) -> None:
    run.corpus = load_corpus(run.args.data, run.args.vocab_size)
    run.train_shard = rank_shard(run.corpus, run.args.block_size, run.d.rank, run.d.world_size)
    run.data_fingerprint = fingerprint(run.corpus)


def _model_config(run: _Run) -> None:
    """The GPTConfig from the flags (--arch: a named architecture) and the data; on resume it must equal the checkpoint's."""
    from fastgpt.model import ARCHITECTURES, GPTConfig

    a = run.args
    run.config = GPTConfig(
        block_size=a.block_size, vocab_size=run.corpus.vocab_size, n_layer=a.n_layer, n_head=a.n_head,
        n_embd=a.n_embd, dropout=a.dropout, bias=a.bias, n_kv_head=a.n_kv_head, **ARCHITECTURES[a.arch],
    )
    if run.ckpt is not None:
        saved = asdict(model_config(run.ckpt["model_config"], run.ckpt_path))
        mismatched = {k: (saved.get(k), v) for k, v in asdict(run.config).items() if saved.get(k) != v}
        if mismatched:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
            raise TrainError(f"{run.ckpt_path} was trained with another model configuration ({detail})")


def _precision(run: _Run) -> None:
    """The autocast dtype (bfloat16 on CUDA by default) and the grad scaler (enabled for float16 only)."""
    import torch

    device, dtype = run.device, run.args.dtype
    if device.type == "cuda":
        amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype or "bfloat16"]
    else:
        if dtype == "float16":
            raise TrainError("--dtype float16 needs a CUDA device (CPU autocast supports bfloat16)")
        amp_dtype = torch.bfloat16 if dtype == "bfloat16" else None
    if run.args.fsdp and amp_dtype == torch.float16:
        raise TrainError("--fsdp trains in float32 or bfloat16; --dtype float16 (with its grad scaler) is not supported with it")
    if run.args.fsdp and device.type == "cuda":
        amp_dtype = None  # FSDP's mixed-precision policy casts the parameters instead (train_fsdp.prepare_model)
    if amp_dtype:
        run.autocast = lambda: torch.autocast(device.type, dtype=amp_dtype)
    run.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


def _build_model(run: _Run) -> None:
    import torch

    from fastgpt.model import GPT

    a = run.args
    torch.manual_seed(a.seed)  # the same initial weights on every rank
    run.raw_model = run.model = GPT(run.config).to(run.device)
    train_fsdp.prepare_model(run.raw_model, run.device, a)  # activation checkpointing, FSDP sharding (if asked)
    torch.manual_seed(a.seed + 1 + run.d.rank)  # but each rank its own dropout masks
    run.optimizer = run.raw_model.configure_optimizers(a.weight_decay, a.lr, (0.9, 0.95), run.device.type)
    run.warmup = a.warmup_steps if a.warmup_steps is not None else max(1, a.max_steps // 20)
    run.tokens_per_step = a.batch_size * a.block_size * a.grad_accum * run.d.world_size


def _resume(run: _Run) -> None:
    """Model, optimizer, scaler, step and this rank's RNG state from the checkpoint."""
    ckpt = run.ckpt
    if ckpt is None:
        return
    _check_same_run(run)
    if run.args.fsdp:
        train_fsdp.load_state(run.raw_model, run.optimizer, run.out_dir, ckpt, run.d.rank, run.d.world_size)
    else:
        run.raw_model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            run.scaler.load_state_dict(ckpt["scaler"])
    run.start_step = int(ckpt["step"])
    run.optimizer.param_groups[0]["weight_decay"] = run.args.weight_decay  # the flag's, if a change was allowed
    if len(ckpt["rng"]) == run.d.world_size:  # else (a change allowed): the RNG streams seeded in _build_model
        _set_rng_state(ckpt["rng"][run.d.rank])


# what an exact resume must not change (the model's shape is checked separately, always)
EXACT_RESUME = (
    "seed", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "max_steps", "weight_decay", "grad_clip", "data",
    "world_size",
)


def _resume_key(run: _Run) -> Dict[str, Any]:
    key = {name: getattr(run.args, name, None) for name in EXACT_RESUME}
    # the effective warm-up; the tokens, not the path; the number of processes (data shards, RNG streams)
    key.update(warmup_steps=run.warmup, data=run.data_fingerprint, world_size=run.d.world_size)
    return key


_FLAG_NAMES = {"world_size": "world size (torchrun --nproc_per_node)"}


def _check_same_run(run: _Run) -> None:
    """Refuse a resume whose seed, batches, schedule or data differ from the checkpoint's, unless
    --allow-config-change accepts it (then say what changed)."""
    saved, now = run.ckpt["resume_key"], _resume_key(run)
    changed = [k for k in EXACT_RESUME if saved.get(k) != now[k]]
    if not changed:
        return
    detail = ", ".join(
        "--data (other tokens)" if k == "data" else f"{_FLAG_NAMES.get(k, '--' + k.replace('_', '-'))} {saved.get(k)!r} -> {now[k]!r}"
        for k in changed
    )
    if not run.args.allow_config_change:
        raise TrainError(
            f"--resume would not continue {run.ckpt_path} exactly: {detail}; "
            "pass --allow-config-change to continue with the new settings"
        )
    if run.d.main:
        print(f"fastgpt train: resuming with changed settings (--allow-config-change): {detail}", file=sys.stderr)


def _wrap_model(run: _Run) -> None:
    import torch

    if run.args.compile:
        run.model = torch.compile(run.model)
    if run.d.world_size > 1 and not run.args.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run.model = DDP(run.model, device_ids=[run.d.local_rank] if run.device.type == "cuda" else None)


def _open_log(run: _Run) -> None:
    """log.jsonl, the header line and the progress bar (rank 0)."""
    d = run.d
    run.log = _Log(run.out_dir / "log.jsonl", d.main)
    _on_rank0(d, lambda: run.log.start(run.start_step if run.ckpt is not None else None))
    run.backend_notice = backend_notice(run.device)
    if d.main:
        print(
            f"fastgpt train: {run.raw_model.get_num_params() / 1e6:.2f}M parameters, {run.corpus.description}, "
            f"{run.tokens_per_step:,} tokens/step on {d.world_size} x {run.device}"
            + (f", resuming at step {run.start_step}" if run.ckpt is not None else ""),
            file=sys.stderr,
        )
        if run.backend_notice:
            print(f"fastgpt train: {run.backend_notice}", file=sys.stderr)
    if d.main and not run.args.no_progress:
        from tqdm import tqdm

        run.progress = tqdm(total=run.args.max_steps, initial=run.start_step, unit="step", dynamic_ncols=True)


def _train_step(run: _Run, step: int, lr: float):
    """One optimizer step (grad_accum micro-steps); returns the loss averaged over micro-steps and ranks."""
    import torch

    a, d, optimizer, scaler = run.args, run.d, run.optimizer, run.scaler
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(a.grad_accum):
        offsets = batch_offsets(len(run.train_shard), a.block_size, a.batch_size, a.seed, step, micro, d.rank, "train")
        x, y = get_batch(run.train_shard, a.block_size, offsets, run.device)
        sync = contextlib.nullcontext()
        if a.fsdp:
            run.raw_model.set_requires_gradient_sync(micro == a.grad_accum - 1)  # reduce-scatter once per step
        elif d.world_size > 1 and micro < a.grad_accum - 1:
            sync = run.model.no_sync()  # all-reduce the gradients once per optimizer step
        with sync:
            with run.autocast():
                _, loss = run.model(x, y)
            loss = loss / a.grad_accum
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if a.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), a.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if d.world_size > 1:
        torch.distributed.all_reduce(loss_sum)  # gloo has no AVG
        loss_sum /= d.world_size
    return loss_sum


def _loop(run: _Run) -> None:
    a, progress = run.args, run.progress
    run.model.train()
    t_last, steps_since = time.perf_counter(), 0
    for step in range(run.start_step, a.max_steps):
        lr = learning_rate(step, a.lr, run.warmup, a.max_steps, a.min_lr_ratio)
        loss_sum = _train_step(run, step, lr)
        done = step + 1
        steps_since += 1
        if done % a.log_interval == 0 or done == 1 or done == a.max_steps:
            run.last_loss = loss_sum.item()
            now = time.perf_counter()
            tps = run.tokens_per_step * steps_since / max(now - t_last, 1e-9)
            t_last, steps_since = now, 0
            run.log.write({"step": done, "loss": run.last_loss, "lr": lr, "tokens_per_s": tps})
            if progress is not None:
                progress.set_postfix(loss=f"{run.last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
        if done % a.eval_interval == 0 or done == a.max_steps:
            val = _evaluate(run)
            run.log.write({"step": done, "val_loss": val})
            if progress is not None:
                progress.write(f"step {done}: val loss {val:.4f}")
        if done % a.ckpt_interval == 0 or done == a.max_steps:
            _checkpoint(run, done)
        if done == run.start_step + 1 and done < a.max_steps:
            _log_memory(run, done)  # after the first step (optimizer state exists); again at the end
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()


def _evaluate(run: _Run) -> float:
    """Mean loss over ``--eval-iters`` fixed validation batches (the same ones at every evaluation)."""
    import torch

    a = run.args
    run.model.eval()
    losses = []
    with torch.no_grad(), run.autocast():
        for i in range(a.eval_iters):
            offsets = batch_offsets(len(run.corpus.val), a.block_size, a.batch_size, a.seed, 0, i, 0, "val")
            x, y = get_batch(run.corpus.val, a.block_size, offsets, run.device)
            losses.append(run.raw_model(x, y)[1].float().item())
    run.model.train()
    return sum(losses) / len(losses)


def _checkpoint(run: _Run, step: int) -> None:
    """ckpt.pt with every rank's RNG state (gathered), written by rank 0."""
    import torch

    rng = _rng_state()
    if run.d.world_size > 1:
        gathered: List[Any] = [None] * run.d.world_size
        torch.distributed.all_gather_object(gathered, rng)
        rng = gathered
    else:
        rng = [rng]
    meta = {"step": step, "model_config": asdict(run.config), "train_args": vars(run.args), "resume_key": _resume_key(run), "rng": rng}
    if run.args.fsdp:
        train_fsdp.save(run, meta)  # every rank writes its shards
    elif run.d.main:
        save_checkpoint(
            run.ckpt_path,
            {**meta, "model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict()},
        )


def _log_memory(run: _Run, step: int) -> None:
    """Each rank's parameter and optimizer bytes (its shards under FSDP) and peak CUDA memory, in the log."""
    import torch

    record = train_fsdp.memory_record(run.raw_model, run.optimizer, run.device, run.d.rank)
    records: List[Any] = [record]
    if run.d.world_size > 1:
        records = [None] * run.d.world_size
        torch.distributed.all_gather_object(records, record)
    run.log.write({"step": step, "memory": records})


def _finish(run: _Run) -> Dict[str, Any]:
    """The summary and memory report; under DDP, a check that every rank kept identical parameters."""
    import torch

    a, d = run.args, run.d
    summary = {"step": a.max_steps, "loss": run.last_loss, "out_dir": str(run.out_dir)}
    if run.start_step < a.max_steps:  # this process trained
        _log_memory(run, a.max_steps)
    if d.world_size > 1 and not a.fsdp:
        digests: List[Any] = [None] * d.world_size
        # equal digests of every parameter's bytes on all ranks: DDP kept them identical
        torch.distributed.all_gather_object(digests, content_digest(run.raw_model.state_dict()))
        summary["ranks_in_sync"] = len(set(digests)) == 1
        run.log.write({"step": a.max_steps, "param_digests": digests, "ranks_in_sync": summary["ranks_in_sync"]})
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
    """Entry point of ``python -m fastgpt.train`` (:mod:`fastgpt.train`) and the ``fastgpt-train`` script (torchrun-friendly)."""
    parser = argparse.ArgumentParser(prog="fastgpt-train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    code = main(args)
    if args.fsdp or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # After a distributed backward on CPU, torch's autograd device threads can abort the interpreter's
        # shutdown ("terminate called without an active exception", pytorch/pytorch#38228): seen here
        # in about 1 of 10 gloo runs with FSDP2, and 1 of 5 DDP runs on torch 2.11. The run is finished,
        # its files closed: skip that shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(cli_main())
