"""``fastgpt train --fsdp``: FSDP2 sharding, sharded checkpoints, their consolidation, and the memory report.

Sharding: ``torch.distributed.fsdp.fully_shard`` on each transformer block, then on the root (embeddings,
final norm, tied head). Between calls a block's parameters are DTensor shards; FSDP all-gathers them in
the block's pre-forward hook, so fastgpt's ops inside ``Block.forward`` see whole, plain tensors (GPT
calls its blocks through ``block(...)`` for this). On CUDA with ``--dtype bfloat16`` (the default) the
mixed-precision policy computes in bfloat16 parameters and reduces gradients in float32.
``--activation-checkpointing`` wraps each block with torch's checkpoint wrapper (non-reentrant), under
FSDP or without it.

Checkpoints: ``OUT_DIR/ckpt.dcp/``, written with ``torch.distributed.checkpoint`` (every rank its own
shards) into ``ckpt.dcp.tmp/``; rank 0 adds ``meta.pt`` (step, configuration, every rank's RNG state,
the sha256 of each shard file, and a digest of its own content) and then the ``COMPLETE`` marker, and
only then swaps the folder in by renames. A crash leaves the previous complete checkpoint (or, within
the swap, ``ckpt.dcp.old``, which the next run puts back). Reading never unpickles arbitrary objects:
DCP's metadata goes through an unpickler that builds DCP's own metadata classes only, DCP's non-tensor
items through ``torch.load(weights_only=True)``, and every file's digest is checked first. Resuming on
another world size reshards (DCP's DTensor resharding); as the data shards and RNG streams then
differ, it needs ``--allow-config-change``. ``--consolidate`` turns ``ckpt.dcp`` into the single-file
``ckpt.pt`` that ``fastgpt generate`` and ``GPT.load_state_dict`` read.
"""

import hashlib
import io
import os
import pickle
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List

from fastgpt.app.train_checkpoint import OutDirLock, load_checkpoint, model_config, save_checkpoint
from fastgpt.app.train_data import TrainError

DCP_NAME = "ckpt.dcp"
META_NAME = "meta.pt"
DONE_NAME = "COMPLETE"
FSDP_FORMAT = "fastgpt-train-fsdp-1"
META_REQUIRED = ("step", "model_config", "train_args", "resume_key", "rng", "files")


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------


def prepare_model(model, device, args) -> None:
    """Activation checkpointing (if asked) and FSDP2 sharding, in place, before the optimizer is made."""
    import torch

    blocks = model.transformer.h
    if args.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    if not args.fsdp:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if device.type == "cuda" and (args.dtype or "bfloat16") == "bfloat16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def memory_record(model, optimizer, device, rank: int) -> Dict[str, Any]:
    """This rank's bytes of parameters and optimizer state (its shards under FSDP), and its peak CUDA memory."""
    import torch

    def nbytes(t) -> int:
        t = _local(t)
        return t.numel() * t.element_size()

    params = sum(nbytes(p) for p in {id(p): p for p in model.parameters()}.values())  # tied weights once
    optim = sum(nbytes(v) for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"rank": rank, "param_bytes": params, "optimizer_bytes": optim, "peak_cuda_bytes": peak}


