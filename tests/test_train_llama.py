"""`fastgpt train --arch llama`: a tiny Llama-style model trains, resumes exactly, and `fastgpt generate` rebuilds it."""

import json
import math

import pytest

from fastgpt.app import train as fg_train
from fastgpt.app.generate import generate_text

TINY = ["--arch", "llama", "--n-layer", "1", "--n-head", "2", "--n-kv-head", "1", "--n-embd", "32", "--block-size", "32",
        "--batch-size", "4", "--max-steps", "6", "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "2",
        "--ckpt-interval", "3", "--device", "cpu", "--no-progress"]


def parse(*argv):
    import argparse

    p = argparse.ArgumentParser()
    fg_train.add_arguments(p)
    return p.parse_args(list(argv))


def losses(out):
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("def hello(world):\n    return world * 2  # a tiny corpus\n" * 200)
    return path


def test_llama_arch_trains_resumes_exactly_and_generates(corpus, tmp_path, monkeypatch):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    fg_train.train(parse(*TINY, "--data", str(corpus), "--out-dir", str(straight)))
    ckpt = fg_train.load_checkpoint(straight / "ckpt.pt")
    cfg = ckpt["model_config"]
    assert (cfg["norm"], cfg["positional"], cfg["mlp"], cfg["n_kv_head"], cfg["tie_embeddings"]) == ("rmsnorm", "rotary", "swiglu", 1, False)
    assert not any(k.endswith("wpe.weight") for k in ckpt["model"])
    a = losses(straight)
    assert sorted(a) == list(range(1, 7)) and all(math.isfinite(v) for v in a.values())
    assert abs(a[1] - math.log(256)) < 0.5 and a[6] < a[1], "starts near the uniform-byte loss and learns"

    class Crash(Exception):
        pass

    checkpoint = fg_train._checkpoint

    def crash_after_step_3(run, step):
        checkpoint(run, step)
        if step == 3:
            raise Crash

    monkeypatch.setattr(fg_train, "_checkpoint", crash_after_step_3)
    with pytest.raises(Crash):
        fg_train.train(parse(*TINY, "--data", str(corpus), "--out-dir", str(crashed)))
    monkeypatch.setattr(fg_train, "_checkpoint", checkpoint)
    with pytest.raises(fg_train.TrainError, match="another model configuration .*norm: checkpoint 'rmsnorm' vs now 'layernorm'"):
        fg_train.train(parse(*TINY, "--arch", "gpt2", "--data", str(corpus), "--out-dir", str(crashed), "--resume"))
    fg_train.train(parse(*TINY, "--data", str(corpus), "--out-dir", str(crashed), "--resume"))
    b = losses(crashed)
    assert sorted(b) == sorted(a)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), step

    result = generate_text(str(straight / "ckpt.pt"), "def ", 12, 0.8, None, 0, "cpu")
    assert result["tokens"] == 12


def test_bad_arch_flags_are_one_line_errors(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        parse("--arch", "gpt3")
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and "--arch" in err and "gpt2, llama" in err
    with pytest.raises(fg_train.TrainError, match=r"--n-kv-head \(3\) must divide --n-head \(2\)"):
        fg_train.train(parse(*TINY, "--n-kv-head", "3", "--data", str(corpus), "--out-dir", str(tmp_path / "o")))
    with pytest.raises(fg_train.TrainError, match="--arch llama needs an even head size"):
        fg_train.train(parse(*TINY, "--n-embd", "30", "--data", str(corpus), "--out-dir", str(tmp_path / "o")))
