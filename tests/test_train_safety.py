"""`fastgpt train` / `generate` against hostile or careless input (issue 17): checkpoints that would run
code, runs over earlier runs or into a folder in use, torn logs, resumes that would not be exact, bad flags."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastgpt import cli
from fastgpt.app import train as fg_train
from fastgpt.app.train_checkpoint import LOCK_NAME, OutDirLock

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4", "--no-progress"]
RUN = TINY + ["--max-steps", "4", "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1", "--ckpt-interval", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def parse(*argv):
    import argparse

    p = argparse.ArgumentParser()
    fg_train.add_arguments(p)
    return p.parse_args(list(argv))


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastgpt.cli", *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def snapshot(folder: Path):
    """Every file under ``folder`` with its content hash: 'no trace on disk' is an equal snapshot."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with a checkpoint (read-only: tests copy it)."""
    out = tmp_path_factory.mktemp("run") / "out"
    fg_train.train(parse(*RUN, "--out-dir", str(out)))
    return out


def copy_run(trained, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    return out


# ---- 1. checkpoints cannot run code ---------------------------------------------------------


class Evil:
    """Unpickling this calls open(marker, 'w'): a file appears if the loader runs what the pickle names."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_evil(path: Path, marker: Path, legacy: bool) -> None:
    Evil.marker = str(marker)
    payload = {"format": fg_train.CKPT_FORMAT, "model": Evil(), "step": 1}
    if legacy:  # torch's pre-zip format: a plain pickle stream
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(payload, path)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_a_malicious_checkpoint_runs_nothing_and_leaves_no_trace(tmp_path, trained, legacy):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    write_evil(evil, marker, legacy)
    with pytest.raises(fg_train.TrainError, match="refused by the safe loader.*nothing in it was run"):
        fg_train.load_checkpoint(evil)
    assert not marker.exists()
    if legacy:
        return  # the commands below read through the same load_checkpoint: once is enough

    # through both commands that open checkpoints; the run folder must be left exactly as it was
    out = copy_run(trained, tmp_path)
    shutil.copy(evil, out / "ckpt.pt")
    before = snapshot(tmp_path)
    result = run_cli("generate", "--ckpt", str(evil), "--max-new-tokens", "2")
    assert result.returncode == 2 and "refused by the safe loader" in result.stderr, result.stderr
    result = run_cli("train", *RUN, "--out-dir", str(out), "--resume")
    assert result.returncode == 2 and "refused by the safe loader" in result.stderr, result.stderr
    assert not marker.exists()
    assert snapshot(tmp_path) == before, "no file created, changed or removed (no lock, no truncated log)"


def test_from_hf_refuses_a_malicious_weights_file(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fastgpt import GPT

    folder, marker = tmp_path / "hf", tmp_path / "marker"
    transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=64).save_pretrained(folder)
    Evil.marker = str(marker)
    torch.save({"transformer.wte.weight": Evil()}, folder / "pytorch_model.bin")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="objects other than tensors"):
        GPT.from_hf(str(folder))
    assert not marker.exists() and snapshot(tmp_path) == before


def test_checkpoints_hold_only_tensors_and_plain_data(trained):
    """What makes weights_only loading possible: the RNG states too (numpy's as a tensor)."""
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    assert ckpt["format"] == fg_train.CKPT_FORMAT and isinstance(ckpt["rng"][0]["numpy"]["keys"], torch.Tensor)


# ---- 2. the output folder -------------------------------------------------------------------


def test_a_fresh_run_refuses_an_earlier_run_unless_overwrite(tmp_path, trained):
    out = copy_run(trained, tmp_path)
    before = snapshot(out)
    with pytest.raises(fg_train.TrainError, match=r"holds an earlier run \(ckpt.pt, log.jsonl\).*--resume.*--overwrite"):
        fg_train.train(parse(*RUN, "--out-dir", str(out)))
    assert snapshot(out) == before, "nothing truncated or replaced"
    with pytest.raises(fg_train.TrainError, match="pass one of them"):
        fg_train.train(parse(*RUN, "--out-dir", str(out), "--resume", "--overwrite"))
    fg_train.train(parse(*RUN, "--out-dir", str(out), "--overwrite", "--seed", "7"))
    assert fg_train.load_checkpoint(out / "ckpt.pt")["train_args"]["seed"] == 7
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "log.jsonl"], "the lock is gone after the run"


def test_a_second_run_into_a_folder_in_use_refuses_to_start(tmp_path):
    out = tmp_path / "out"
    lock = OutDirLock(out).acquire()  # what a running `fastgpt train` holds
    try:
        result = run_cli("train", *RUN, "--out-dir", str(out))
        assert result.returncode == 2, result.stderr
        assert f"in use by another fastgpt train run (pid {os.getpid()}" in result.stderr
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME], "the refused run wrote nothing"
    finally:
        lock.release()
    assert not (out / LOCK_NAME).exists()


