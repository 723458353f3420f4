"""What a ``fastgpt train`` run keeps in its output folder: ``ckpt.pt`` and ``log.jsonl``.

Checkpoints are written atomically and carry a digest of their content, checked on load.
"""

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Dict, Optional

from fastgpt.train_data import TrainError

CKPT_FORMAT = "fastgpt-train-ckpt-1"


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
