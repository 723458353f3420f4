"""`fastgpt train` / `fastgpt generate`: learning, exact resume after SIGKILL, DDP on CPU, bad input."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastgpt.app import train as fg_train
from train_helpers import wait_for_log_step

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64", "--batch-size", "8", "--no-progress"]


def run_cli(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "fastgpt.cli", *args], capture_output=True, text=True, timeout=timeout, env=env)


def read_log(out_dir: Path):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def parse(*argv):
    import argparse

    p = argparse.ArgumentParser()
    fg_train.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-layer model trained for 50 steps on the default corpus (the stdlib sources)."""
    out = tmp_path_factory.mktemp("trained")
    args = parse(*TINY, "--out-dir", str(out), "--max-steps", "50", "--log-interval", "5", "--eval-interval", "25", "--lr", "3e-3")
    summary = fg_train.train(args)
    return out, summary


def test_training_lowers_the_loss_well_below_uniform(trained):
    out, summary = trained
    log = read_log(out)
    losses = [r["loss"] for r in log if "loss" in r]
    assert log[0]["step"] == 1 and abs(losses[0] - math.log(256)) < 0.5, "starts near the uniform-byte loss"
    assert losses[-1] < 0.7 * math.log(256), losses
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < 0.75 * math.log(256)
    for r in log:
        if "loss" in r:
            assert set(r) == {"step", "loss", "lr", "tokens_per_s"} and r["tokens_per_s"] > 0
    ckpt = fg_train.load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 50 and ckpt["model_config"]["n_layer"] == 2


def test_generate_produces_the_requested_number_of_tokens(trained):
    out, _ = trained
    result = run_cli("generate", "--ckpt", str(out / "ckpt.pt"), "--prompt", "def ", "--max-new-tokens", "40", "--json", "-")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["tokens"] == 40 and payload["prompt"] == "def "


def test_kill_and_resume_continues_exactly(tmp_path):
    """kill -9 at 3 seeded random points of a run that checkpoints every step (dropout on), each time
    resumed: the log then holds every step once with the losses of an uninterrupted run."""
    common = TINY + ["--max-steps", "30", "--log-interval", "1", "--ckpt-interval", "1", "--eval-interval", "100", "--dropout", "0.1", "--device", "cpu"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count in every run: the same float sums
    assert run_cli("train", *common, "--out-dir", str(straight), env=env).returncode == 0

    rng = random.Random(17)
    kill_after = sorted(rng.sample(range(2, 26), 3))
    for n, step in enumerate(kill_after):
        resume = ["--resume"] if n else []
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastgpt.cli", "train", *common, "--out-dir", str(killed), *resume],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        try:
            wait_for_log_step(killed / "log.jsonl", step, proc)
            time.sleep(rng.uniform(0.0, 0.02))  # a random point inside the next step or its checkpoint write
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, "killed mid-run"
        assert fg_train.load_checkpoint(killed / "ckpt.pt")["step"] < 30

    result = run_cli("train", *common, "--out-dir", str(killed), "--resume", env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in killed.iterdir()) == ["ckpt.pt", "log.jsonl"], "no lock or partial checkpoint left"
    a = {r["step"]: r for r in read_log(straight) if "loss" in r}
    b = {r["step"]: r for r in read_log(killed) if "loss" in r}
    assert sorted(b) == sorted(a) == list(range(1, 31)), "the resumed log has each step once"
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=1e-6), step
        assert b[step]["lr"] == a[step]["lr"]