def test_a_stale_lock_of_a_dead_run_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(f"{dead.pid}\n")  # what kill -9 leaves behind
    fg_train.train(parse(*RUN, "--out-dir", str(out)))
    assert f"took over the stale lock of pid {dead.pid}" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists()


def test_an_unwritable_out_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(fg_train.TrainError, match=r"--out-dir .* is not writable"):
        fg_train.train(parse(*RUN, "--out-dir", str(blocker / "out")))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_dir_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(fg_train.TrainError, match=r"--out-dir .* is not writable"):
        fg_train.train(parse(*RUN, "--out-dir", str(ro)))


# ---- 4, 5. resume ---------------------------------------------------------------------------


def test_resume_drops_a_torn_last_log_line_and_refuses_a_damaged_one(tmp_path, trained, capsys):
    out = copy_run(trained, tmp_path)
    log = out / "log.jsonl"
    good = log.read_text()
    log.write_text(good + '{"step": 5, "loss": 4.1')  # a write cut short
    fg_train.train(parse(*RUN, "--out-dir", str(out), "--resume"))
    assert "dropped a torn last line" in capsys.readouterr().err
    assert log.read_text() == good
    lines = good.splitlines()
    log.write_text("\n".join(lines[:1] + ['{"step": 2, "lo'] + lines[1:]) + "\n")
    with pytest.raises(fg_train.TrainError, match="line 2 is not JSON"):
        fg_train.train(parse(*RUN, "--out-dir", str(out), "--resume"))


@pytest.mark.parametrize(
    "change, named",
    [
        (["--seed", "2"], "--seed 1337 -> 2"),
        (["--batch-size", "2"], "--batch-size 4 -> 2"),
        (["--lr", "0.002"], "--lr 0.001 -> 0.002"),
        (["--max-steps", "6"], "--max-steps 4 -> 6"),
        (["--warmup-steps", "3"], "--warmup-steps 1 -> 3"),
        (["--data", "OTHER"], "--data (other tokens)"),
    ],
)
def test_resume_refuses_changed_settings_unless_allowed(tmp_path, trained, capsys, change, named):
    out = copy_run(trained, tmp_path)
    if "OTHER" in change:
        other = tmp_path / "other.txt"
        other.write_bytes(bytes(range(256)) * 40)
        change = ["--data", str(other)]
    args = [*RUN, *change, "--out-dir", str(out), "--resume"]
    with pytest.raises(fg_train.TrainError, match=f"would not continue .* exactly: {re.escape(named)}.*--allow-config-change"):
        fg_train.train(parse(*args))
    capsys.readouterr()
    fg_train.train(parse(*args, "--allow-config-change"))
    assert f"resuming with changed settings (--allow-config-change): {named}" in capsys.readouterr().err