# --------------------------------------------------------------------------------------------
# sharded checkpoints
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(out_dir: Path) -> None:
    """Before a run (lock held): drop a half-written ``ckpt.dcp.tmp``; put back ``ckpt.dcp.old`` if a
    crash fell between the two renames of a swap."""
    final, tmp, old = out_dir / DCP_NAME, out_dir / (DCP_NAME + ".tmp"), out_dir / (DCP_NAME + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    if old.is_dir():
        if not final.exists() and (old / DONE_NAME).is_file():
            os.replace(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)


def save(run, meta: Dict[str, Any]) -> None:
    """Every rank writes its shards; rank 0 seals the folder (meta.pt, COMPLETE) and swaps it in."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    d = run.d
    final, tmp, old = run.out_dir / DCP_NAME, run.out_dir / (DCP_NAME + ".tmp"), run.out_dir / (DCP_NAME + ".old")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(run.raw_model, run.optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    mine = {p.name: _sha256(p) for p in tmp.glob(f"__{d.rank}_*")}  # the shard files this rank wrote
    everyone: List[Any] = [None] * d.world_size
    dist.all_gather_object(everyone, mine)
    if d.main:
        files = {name: digest for part in everyone for name, digest in part.items()}
        files[".metadata"] = _sha256(tmp / ".metadata")
        save_checkpoint(tmp / META_NAME, {**meta, "files": files}, fmt=FSDP_FORMAT)
        with open(tmp / DONE_NAME, "w") as f:
            f.write(f"{meta['step']}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(run.out_dir)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_meta(out_dir: Path) -> Dict[str, Any]:
    """``meta.pt`` of the complete checkpoint in ``OUT_DIR/ckpt.dcp`` (weights_only, digest checked)."""
    folder = out_dir / DCP_NAME
    if not (folder / DONE_NAME).is_file():
        hint = f" ({out_dir / 'ckpt.pt'} is a single-process checkpoint: resume it without --fsdp)" if (out_dir / "ckpt.pt").is_file() else ""
        raise TrainError(f"no complete FSDP checkpoint at {folder}{hint}")
    return load_checkpoint(folder / META_NAME, fmt=FSDP_FORMAT, required=META_REQUIRED)


def _verify_files(folder: Path, files: Dict[str, str], rank: int = 0, world_size: int = 1) -> None:
    """Check the digests of this rank's share of the files (every file over all ranks), before reading any."""
    import torch.distributed as dist

    problems = []
    for i, (name, digest) in enumerate(sorted(files.items())):
        if i % world_size == rank:
            path = folder / name
            if not path.is_file() or _sha256(path) != digest:
                problems.append(name)
    if world_size > 1:
        everyone: List[Any] = [None] * world_size
        dist.all_gather_object(everyone, problems)
        problems = sorted(name for part in everyone for name in part)
    if problems:
        raise TrainError(f"{folder} is corrupt ({', '.join(problems)} missing or not matching its digest) and was not loaded")


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch sizes/dtypes and plain containers; refuses anything else."""

    def find_class(self, module: str, name: str):
        import importlib

        import torch

        if (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout  # maps a layout's name to torch's layout object, nothing else
        allowed = module == "torch.distributed.checkpoint.metadata" or (module, name) in {
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("collections", "OrderedDict"),
            ("builtins", "set"), ("builtins", "frozenset"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
            ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),  # the checkpoint_id DCP records
        }
        obj = getattr(importlib.import_module(module), name, None) if allowed or module == "torch" else None
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)) or (allowed and isinstance(obj, type)):
            return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


def _reader_and_planner(folder: Path):
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.default_planner import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            # FileSystemReader.read_metadata with a restricted unpickler in place of pickle.load
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except pickle.UnpicklingError as exc:
                    raise TrainError(f"{folder}/.metadata was refused by the safe loader ({exc}); nothing in it was run") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            import torch

            obj = torch.load(value, weights_only=True)  # DCP's default is weights_only=False
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeReader(str(folder)), SafePlanner()


def load_state(model, optimizer, out_dir: Path, meta: Dict[str, Any], rank: int, world_size: int, no_dist: bool = False) -> None:
    """Model and optimizer state from ``ckpt.dcp`` into (sharded or plain) ``model`` and ``optimizer``;
    DCP reshards when the world size differs from the writer's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = out_dir / DCP_NAME
    _verify_files(folder, meta["files"], rank, world_size)
    model_sd, optim_sd = get_state_dict(model, optimizer)  # templates in this run's sharding
    state = {"model": model_sd, "optim": optim_sd}
    reader, planner = _reader_and_planner(folder)
    reader.read_metadata()  # a refusal here is a TrainError; inside dcp.load it would be wrapped in DCP's errors
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # no_dist is what we ask for
        dcp.load(state, storage_reader=reader, planner=planner, no_dist=no_dist)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def consolidate(out_dir: Path, overwrite: bool) -> Path:
    """``OUT_DIR/ckpt.dcp`` -> ``OUT_DIR/ckpt.pt`` (one process, no process group, under the folder's
    lock): the full model and optimizer state in the single-process format, with the run's step,
    configuration and RNG states."""
    lock = OutDirLock(out_dir)
    try:
        lock.acquire()
        return _consolidate(out_dir, overwrite)
    finally:
        lock.release()


def _consolidate(out_dir: Path, overwrite: bool) -> Path:
    from fastgpt.model import GPT

    meta = load_meta(out_dir)
    target = out_dir / "ckpt.pt"
    if target.exists() and not overwrite:
        raise TrainError(f"{target} exists; pass --overwrite to replace it with the consolidated checkpoint")
    args = meta["train_args"]
    model = GPT(model_config(meta["model_config"], out_dir / DCP_NAME))
    optimizer = model.configure_optimizers(args["weight_decay"], args["lr"], (0.9, 0.95), "cpu")
    load_state(model, optimizer, out_dir, meta, 0, 1, no_dist=True)
    payload = {k: meta[k] for k in ("step", "model_config", "train_args", "resume_key", "rng")}
    save_checkpoint(target, {**payload, "model": model.state_dict(), "optimizer": optimizer.state_dict()})
    print(f"fastgpt train: consolidated {out_dir / DCP_NAME} (step {meta['step']}, {len(meta['rng'])} ranks) into {target}", file=sys.stderr)
    return target
