#!/usr/bin/env bash
# Every GPU row of the benchmarks under bench/, on one GPU machine, in one go; one JSON object
# on stdout (each benchmark's own JSON under its row name), progress and tables on stderr.
#
#   ./run setup && bench/gpu.sh > bench-gpu.json        # from the repository root
#   bench/gpu.sh --check                                # the same command lines, tiny, on CPU
#
# Rows (see bench/README.md, "GPU rows"):
#   generate   bench/generate.py as it is: its generator's device and dtype are `auto`, so on
#              a GPU it runs there in bf16; batched against one source at a time.
#   train      bench/train.py --preset 1b --device cuda: our loop (LM head in chunks with the
#              prompt once; with two sequences; the earlier full-logits loop) against TRL's
#              CPOTrainer on a Llama-3.2-1B-shaped model (vocabulary 128256, random weights,
#              bf16, LoRA), one run of each: torch.cuda.max_memory_allocated and tokens/s.
#   score_*    bench/score.py at each dtype against predict(), once it takes --device and
#              --dtype (it does not yet: the row then says so instead of running).
# bench/build.py and bench/rebuild.py measure Prefect's and the caches' costs on CPU: no GPU row.
#
# Sized to end within BUDGET seconds (470: under 8 minutes) on one H200; each row's time limit
# is its own cap or what is left of the budget, whichever is less, and a row that fails or runs
# out of time is reported as such while the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${CPO_DATA_VENV:-.venv}/bin/python"
BUDGET="${BUDGET:-470}"
CHECK=0
[ "${1:-}" = "--check" ] && CHECK=1

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
declare -a ROWS=()

say() { echo "==> $*" >&2; }

# run NAME CAP COMMAND...: COMMAND's stdout (one JSON object) becomes row NAME.
run() {
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - SECONDS - 5)) limit rc start
  limit=$(( cap < left ? cap : left ))
  ROWS+=("$name")
  echo "$*" > "$WORK/$name.cmd"
  if [ "$limit" -lt 10 ]; then
    say "$name: skipped, the budget is spent"
    echo "budget spent before this row" > "$WORK/$name.skip"
    return
  fi
  say "$name (limit ${limit}s): $*"
  start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"
  rc=$?
  echo "$rc $((SECONDS - start)) $limit" > "$WORK/$name.rc"
  tail -n 20 "$WORK/$name.err" >&2
  say "$name: exit $rc after $((SECONDS - start))s"
}

skip() {  # skip NAME REASON
  ROWS+=("$1")
  echo "$2" > "$WORK/$1.skip"
  say "$1: skipped: $2"
}

if [ "$CHECK" = 1 ]; then
  DEVICE=cpu
else
  DEVICE=cuda
  if ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo '{"benchmark": "gpu", "error": "torch sees no CUDA device (is this the GPU machine, and is its torch a CUDA build?)"}'
    exit 1
  fi
fi

if [ "$CHECK" = 1 ]; then
  run generate 120 "$PY" bench/generate.py --sources 16 --max-new-tokens 4
  run train 300 "$PY" bench/train.py --preset tiny --hidden-size 32 --layers 2 --vocab 0 \
    --device "$DEVICE" --steps 5 --repeats 1 --quiet-wait 5
else
  # 512 sources x 4 beams, 16 new tokens: the CPU rows' size, so the two compare.
  run generate 90 "$PY" bench/generate.py --sources 512 --max-new-tokens 16
  # 30 steps of 4 pairs, each of the four sides (ours, ours-two, ours-full, trl) in its own
  # process.
  run train 240 "$PY" bench/train.py --preset 1b --device "$DEVICE" --steps 30 \
    --repeats 1 --quiet-wait 10
fi

help=$("$PY" bench/score.py --help 2>/dev/null || true)
if [[ "$help" == *--device* && "$help" == *--dtype* ]]; then
  # XLM-R-large's shape (24 x 1024, random weights), the README's pending GPU scoring rows.
  for dtype in float32 bfloat16 float16; do
    if [ "$CHECK" = 1 ]; then
      run "score_$dtype" 120 "$PY" bench/score.py --sources 8 --kind xcomet \
        --device "$DEVICE" --dtype "$dtype"
    else
      run "score_$dtype" 40 "$PY" bench/score.py --sources 60 --hidden 1024 --layers 24 \
        --kind xcomet --device "$DEVICE" --dtype "$dtype"
    fi
  done
else
  skip score "bench/score.py takes no --device/--dtype yet: it scores on CPU at float32 only"
fi

"$PY" - "$WORK" "$CHECK" "$SECONDS" "${ROWS[@]}" <<'EOF'
import json, os, platform, subprocess, sys
from pathlib import Path

work, check, seconds, names = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4:]
rows = {}
for name in names:
    row = {"command": (work / f"{name}.cmd").read_text().strip()} if (work / f"{name}.cmd").exists() else {}
    if (work / f"{name}.skip").exists():
        row["skipped"] = (work / f"{name}.skip").read_text().strip()
        rows[name] = row
        continue
    rc, took, limit = map(int, (work / f"{name}.rc").read_text().split())
    row.update(exit=rc, seconds=took, limit_s=limit)
    text = (work / f"{name}.out").read_text()
    try:
        row["result"] = json.loads(text)
    except ValueError:
        row["stdout_tail"] = text[-2000:]
    if rc != 0 or "result" not in row:
        row["error"] = "timed out" if rc in (124, 137) else f"exit {rc}"
        row["stderr_tail"] = (work / f"{name}.err").read_text()[-3000:]
    rows[name] = row
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True,
                         timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    gpu = None
import torch
print(json.dumps({
    "benchmark": "gpu", "check_run": check, "rows": rows, "seconds": seconds,
    "failed": sorted(n for n, r in rows.items() if "error" in r),
    "machine": {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
                "platform": f"{platform.machine()}, {os.cpu_count()} cpus"},
}, indent=1))
EOF
