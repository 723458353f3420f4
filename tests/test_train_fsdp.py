"""`fastgpt train --fsdp` (issue 14) on CPU with gloo: 2 ranks under torchrun (free ports via --standalone).

One uninterrupted 20-step FSDP run (module fixture) is the yardstick: a single-process oracle written
here must give its losses; a run with activation checkpointing, killed with SIGKILL and resumed, must
give them again; its consolidated checkpoint must load in `fastgpt generate` and reproduce its final
validation loss."""

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgpt.app import train as fg_train
from train_helpers import wait_for_log_step
from fastgpt.app import train_fsdp

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4", "--no-progress", "--device", "cpu"]
COMMON = TINY + ["--max-steps", str(STEPS), "--log-interval", "1", "--eval-interval", str(STEPS), "--eval-iters", "2", "--seed", "5"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count in every run: the same float sums

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def corpus(tmp: Path) -> Path:
    """A small fixed text corpus (fastgpt's own sources): quicker to load than the default 8 MB."""
    path = tmp / "corpus.txt"
    path.write_bytes(b"\n".join(p.read_bytes() for p in sorted((REPO / "fastgpt").glob("*.py")))[: 400_000])
    return path


def torchrun_cmd(out: Path, data: Path, *extra, nproc: int = 2):
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "-m", "fastgpt.train", "--fsdp", *COMMON, "--data", str(data), "--out-dir", str(out), *extra,
    ]


def losses(out: Path):
    return {r["step"]: r["loss"] for r in (json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()) if "loss" in r}


def records(out: Path, key: str):
    return [r for r in (json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()) if key in r]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    data, out = corpus(tmp), tmp / "out"
    result = subprocess.run(torchrun_cmd(out, data, "--ckpt-interval", "10"), capture_output=True, text=True, timeout=300, env=ENV)
    log = (out / "log.jsonl").read_text() if (out / "log.jsonl").exists() else "(no log)"
    assert result.returncode == 0, result.stderr[-8000:] + "\nLOG:\n" + log
    return data, out


def single_process_losses(data: Path, world_size: int = 2):
    """The oracle: one process, one model, the batches of every rank of a ``world_size`` run, each rank's
    mean loss divided by world_size before backward (what FSDP's gradient averaging computes)."""
    from fastgpt.model import GPT, GPTConfig

    corp = fg_train.load_corpus(str(data))
    shards = [fg_train.rank_shard(corp, 32, r, world_size) for r in range(world_size)]
    torch.manual_seed(5)
    model = GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    out = {}
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = fg_train.learning_rate(step, 1e-3, 1, STEPS, 0.1)
        total = 0.0
        for r, shard in enumerate(shards):
            x, y = fg_train.get_batch(shard, 32, fg_train.batch_offsets(len(shard), 32, 4, 5, step, 0, r, "train"), torch.device("cpu"))
            loss = model(x, y)[1]
            (loss / world_size).backward()
            total += loss.item() / world_size
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out[step + 1] = total
    return out


def test_fsdp_losses_match_single_process_training(fsdp_run):
    data, out = fsdp_run
    got, want = losses(out), single_process_losses(data)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step  # measured: 1e-7
    assert got[STEPS] < got[1] - 0.2, "it learns"


def test_fsdp_memory_report_shows_sharded_state(fsdp_run):
    _, out = fsdp_run
    reports = records(out, "memory")
    assert [r["step"] for r in reports] == [1, STEPS]
    ranks = reports[-1]["memory"]
    full = 4 * sum(p.numel() for p in {id(p): p for p in _model().parameters()}.values())
    assert [m["rank"] for m in ranks] == [0, 1] and all(m["peak_cuda_bytes"] is None for m in ranks)
    assert sum(m["param_bytes"] for m in ranks) >= full and all(m["param_bytes"] < 0.6 * full for m in ranks), (ranks, full)
    assert all(m["optimizer_bytes"] >= 2 * m["param_bytes"] for m in ranks), "AdamW's two moments per shard"


def _model():
    from fastgpt.model import GPT, GPTConfig

    return GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False))