# ---- 6. every flag validated ----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--lr", "-1"], "argument --lr: must be a finite number in (0, inf); got -1"),
        (["train", "--lr", "nan"], "argument --lr: must be a finite number in (0, inf); got nan"),
        (["train", "--dropout", "1"], "argument --dropout: must be a finite number in [0, 1); got 1"),
        (["train", "--batch-size", "0"], "argument --batch-size: must be at least 1; got 0"),
        (["train", "--warmup-steps", "-1"], "argument --warmup-steps: must be at least 0; got -1"),
        (["train", "--grad-clip", "inf"], "argument --grad-clip: must be a finite number in [0, inf); got inf"),
        (["train", "--seed", "-5"], "argument --seed: must be at least 0 and below"),
        (["train", "--device", "gpu0"], "argument --device: not a torch device: 'gpu0'"),
        (["generate", "--ckpt", "x", "--top-k", "0"], "argument --top-k: must be at least 1; got 0"),
        (["generate", "--ckpt", "x", "--top-k", "-3"], "argument --top-k: must be at least 1; got -3"),
        (["generate", "--ckpt", "x", "--temperature", "nan"], "argument --temperature: must be a finite number in (0, inf); got nan"),
        (["generate", "--ckpt", "x", "--json", "/no/such/folder/out.json"], "argument --json: the folder of '/no/such/folder/out.json' does not exist"),
    ],
)
def test_bad_flags_are_one_line_errors_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def run_main(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, err


def test_bad_token_files_are_one_line_errors(tmp_path, capsys):
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00" * 100 + b"\x01")
    code, err = run_main(["train", "--data", str(odd), "--out-dir", str(tmp_path / "o1"), *TINY], capsys)
    assert code == 2 and "odd.bin has an odd length (201 bytes)" in err and len(err.strip().splitlines()) == 1, err
    big = tmp_path / "big.bin"
    (np.arange(2000) % 500).astype(np.uint16).tofile(big)
    code, err = run_main(["train", "--data", str(big), "--vocab-size", "256", "--out-dir", str(tmp_path / "o2"), *TINY], capsys)
    assert code == 2 and "--vocab-size 256: --data" in err and "holds token id 499" in err, err
    code, err = run_main(["train", "--vocab-size", "300", "--out-dir", str(tmp_path / "o3"), *TINY], capsys)
    assert code == 2 and "--vocab-size applies to nanoGPT .bin data only" in err, err
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3")), "a refused run leaves no folder behind"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_device_cuda_without_a_gpu_is_a_one_line_error(tmp_path, capsys):
    code, err = run_main(["train", "--device", "cuda", "--out-dir", str(tmp_path / "o"), *TINY], capsys)
    assert code == 2 and "--device cuda: no CUDA device is available here" in err and len(err.strip().splitlines()) == 1, err
    code, err = run_main(["generate", "--ckpt", "x", "--device", "cuda"], capsys)
    assert code == 2 and "--device cuda: no CUDA device is available here" in err, err


# ---- 7. the CPU notice ----------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the notice is about CPU tensors")
def test_the_cpu_notice_is_said_once_in_the_header_not_as_a_python_warning(tmp_path):
    out = tmp_path / "out"
    train = run_cli("train", *[a for a in RUN if a != "--no-progress"], "--out-dir", str(out))
    gen = run_cli("generate", "--ckpt", str(out / "ckpt.pt"), "--max-new-tokens", "3", "--json", "-")
    for name, result in (("train", train), ("generate", gen)):
        assert result.returncode == 0, result.stderr
        err = result.stderr
        assert err.count("runs the plain-torch reference") == 1, err
        header = [line for line in err.splitlines() if "plain-torch reference" in line][0]
        assert header.startswith(f"fastgpt {name}: every op on cpu runs the plain-torch reference"), header
        assert "Warning" not in err and "_define.py" not in err and "warnings.warn" not in err, err
    assert json.loads(gen.stdout)["tokens"] == 3, "stdout stays clean JSON"
