"""Training data for ``fastgpt train``: the corpus (text, folders, nanoGPT ``.bin``) and its batches.

A batch is a pure function of its coordinates (seed, split, rank, step, micro-step): that is what makes
resuming exact without saving any data-loader state.
"""

import hashlib
import math
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

DEFAULT_CORPUS_LIMIT = 8 * 2**20  # bytes of the standard library used by default: plenty for a demo
VAL_FRACTION = 0.1


class TrainError(Exception):
    """A problem with the user's input (data, checkpoint, flags): reported without a traceback."""


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
        if vocab_size is not None:
            raise TrainError("--vocab-size applies to nanoGPT .bin data only; the default corpus is read as bytes (vocabulary 256)")
        raw = np.frombuffer(_stdlib_sources(DEFAULT_CORPUS_LIMIT), dtype=np.uint8)
        return _split_bytes(raw, f"Python {sys.version.split()[0]} standard library sources ({len(raw):,} bytes)", 256)
    path = Path(data)
    if not path.exists():
        raise TrainError(f"--data {data}: no such file or directory")
    if path.is_dir() and (path / "train.bin").is_file() and (path / "val.bin").is_file():
        train, val = _read_bin(path / "train.bin", data), _read_bin(path / "val.bin", data)
        vocab = _bin_vocab(vocab_size, data, train, val)
        return Corpus(train, val, vocab, f"nanoGPT token files in {path} ({len(train):,} + {len(val):,} tokens)")
    if path.is_file() and path.suffix == ".bin":
        tokens = _read_bin(path, data)
        return _split_bytes(tokens, f"nanoGPT token file {path} ({len(tokens):,} tokens)", _bin_vocab(vocab_size, data, tokens))
    if vocab_size is not None:
        raise TrainError(f"--vocab-size applies to nanoGPT .bin data only; --data {data} is read as bytes (vocabulary 256)")
    raw_bytes = _read_text_tree(path) if path.is_dir() else path.read_bytes()
    if not raw_bytes:
        raise TrainError(f"--data {data}: no data (empty file or folder)")
    raw = np.frombuffer(raw_bytes, dtype=np.uint8)
    return _split_bytes(raw, f"bytes of {path} ({len(raw):,})", 256)


def _read_bin(path: Path, flag_value: str):
    import numpy as np

    size = path.stat().st_size
    if size == 0:
        raise TrainError(f"--data {flag_value}: {path.name} is empty")
    if size % 2:
        raise TrainError(f"--data {flag_value}: {path.name} has an odd length ({size} bytes); nanoGPT .bin files hold uint16 tokens")
    return np.memmap(path, dtype=np.uint16, mode="r")


def _bin_vocab(vocab_size: Optional[int], flag_value: str, *arrays) -> int:
    """``--vocab-size`` checked against the largest token id, or by default nanoGPT's padded GPT-2 size."""
    top = max(int(a.max()) for a in arrays) + 1
    if vocab_size is not None:
        if top > vocab_size:
            raise TrainError(f"--vocab-size {vocab_size}: --data {flag_value} holds token id {top - 1}, outside the vocabulary")
        return vocab_size
    return 50304 if top <= 50304 else int(math.ceil(top / 64) * 64)


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


def rank_shard(corpus: Corpus, block_size: int, rank: int, world_size: int):
    """This rank's slice of the training tokens, after checking that every split holds one sequence."""
    for name, split in (("training", corpus.train), ("validation", corpus.val)):
        if len(split) < block_size + 1:
            raise TrainError(
                f"the {name} split of {corpus.description} has {len(split)} tokens, fewer than --block-size + 1 "
                f"({block_size + 1}); use more data or a smaller --block-size"
            )
    shard_len = len(corpus.train) // world_size
    if shard_len < block_size + 1:
        raise TrainError(f"each of the {world_size} ranks' data shards is shorter than --block-size + 1")
    return corpus.train[rank * shard_len : (rank + 1) * shard_len]


def fingerprint(corpus: Corpus) -> str:
    """A cheap identity of the data (sizes, vocabulary, and up to 16 MiB sampled from each split): what a
    resume compares to tell that ``--data`` still holds the same tokens."""
    import numpy as np

    h = hashlib.sha256(f"{corpus.vocab_size}".encode())
    chunk = 2**20
    for split in (corpus.train, corpus.val):
        n = len(split)
        h.update(f"|{n}|{split.dtype}".encode())
        starts = range(0, n, chunk) if n <= 16 * chunk else [i * (n - chunk) // 15 for i in range(16)]
        for i in starts:
            h.update(np.ascontiguousarray(split[i : i + chunk]).tobytes())
    return h.hexdigest()[:16]
