#!/usr/bin/env bash
# GPU check for when a CUDA machine is lent (about 5 minutes): the CUDA and mixed-precision
# tests, then scripts/bench_meta_step.py at GPU sizes (256 px, 8 support + 8 query images,
# K=5) in fp32, bf16 and fp16; writes OUT/summary.md with the card's name and the bf16/fp16
# timings against fp32.
#
#   scripts/gpu_check.sh [OUT]          # OUT defaults to outputs/gpu_check
#   PY=/path/to/venv/bin/python scripts/gpu_check.sh
#
# Without a CUDA device it says so and exits 0 (nothing to check). Each stage has its own
# time limit, so a hung stage cannot eat the machine's lease; a failed stage is reported in
# the summary and makes the script exit 1 after the summary is written.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PY:-python}
OUT=${1:-outputs/gpu_check}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing to check, exiting"
    exit 0
fi

mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
failed=0
CARD=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
[ -n "$CARD" ] || CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "- card: $CARD"
    echo "- torch: $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
} > "$SUMMARY"

stage() {  # stage NAME SECONDS CMD...: run with a time limit, log to OUT/NAME.log, note the result
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "gpu_check: $name ..."
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local verdict="ok"
    [ $rc -eq 0 ] || { verdict="FAILED (exit $rc$([ $rc -eq 124 ] && echo ', time limit'))"; failed=1; }
    echo "- $name: $verdict in $((SECONDS - t0)) s (log: $name.log)" >> "$SUMMARY"
    echo "gpu_check: $name: $verdict"
    return $rc
}

# 1. The tests that skip without CUDA (marked `cuda`: the fp32/bf16/fp16 meta-gradient and training
#    tests of test_precision.py and test_algorithms_precision.py, and any added later). The CPU
#    mixed-precision tests run on CI already.
stage tests_cuda 150 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests

# 2. The benchmark at GPU sizes. fp32: every configuration, with peak memory (fresh process each);
#    bf16 and fp16: the project's configurations only, time only, to fit the 5 minutes.
BENCH=(scripts/bench_meta_step.py --device cuda --size 256 --shots 8 --query 8 --inner-steps 5 --reps 3
       --algorithms maml fomaml anil --backends higher func)
stage bench_fp32 110 "$PY" "${BENCH[@]}" --precision 32 --json "$OUT/bench_32.json"
stage bench_bf16 40 "$PY" "${BENCH[@]}" --precision bf16 --no-floors --no-memory --json "$OUT/bench_bf16.json"
stage bench_fp16 40 "$PY" "${BENCH[@]}" --precision 16 --no-floors --no-memory --json "$OUT/bench_16.json"

{
    echo
    for p in fp32 bf16 fp16; do
        if [ -f "$OUT/bench_$p.log" ]; then
            echo "## bench_meta_step, $p"
            echo
            grep -E '^(#|\||- )' "$OUT/bench_$p.log"
            echo
        fi
    done
    echo "## Low precision against fp32 (seconds per meta-step; ratio < 1 is faster)"
    echo
    "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {}
for p in ("32", "bf16", "16"):
    f = out / f"bench_{p}.json"
    if f.exists():
        runs[p] = {r["config"]: r["seconds"] for r in json.loads(f.read_text())["rows"]}
if "32" not in runs:
    print("(no fp32 run to compare with)")
    sys.exit(0)
print("| configuration | fp32 s | bf16 s (vs fp32) | fp16 s (vs fp32) |")
print("|---|---|---|---|")
for name, s32 in runs["32"].items():
    cells = []
    for p in ("bf16", "16"):
        s = runs.get(p, {}).get(name)
        cells.append(f"{s:.3f} ({s / s32:.2f})" if s else "-")
    print(f"| {name} | {s32:.3f} | {cells[0]} | {cells[1]} |")
EOF
} >> "$SUMMARY"

echo "gpu_check: wrote $SUMMARY"
exit $failed
