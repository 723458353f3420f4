#!/usr/bin/env bash
# Validate fastgpt on a machine with a CUDA GPU and no network (DESIGN.md section 6).
#
#   bash scripts/gpu_check.sh            # from the repository root, inside the environment to test
#
# Installs without touching the network (building the CUDA extension ahead of time), prints
# `fastgpt info`, runs the whole test suite (the GPU parity matrix included), the CUDA parity tests
# under compute-sanitizer's memcheck, the benchmark suites (`pytest benchmarks --benchmark-only`) and
# `fastgpt bench --quick`, and writes one JSON summary per GPU kind under benchmarks/results/
# (<gpu>.json: device, versions, date, test counts, every benchmark figure and ratio; <gpu>.png: the
# speed-up chart). Each stage is bounded in time so that the whole check stays under 10 minutes on
# an H100; benchmark cases past their module's budget are skipped and listed as such in the JSON.
#
# Environment knobs: BENCH_TIER (quick|default|full, default "default"), BENCH_BUDGET_S (seconds per
# benchmark module, default 60), BENCH_TIMEOUT_S (hard limit of the benchmark run, default 240),
# OUT_DIR (default benchmarks/results).
set -uo pipefail

cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
OUT_DIR="${OUT_DIR:-benchmarks/results}"
BENCH_TIER="${BENCH_TIER:-default}"
BENCH_BUDGET_S="${BENCH_BUDGET_S:-60}"
BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-240}"
mkdir -p "$OUT_DIR"
LOG_DIR="$(mktemp -d)"
START=$(date +%s)
stage() { echo "== $1 ($(( $(date +%s) - START ))s)"; echo "$1 $(( $(date +%s) - START ))" >>"$LOG_DIR/stages.txt"; }

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a GPU machine')" || exit 1

stage "install"
# FASTGPT_BUILD_CUDA=1 builds the CUDA extension ahead of time, so no test pays the JIT build
FASTGPT_BUILD_CUDA=1 pip install --no-deps --no-build-isolation -e . >"$LOG_DIR/install.log" 2>&1 || { cat "$LOG_DIR/install.log"; exit 1; }
fastgpt info --json "$LOG_DIR/info.json"

stage "tests"
pytest -q -rs --junitxml="$LOG_DIR/tests.xml" | tee "$LOG_DIR/tests.txt"
tests_rc=${PIPESTATUS[0]}

# the CUDA kernels once under compute-sanitizer's memcheck (out-of-bounds and misaligned accesses)
stage "compute-sanitizer"
sanitizer_rc=0
if command -v compute-sanitizer >/dev/null 2>&1 || [ -x "$CUDA_HOME/bin/compute-sanitizer" ]; then
    SANITIZER="$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")"
    timeout 300 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 \
        python -m pytest -q -x tests/test_cuda_gpu.py -k "not 4097 and not 65536" >"$LOG_DIR/sanitizer.txt" 2>&1
    sanitizer_rc=$?
    tail -5 "$LOG_DIR/sanitizer.txt"
else
    echo "compute-sanitizer not found: memcheck skipped" | tee "$LOG_DIR/sanitizer.txt"
fi

# The CPU dispatch-overhead suite measures the host path; CPU machines report it (fastgpt bench).
stage "benchmarks"
timeout --signal=INT "$BENCH_TIMEOUT_S" pytest benchmarks --benchmark-only -q -rs -p no:cacheprovider \
    --ignore=benchmarks/test_bench_dispatch.py \
    --fastgpt-tier "$BENCH_TIER" --fastgpt-budget-s "$BENCH_BUDGET_S" \
    --benchmark-json="$LOG_DIR/benchmarks.json" --benchmark-columns=median,rounds | tee "$LOG_DIR/benchmarks.txt"
bench_rc=${PIPESTATUS[0]}

stage "fastgpt bench"
GPU_KIND=$(python -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")
timeout --signal=INT 120 fastgpt bench --quick --no-progress --json "$LOG_DIR/fastgpt_bench.json" \
    --plot "$OUT_DIR/$GPU_KIND.png" | tee "$LOG_DIR/fastgpt_bench.txt"
cli_rc=${PIPESTATUS[0]}
stage "done"

python - "$LOG_DIR" "$OUT_DIR" "$tests_rc" "$bench_rc" "$cli_rc" "$GPU_KIND" "$sanitizer_rc" <<'PY'
import datetime, json, os, sys, xml.etree.ElementTree as ET
log_dir, out_dir, tests_rc, bench_rc, cli_rc, kind, sanitizer_rc = sys.argv[1:8]
def load(name):
    path = os.path.join(log_dir, name)
    return json.load(open(path)) if os.path.exists(path) else None
info = load("info.json")
suite = ET.parse(f"{log_dir}/tests.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
summary = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
bench = load("benchmarks.json")
entries = []
if bench:
    for b in bench.get("benchmarks", []):
        stats = {k: b["stats"].get(k) for k in ("min", "median", "mean", "rounds")}
        entries.append({"name": b["name"], "group": b["group"], "extra_info": b["extra_info"], "host_stats_s": stats})
stages = [line.rsplit(None, 1) for line in open(f"{log_dir}/stages.txt")]
result = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "gpu": info["devices"][0]["name"] if info["devices"] else "unknown",
    "versions": {k: info[k] for k in ("fastgpt", "python", "torch", "torch_cuda", "triton")},
    "info": info,
    "tests": {**summary, "exit_code": int(tests_rc)},
    "compute_sanitizer": {"exit_code": int(sanitizer_rc), "log_tail": open(f"{log_dir}/sanitizer.txt").read()[-2000:]},
    "benchmarks": {
        "exit_code": int(bench_rc),
        "command": "pytest benchmarks --benchmark-only (see scripts/gpu_check.sh for the tier and budget)",
        "summary": (bench or {}).get("fastgpt"),
        "entries": entries,
    },
    "fastgpt_bench": {"exit_code": int(cli_rc), "report": load("fastgpt_bench.json")},
    "stage_start_s": {name: int(t) for name, t in stages},
}
path = f"{out_dir}/{kind}.json"
json.dump(result, open(path, "w"), indent=1, default=str)
print(f"wrote {path} ({result['stage_start_s'].get('done')} s in all)")
PY
# the check fails when the tests, the benchmark suite (a benchmark comparing different computations
# fails it) or fastgpt bench's parity check fail; a timed-out benchmark stage (124) fails it too
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$cli_rc" -eq 0 ] && [ "$sanitizer_rc" -eq 0 ]