@pytest.mark.slow
def test_torchrun_two_ranks_on_cpu_stay_in_sync(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "fastgpt.train", *TINY, "--max-steps", "4", "--log-interval", "2", "--eval-interval", "4", "--out-dir", str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(out)
    final = [r for r in log if "ranks_in_sync" in r]
    assert len(final) == 1 and final[0]["ranks_in_sync"] and len(final[0]["param_digests"]) == 2
    assert fg_train.load_checkpoint(out / "ckpt.pt")["step"] == 4
    assert len(fg_train.load_checkpoint(out / "ckpt.pt")["rng"]) == 2, "every rank's RNG state is kept"


# ---- bad input -----------------------------------------------------------------------------


def test_missing_and_empty_data_are_clear_errors(tmp_path):
    result = run_cli("train", "--data", str(tmp_path / "nope.txt"), "--out-dir", str(tmp_path / "o"), *TINY)
    assert result.returncode == 2 and "no such file or directory" in result.stderr
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(fg_train.TrainError, match="no data"):
        fg_train.train(parse("--data", str(empty), "--out-dir", str(tmp_path / "o"), *TINY))


def test_corpus_shorter_than_the_block_is_an_error(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("x" * 50)
    with pytest.raises(fg_train.TrainError, match="fewer than --block-size"):
        fg_train.train(parse("--data", str(short), "--out-dir", str(tmp_path / "o"), *TINY))


def test_resume_rejects_another_config_and_corrupt_checkpoints(trained, tmp_path):
    out, _ = trained
    other = tmp_path / "other"
    shutil.copytree(out, other)
    with pytest.raises(fg_train.TrainError, match="another model configuration .*n_embd: checkpoint 64 vs now 32"):
        fg_train.train(parse(*TINY, "--n-embd", "32", "--out-dir", str(other), "--resume"))
    data = (out / "ckpt.pt").read_bytes()
    ckpt = other / "ckpt.pt"
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(fg_train.TrainError, match="corrupt or incomplete"):
        fg_train.load_checkpoint(ckpt)
    mid = len(data) // 2
    ckpt.write_bytes(data[:mid] + bytes([data[mid] ^ 0x10]) + data[mid + 1 :])
    with pytest.raises(fg_train.TrainError, match="corrupt"):
        fg_train.load_checkpoint(ckpt)
    result = run_cli("train", *TINY, "--out-dir", str(tmp_path / "none"), "--resume")
    assert result.returncode == 2 and "no checkpoint" in result.stderr


# ---- pieces ---------------------------------------------------------------------------------


def test_learning_rate_warms_up_then_decays_to_the_floor():
    lrs = [fg_train.learning_rate(s, 1.0, 10, 100, 0.1) for s in range(0, 101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])), "monotone after warm-up"
    assert lrs[100] == pytest.approx(0.1) and lrs[55] == pytest.approx(0.55, abs=0.01)


def test_batches_are_a_pure_function_of_their_coordinates():
    a = fg_train.batch_offsets(1000, 64, 8, seed=1, step=5, micro=0, rank=0, split="train")
    assert torch.equal(a, fg_train.batch_offsets(1000, 64, 8, seed=1, step=5, micro=0, rank=0, split="train"))
    assert not torch.equal(a, fg_train.batch_offsets(1000, 64, 8, seed=1, step=6, micro=0, rank=0, split="train"))
    assert not torch.equal(a, fg_train.batch_offsets(1000, 64, 8, seed=1, step=5, micro=0, rank=1, split="train"))
    many = fg_train.batch_offsets(70, 64, 1000, seed=2, step=0, micro=0, rank=0, split="train")
    assert int(many.min()) == 0 and int(many.max()) == 70 - 64 - 1, "every valid start, none past the end"


def test_nanogpt_bin_data_and_text_folders(tmp_path):
    tokens = (np.arange(5000) % 300).astype(np.uint16)
    tokens[:4000].tofile(tmp_path / "train.bin")
    tokens[4000:].tofile(tmp_path / "val.bin")
    corpus = fg_train.load_corpus(str(tmp_path))
    assert len(corpus.train) == 4000 and len(corpus.val) == 1000 and corpus.vocab_size == 50304
    single = fg_train.load_corpus(str(tmp_path / "train.bin"))
    assert len(single.train) + len(single.val) == 4000
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("hello " * 100)
    (texts / "b.md").write_text("world " * 100)
    corpus = fg_train.load_corpus(str(texts))
    assert corpus.vocab_size == 256 and len(corpus.train) + len(corpus.val) == 1201
