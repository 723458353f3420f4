"""What a ``fastgpt train`` run keeps in its output folder: ``ckpt.pt``, ``log.jsonl`` and ``.lock``.

Checkpoints are written atomically and carry a digest of their content. They are read with
``torch.load(weights_only=True)``, whose unpickler builds only tensors and plain containers and never
calls anything a file names, so a crafted file cannot run code; the digest is checked before any
content is used. The folder is locked while a run writes into it, and a fresh run refuses a folder
that holds an earlier run unless ``--overwrite`` says so.
"""

import hashlib
import json
import os
import pickle
import random
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from fastgpt.app.train_data import TrainError

try:
    import fcntl
except ImportError:  # not POSIX: the lock falls back to the pid written in the file
    fcntl = None

# format 2: RNG states hold tensors and plain data only, so weights_only=True can read them
CKPT_FORMAT = "fastgpt-train-ckpt-2"
LOCK_NAME = ".lock"
RUN_FILES = ("ckpt.pt", "ckpt.dcp", "log.jsonl")  # what marks a folder as holding a run


def _rng_state() -> Dict[str, Any]:
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
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


def save_checkpoint(path: Path, payload: Dict[str, Any], fmt: str = CKPT_FORMAT) -> None:
    """Write atomically (temporary file, fsync, rename): a crash leaves the previous checkpoint intact."""
    import torch

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    content = {"format": fmt, **payload}
    with open(tmp, "wb") as f:
        torch.save({**content, "sha256": content_digest(content)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


CKPT_REQUIRED = ("model", "optimizer", "step", "model_config", "train_args", "resume_key", "rng")


def model_config(saved: Dict[str, Any], path: Path):
    """The GPTConfig a checkpoint records (fields it predates take their defaults: GPT-2's architecture)."""
    from fastgpt.model import GPTConfig

    try:
        return GPTConfig(**saved)
    except (TypeError, ValueError) as exc:
        raise TrainError(f"{path} records a model configuration this fastgpt cannot build ({exc})") from None


def load_checkpoint(path: Path, fmt: str = CKPT_FORMAT, required=CKPT_REQUIRED) -> Dict[str, Any]:
    """Load and validate ``ckpt.pt``; a truncated, corrupt or foreign file raises TrainError."""
    import torch

    if not path.is_file():
        raise TrainError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # the safe unpickler met something other than tensors and plain data
        reason = next((ln.strip() for ln in str(exc).splitlines() if "WeightsUnpickler error" in ln), type(exc).__name__)
        raise TrainError(
            f"{path} was refused by the safe loader: it holds objects other than tensors and plain data, or is "
            f"damaged; nothing in it was run and it was not loaded ({reason})"
        ) from None
    except Exception as exc:  # torch raises several types for damaged zip archives
        raise TrainError(f"{path} is corrupt or incomplete and was not loaded ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt or not {"sha256", *required} <= set(ckpt):
        raise TrainError(f"{path} is not a fastgpt training checkpoint (format {fmt})")
    stored = ckpt.pop("sha256")
    if content_digest(ckpt) != stored:
        raise TrainError(f"{path} is corrupt (its content does not match the digest written with it) and was not loaded")
    return ckpt


class _Log:
    """log.jsonl on rank 0; on resume, entries after the checkpoint's step are dropped (they will be redone).

    A torn last line (a write cut short by a crash or a full disk) is dropped with a notice; a damaged
    line before it is an error, not something to drop silently.
    """

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def start(self, resume_step: Optional[int]) -> None:
        """Empty the log for a fresh run, or keep the entries up to ``resume_step``."""
        path = self.path
        if not self.enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in _read_log_lines(path) if json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: Dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _read_log_lines(path: Path) -> List[str]:
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    for number, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise TrainError(f"{path}: line {number} is not JSON (the log is damaged); repair or remove it to resume") from None
            print(f"fastgpt train: {path}: dropped a torn last line ({len(line)} characters), left by an interrupted write", file=sys.stderr)
            return lines[:-1]
    return lines


# --------------------------------------------------------------------------------------------
# the output folder: an earlier run is never overwritten by accident, one run at a time
# --------------------------------------------------------------------------------------------


def check_fresh_start(out_dir: Path, resume: bool, overwrite: bool) -> List[Path]:
    """Refuse a fresh run over an earlier run's files unless ``overwrite``; returns the files to replace."""
    if resume and overwrite:
        raise TrainError("--resume continues the run in --out-dir and --overwrite replaces it: pass one of them")
    if resume:
        return []
    existing = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    existing = [p for p in existing if p.is_dir() or p.stat().st_size > 0]  # an empty log is no run
    if existing and not overwrite:
        names = ", ".join(p.name for p in existing)
        raise TrainError(
            f"--out-dir {out_dir} holds an earlier run ({names}); pass --resume to continue it, --overwrite to "
            "replace it, or choose another --out-dir"
        )
    return existing


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutDirLock:
    """``OUT_DIR/.lock``, held while a run writes into the folder; the file names the holder's pid.

    On POSIX the lock is an ``fcntl.flock`` on that file, which the kernel releases when the holder
    exits in any way (kill -9 included): a lock file left behind by a dead run is stale and is taken
    over, with a notice naming its pid. Elsewhere, the pid in the file is checked for liveness.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.path, self.fd = out_dir, out_dir / LOCK_NAME, None
        self.made_dir = False

    def acquire(self) -> "OutDirLock":
        try:
            if not self.out_dir.is_dir():
                self.out_dir.mkdir(parents=True)
                self.made_dir = True
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | (0 if fcntl else os.O_EXCL), 0o644)
                if fcntl is None or self._locked(fd):
                    break
        except FileExistsError:  # non-POSIX: the file exists; its pid says whether the holder lives
            self._refuse_or_take_over_by_pid()
            return self.acquire()
        except OSError as exc:
            raise TrainError(f"--out-dir {self.out_dir} is not writable ({exc.strerror or exc})") from None
        previous = os.read(fd, 64).decode(errors="replace").split()
        if previous and previous[0] != str(os.getpid()):
            print(f"fastgpt train: took over the stale lock of pid {previous[0]} (no longer running) in {self.out_dir}", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def _locked(self, fd: int) -> bool:
        """Take the flock; True when ``fd`` is still the file at ``self.path`` (a releasing holder may
        have unlinked it in between: then retry on the new file)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TrainError(
                f"--out-dir {self.out_dir} is in use by another fastgpt train run (pid {holder}, {self.path}); "
                "wait for it to end or choose another --out-dir"
            ) from None
        try:
            same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
        return same

    def _refuse_or_take_over_by_pid(self) -> None:
        try:
            holder = int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            holder = None
        if holder is not None and _pid_alive(holder):
            raise TrainError(f"--out-dir {self.out_dir} is in use by another fastgpt train run (pid {holder}, {self.path})")
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before the unlock: a waiting run then retries on a new file
            os.close(self.fd)
            self.fd = None
            if self.made_dir and not any(self.out_dir.iterdir()):
                self.out_dir.rmdir()  # a run that failed before writing anything leaves no empty folder