def test_fsdp_kill_and_resume_with_activation_checkpointing_reproduces_the_run(fsdp_run, tmp_path):
    """SIGKILL to every rank at a seeded random step, then --resume: the losses before the kill show that
    activation checkpointing changes nothing, those after it that the resume is exact."""
    data, reference = fsdp_run
    out = tmp_path / "out"
    extra = ["--activation-checkpointing", "--ckpt-interval", "3"]
    kill_after = random.Random(14).randrange(6, 14)
    proc = subprocess.Popen(torchrun_cmd(out, data, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    try:
        wait_for_log_step(out / "log.jsonl", kill_after, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks at once, as a node failure
        proc.wait()
    before = losses(out)
    meta = train_fsdp.load_meta(out)
    assert 3 <= meta["step"] < STEPS and meta["step"] % 3 == 0, meta["step"]
    want = losses(reference)
    for step, loss in before.items():
        assert loss == pytest.approx(want[step], rel=1e-6, abs=1e-6), f"activation checkpointing changed step {step}"

    result = subprocess.run(torchrun_cmd(out, data, *extra, "--resume"), capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-8000:]
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1)), "each step logged once"
    for step in range(meta["step"] + 1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), f"resumed step {step}"
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.dcp", "log.jsonl"], "no lock, no temporary folder left"


def test_consolidated_checkpoint_loads_in_generate_and_reproduces_the_val_loss(fsdp_run, tmp_path):
    from fastgpt.app.generate import generate_text

    data, reference = fsdp_run
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    summary = fg_train.train(fg_train_args("--out-dir", str(out), "--consolidate"))
    ckpt = fg_train.load_checkpoint(out / "ckpt.pt")
    assert summary["consolidated"] == str(out / "ckpt.pt") and ckpt["step"] == STEPS and len(ckpt["rng"]) == 2
    model = _model()
    model.load_state_dict(ckpt["model"])  # strict: every key, no FSDP or checkpoint-wrapper prefixes
    corp = fg_train.load_corpus(str(data))
    model.eval()
    with torch.no_grad():
        val = sum(
            model(*fg_train.get_batch(corp.val, 32, fg_train.batch_offsets(len(corp.val), 32, 4, 5, 0, i, 0, "val"), torch.device("cpu")))[1].item()
            for i in range(2)
        ) / 2
    assert val == pytest.approx(records(reference, "val_loss")[-1]["val_loss"], rel=1e-5)
    assert generate_text(str(out / "ckpt.pt"), "def ", 8, 0.8, None, 0)["tokens"] == 8
    with pytest.raises(fg_train.TrainError, match="exists; pass --overwrite"):
        fg_train.train(fg_train_args("--out-dir", str(out), "--consolidate"))


def fg_train_args(*argv):
    import argparse

    p = argparse.ArgumentParser()
    fg_train.add_arguments(p)
    return p.parse_args(list(argv))


def test_resume_on_another_world_size_reshards_only_when_allowed(fsdp_run, tmp_path):
    """2 ranks -> 1 process (a process group of one): DCP reshards; refused without --allow-config-change."""
    data, reference = fsdp_run
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    args = ["--fsdp", *COMMON, "--data", str(data), "--out-dir", str(out), "--resume", "--max-steps", str(STEPS + 2)]
    with pytest.raises(fg_train.TrainError, match=r"world size \(torchrun --nproc_per_node\) 2 -> 1"):
        fg_train.train(fg_train_args(*args))
    fg_train.train(fg_train_args(*args, "--allow-config-change"))
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 3)) and got[STEPS + 2] < got[1]


class Evil:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_dcp_metadata_file_is_refused_without_running(fsdp_run, tmp_path):
    """Even with digests that match (an attacker rewrites meta.pt too), .metadata never runs code."""
    _, reference = fsdp_run
    out, marker = tmp_path / "out", tmp_path / "marker"
    shutil.copytree(reference, out)
    Evil.marker = str(marker)
    folder = out / train_fsdp.DCP_NAME
    (folder / ".metadata").write_bytes(pickle.dumps(Evil()))
    meta = train_fsdp.load_meta(out)
    meta.pop("format")
    meta["files"][".metadata"] = train_fsdp._sha256(folder / ".metadata")
    fg_train.save_checkpoint(folder / train_fsdp.META_NAME, meta, fmt=train_fsdp.FSDP_FORMAT)
    with pytest.raises(fg_train.TrainError, match=r"refused by the safe loader \((io|builtins)\.open is not allowed"):
        fg_train.train(fg_train_args("--out-dir", str(out), "--consolidate"))
    assert not marker.exists() and not (out / "ckpt.pt").exists()
    (folder / "__0_0.distcp").write_bytes(b"x")  # and a damaged shard is caught by its digest
    with pytest.raises(fg_train.TrainError, match=r"corrupt \(.*__0_0.distcp"):
        fg_train.train(fg_train_args("--out-dir", str(out), "--consolidate"))


def test_fastgpt_ops_see_plain_unsharded_tensors_inside_fsdp_blocks():
    """Under fully_shard, parameters are DTensor shards between calls, but inside each block's forward
    (where fastgpt's ops run) they are whole plain tensors, and the ops run on them, forward and backward."""
    import argparse

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from fastgpt import backends

    model = _model()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        args = argparse.Namespace(fsdp=True, activation_checkpointing=True, dtype=None)
        train_fsdp.prepare_model(model, torch.device("cpu"), args)
        seen = []
        for block in model.transformer.h:
            block.register_forward_pre_hook(lambda m, a, k: seen.append(type(m.ln_1.weight)), with_kwargs=True)
        assert isinstance(model.transformer.h[0].ln_1.weight, DTensor)
        x = torch.randint(0, 256, (2, 16))
        with backends.use_backend("reference"):
            logits, loss = model(x, x)
            loss.backward()
        assert seen and all(t is torch.nn.Parameter or t is torch.Tensor for t in seen), seen
        assert backends.last_choice("layer_norm") is not None and backends.last_choice("attention") is not None
        assert all(isinstance(p.grad, DTensor) for p in model.parameters()), "gradients are sharded again"
        assert torch.isfinite(loss)
    finally:
        dist.destroy_process_group()


def test_a_crash_mid_save_leaves_a_complete_checkpoint(fsdp_run, tmp_path):
    """The two windows of a save: shards half-written (ckpt.dcp.tmp without COMPLETE: ignored and
    removed), and between the renames (only ckpt.dcp.old: put back)."""
    _, reference = fsdp_run
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    final = out / train_fsdp.DCP_NAME
    (out / "ckpt.dcp.tmp").mkdir()
    (out / "ckpt.dcp.tmp" / "__0_0.distcp").write_bytes(b"half")
    train_fsdp.recover(out)
    assert not (out / "ckpt.dcp.tmp").exists() and train_fsdp.load_meta(out)["step"] == STEPS
    final.rename(out / "ckpt.dcp.old")
    with pytest.raises(fg_train.TrainError, match="no complete FSDP checkpoint"):
        train_fsdp.load_meta(out)
    train_fsdp.recover(out)
    assert train_fsdp.load_meta(out)["step"] == STEPS and not (out / "ckpt.dcp.old").exists()
    (final / train_fsdp.DONE_NAME).unlink()  # a folder that was never sealed is no checkpoint
    with pytest.raises(fg_train.TrainError, match="no complete FSDP checkpoint"):
        train_fsdp.load_meta(out)
