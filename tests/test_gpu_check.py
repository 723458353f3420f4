"""scripts/gpu_check.py, the budgeted GPU check, run in its CPU plan mode: stages, limits, JSON after each."""

import importlib.util
import json
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)


def _py(code):
    return [sys.executable, "-c", code]


def test_plan_fits_the_machine_limit(gc):
    plan = gc.build_plan()
    names = [s.name for s in plan]
    assert names[:4] == ["install", "install_plain", "info", "gpu_tests"], names  # in order of value
    assert len(set(names)) == len(names)
    # install_plain runs only instead of install; extra stages use what is left
    assert sum(s.budget_s for s in plan if s.name != "install_plain" and not s.extra) <= gc.TOTAL_BUDGET_S <= 540
    assert any(s.extra for s in plan)
    assert all("--no-index" in s.cmd for s in plan if s.name.startswith("install"))  # nothing from the network


def test_json_after_every_stage_and_a_stage_killed_by_its_limit(gc, tmp_path):
    """Snapshots written before/after each stage are valid JSON holding every finished stage; the stage
    that overruns its limit is killed (with its children) and recorded as timeout; GPU stages skip."""
    marker = tmp_path / "child_alive"
    child = tmp_path / "child.py"
    child.write_text(f"import time\ntime.sleep(4)\nopen({str(marker)!r}, 'w').close()\n")
    stages = [
        gc.Stage("first", 20, _py("print('hello from first')"), gpu=False,
                 collect=lambda work: {"work_is_dir": os.path.isdir(work)}),
        # a child in the same process group would outlive a plain kill of the parent
        gc.Stage("overrun", 1.5, _py(f"import subprocess, sys, time; subprocess.Popen([sys.executable, {str(child)!r}]); "
                                     "time.sleep(60)"), gpu=False),
        gc.Stage("on_gpu", 20, _py("raise SystemExit(3)"), gpu=True),
        gc.Stage("failing", 20, _py("raise SystemExit(3)"), gpu=False),
        gc.Stage("conditional", 20, _py("pass"), gpu=False, when=lambda done: done["failing"]["status"] == "passed"),
    ]
    snapshots = []

    def on_write(data):
        on_disk = json.loads((tmp_path / gc.JSON_NAME).read_text())
        assert on_disk["stages"] == data["stages"]
        snapshots.append(data)

    start = time.monotonic()
    results = gc.run_plan(stages, str(tmp_path), total_budget_s=60, gpu=False, on_write=on_write)
    assert time.monotonic() - start < 20  # the 60 s sleeper did not run to its end

    st = results["stages"]
    assert st["first"]["status"] == "passed" and st["first"]["work_is_dir"] is True
    assert st["overrun"]["status"] == "timeout" and 1.5 <= st["overrun"]["seconds"] < 10
    assert st["on_gpu"] == {"budget_s": 20, "status": "skipped", "reason": "plan run: no GPU"}
    assert st["failing"]["status"] == "failed" and st["failing"]["rc"] == 3
    assert st["conditional"]["status"] == "skipped"
    assert results["complete"] is True and results["mode"] == "plan"

    # while "overrun" ran, the JSON already held "first" as passed and "overrun" as running
    running = [s for s in snapshots if s["stages"].get("overrun", {}).get("status") == "running"]
    assert running and running[0]["stages"]["first"]["status"] == "passed" and not running[0]["complete"]
    # after the kill, the snapshot records the timeout before anything else runs
    after = [s for s in snapshots if s["stages"].get("overrun", {}).get("status") == "timeout"]
    assert after and "on_gpu" not in after[0]["stages"]
    # stage order in the JSON follows the plan
    assert list(st) == [s.name for s in stages]

    log = (tmp_path / gc.LOG_NAME).read_text()
    assert "hello from first" in log and "== overrun: timeout" in log
    time.sleep(4)
    assert not marker.exists(), "the killed stage's child process survived"


def test_total_budget_skips_what_does_not_fit(gc, tmp_path):
    stages = [gc.Stage("first", 30, _py("import time; time.sleep(2)"), gpu=False),
              gc.Stage("later", 30, _py("pass"), gpu=False)]
    results = gc.run_plan(stages, str(tmp_path), total_budget_s=gc.MIN_STAGE_S + 1, gpu=False)
    assert results["stages"]["first"]["status"] == "passed"
    assert results["stages"]["later"]["status"] == "skipped"
    assert "total budget" in results["stages"]["later"]["reason"]


def test_tuning_log_lines_are_collected(gc, tmp_path):
    stage = gc.Stage("tune", 20, _py(
        "import json, os; f = open(os.environ['FASTGPT_TUNE_LOG'], 'a'); "
        "f.write(json.dumps({'kernel': 'fwd', 'key': 'k1', 'config': 'A'}) + '\\n'); "
        "f.write(json.dumps({'kernel': 'fwd', 'key': 'k1', 'config': 'B'}) + '\\n'); f.write('{cut')"), gpu=False)
    results = gc.run_plan([stage], str(tmp_path), gpu=False)
    assert results["tuning"] == [{"kernel": "fwd", "key": "k1", "config": "B"}]


def test_cpu_plan_run_of_the_real_plan(gc, tmp_path):
    """The script's own plan on this machine: GPU stages skip, `fastgpt info` runs, the JSON is complete."""
    rc = gc.main(["--cpu", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / gc.JSON_NAME).read_text())
    assert rc == 0, data
    assert data["complete"] and [p["name"] for p in data["plan"]] == list(data["stages"])
    assert data["stages"]["info"]["status"] == "passed"
    assert data["stages"]["info"]["info"]["torch"] and data["versions"]["torch"] and data["gpu"] == "none"
    assert all(s["status"] == "skipped" for n, s in data["stages"].items() if n != "info")


def test_bad_flags(gc, tmp_path):
    with pytest.raises(SystemExit):
        gc.main(["--cpu", "--out-dir", str(tmp_path), "--only", "nonsense"])
    with pytest.raises(SystemExit):
        gc.main(["--cpu", "--out-dir", str(tmp_path), "--total-budget-s", "0"])
