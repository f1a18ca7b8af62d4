#!/usr/bin/env bash
# The CUDA check in one command, sized for one 10-minute call of a lent GPU machine (8 minutes in all):
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out FILE] [--work DIR]
#
# On a machine with an NVIDIA GPU it
#   1. installs phi-onnx[cuda,reference,dev] from this checkout into a fresh virtual environment
#      (extra pip arguments in GPU_CHECK_PIP_ARGS, e.g. "--no-index --find-links /wheels" offline),
#   2. runs the tests marked cuda (`pytest -m cuda`),
#   3. exports the bundled tiny-phi3 and a random 0.95B Phi-3 (make_random_checkpoint.py --preset
#      phi3-mid) to cuda-fp16 and cuda-int4,
#   4. checks the tiny exports against transformers (`phi-onnx verify --device cuda`),
#   5. measures phi-onnx's two backends against raw onnxruntime-genai on every export (prompt and decode
#      tokens/s, and batched decode; gpu_check_speed.py),
# and writes every figure into one JSON file (default gpu_check.json): each step's exit code and time,
# the pytest summary, the verification figures, the speeds, nvidia-smi and the package versions.
# Every step has its own timeout and the whole run stops starting steps after GPU_CHECK_BUDGET seconds
# (480); a failed step is recorded and the next one runs.
#
# --dry-run (or GPU_CHECK_DRY_RUN=1) runs on CPU in the current environment: it checks that every
# step's command resolves, exports and verifies the tiny model only (cpu-int4), measures it
# on CPU, and writes the same JSON with "gpu": false. CI runs it (tests/test_gpu_check.py).
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DRY="${GPU_CHECK_DRY_RUN:-0}"
OUT_JSON="gpu_check.json"
WORK=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT_JSON="$2"; shift ;;
        --work) WORK="$2"; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ "$DRY" = "1" ] || [ "$DRY" = "true" ] && DRY=1 || DRY=0
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
mkdir -p "$WORK/logs" "$WORK/json"
OUT_JSON="$(cd "$(dirname "$OUT_JSON")" && pwd)/$(basename "$OUT_JSON")"
BUDGET="${GPU_CHECK_BUDGET:-480}"
STARTED=$SECONDS
: > "$WORK/steps.tsv"
export PHI_ONNX_HOME="$WORK/store" PYTHONUNBUFFERED=1

# step NAME TIMEOUT_SECONDS COMMAND...: run it with its log in logs/NAME.log; record exit code and time.
step() {
    local name="$1" limit="$2" begin=$SECONDS rc
    shift 2
    if [ $((SECONDS - STARTED + 5)) -gt "$BUDGET" ]; then
        printf '%s\t%s\t%s\n' "$name" "skipped" 0 >> "$WORK/steps.tsv"
        echo "[gpu_check] $name: skipped (out of time)" >&2
        return 0
    fi
    local left=$((BUDGET - (SECONDS - STARTED)))
    [ "$limit" -gt "$left" ] && limit=$left
    echo "[gpu_check] $name (at most ${limit} s)" >&2
    timeout --kill-after=10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - begin)) >> "$WORK/steps.tsv"
    [ "$rc" = 0 ] || echo "[gpu_check] $name: exit code $rc (log: $WORK/logs/$name.log)" >&2
    return 0
}

if [ "$DRY" = 1 ]; then
    PY="$(command -v python || command -v python3)"
    DEVICE=cpu
    VARIANTS="cpu-int4:int4:cpu"
else
    PY="$WORK/venv/bin/python"
    DEVICE=cuda
    VARIANTS="cuda-fp16:fp16:cuda cuda-int4:int4:cuda"
    step install 300 bash -c "python3 -m venv '$WORK/venv' && '$WORK/venv/bin/pip' install --quiet \
        ${GPU_CHECK_PIP_ARGS:-} '$ROOT[cuda,reference,dev]'"
fi
BIN="$(dirname "$PY")"
PHI="$BIN/phi-onnx"

step tools 30 bash -c "command -v '$PY' && '$PY' -m pytest --version && '$PHI' --version && \
    '$PY' -c 'import onnxruntime, onnxruntime_genai, torch, transformers' && \
    '$PY' '$ROOT/benchmarks/make_random_checkpoint.py' --help >/dev/null && \
    '$PY' '$ROOT/benchmarks/gpu_check_speed.py' --help >/dev/null"
