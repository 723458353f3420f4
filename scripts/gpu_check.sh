#!/usr/bin/env bash
# Validate fastgpt on a machine with a CUDA GPU and no network (DESIGN.md section 6).
#
#   bash scripts/gpu_check.sh            # from the repository root, inside the environment to test
#
# Installs without touching the network, prints `fastgpt info`, runs the whole test suite (the GPU
# parity matrix included) and writes one JSON summary per GPU kind under benchmarks/results/.
set -uo pipefail

cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
OUT_DIR="${OUT_DIR:-benchmarks/results}"
mkdir -p "$OUT_DIR"
LOG_DIR="$(mktemp -d)"

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a GPU machine')" || exit 1

pip install --no-deps --no-build-isolation -e . >"$LOG_DIR/install.log" 2>&1 || { cat "$LOG_DIR/install.log"; exit 1; }
fastgpt info --json "$LOG_DIR/info.json"

pytest -q -rs --junitxml="$LOG_DIR/tests.xml" | tee "$LOG_DIR/tests.txt"
tests_rc=${PIPESTATUS[0]}

python - "$LOG_DIR" "$OUT_DIR" "$tests_rc" <<'PY'
import datetime, json, re, sys, xml.etree.ElementTree as ET
log_dir, out_dir, tests_rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
info = json.load(open(f"{log_dir}/info.json"))
suite = ET.parse(f"{log_dir}/tests.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
summary = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
gpu = info["devices"][0]["name"] if info["devices"] else "unknown"
kind = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
result = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "gpu": gpu,
    "versions": {k: info[k] for k in ("fastgpt", "python", "torch", "torch_cuda", "triton")},
    "info": info,
    "tests": {**summary, "exit_code": tests_rc},
}
path = f"{out_dir}/{kind}.json"
json.dump(result, open(path, "w"), indent=2)
print(f"wrote {path}")
PY
exit "$tests_rc"