step doctor 60 "$PHI" doctor --json
if [ "$DRY" = 1 ]; then
    step pytest_cuda 60 "$PY" -m pytest "$ROOT/tests" -m cuda --collect-only -q -p no:cacheprovider
else
    step nvidia_smi 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    step pytest_cuda 150 "$PY" -m pytest "$ROOT/tests" -m cuda -q -p no:cacheprovider -n 4
fi

for spec in $VARIANTS; do
    IFS=: read -r variant precision device <<< "$spec"
    step "export_tiny_$variant" 60 "$PHI" export tiny-phi3 -o "$WORK/tiny-$variant" --precision "$precision" \
        --device "$device" --json
    step "verify_tiny_$variant" 120 bash -c "'$PHI' verify '$WORK/tiny-$variant' --device $DEVICE --no-record \
        --json --new-tokens 16 --text-tokens 512 > '$WORK/json/verify_tiny_$variant.json'"
done
if [ "$DRY" = 0 ]; then
    step make_mid 90 "$PY" "$ROOT/benchmarks/make_random_checkpoint.py" --preset phi3-mid --out "$WORK/mid-ckpt" \
        --threads 8
    for spec in $VARIANTS; do
        IFS=: read -r variant precision device <<< "$spec"
        step "export_mid_$variant" 120 "$PHI" export "$WORK/mid-ckpt" -o "$WORK/mid-$variant" \
            --precision "$precision" --device "$device" --json
    done
fi

if [ "$DRY" = 1 ]; then SPEED_ARGS="--prompt-tokens 32 --new-tokens 16 --batch 4 --runs 1"
else SPEED_ARGS="--prompt-tokens 128 --new-tokens 128 --batch 8 --runs 3"; fi
for folder in "$WORK"/tiny-* "$WORK"/mid-cuda-*; do
    [ -d "$folder" ] || continue
    name="speed_$(basename "$folder")"
    # shellcheck disable=SC2086 # SPEED_ARGS is a list of words
    step "$name" 90 bash -c "'$PY' '$ROOT/benchmarks/gpu_check_speed.py' '$folder' --device $DEVICE $SPEED_ARGS \
        > '$WORK/json/$name.json'"
done

"$PY" - "$WORK" "$OUT_JSON" "$DRY" $((SECONDS - STARTED)) <<'EOF'
import json, re, sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

work, out, dry, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, took = line.split("\t")
    log = work / "logs" / f"{name}.log"
    tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.is_file() else []
    steps.append({"name": name, "exit_code": None if rc == "skipped" else int(rc), "skipped": rc == "skipped",
                  "seconds": int(took), "log_tail": tail})
results = {}
for path in sorted((work / "json").glob("*.json")):
    try:
        results[path.stem] = json.loads(path.read_text())
    except ValueError:
        results[path.stem] = None  # the step failed; its exit code and log tail say why
pytest_log = work / "logs" / "pytest_cuda.log"
summary = pytest_log.read_text(errors="replace").strip().splitlines()[-1:] if pytest_log.is_file() else []
counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)",
                                                  summary[0] if summary else "")}
versions = {}
for dist in ("phi-onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda", "torch",
             "transformers"):
    try:
        versions[dist] = version(dist)
    except PackageNotFoundError:
        pass
smi = work / "logs" / "nvidia_smi.log"
report = {
    "gpu": not dry,
    "dry_run": dry,
    "seconds": seconds,
    "passed": all(s["exit_code"] == 0 for s in steps),
    "nvidia_smi": smi.read_text().strip() if smi.is_file() else None,
    "versions": versions,
    "pytest_cuda": {"summary": summary[0] if summary else None, "counts": counts},
    "verify": {k.removeprefix("verify_"): v for k, v in results.items() if k.startswith("verify_")},
    "speed": {k.removeprefix("speed_"): v for k, v in results.items() if k.startswith("speed_")},
    "steps": steps,
}
out.write_text(json.dumps(report, indent=2) + "\n")
print(f"[gpu_check] wrote {out} in {seconds} s: " + ("all steps passed" if report["passed"] else
      "failed steps: " + ", ".join(s["name"] for s in steps if s["exit_code"] != 0)), file=sys.stderr)
sys.exit(0 if report["passed"] else 1)
EOF
