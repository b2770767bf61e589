#!/usr/bin/env bash
# One prepared run on a GPU machine: everything the kernels issue asks to measure, into one folder.
#
#   OUT=/path/to/out bash benchmarks/gpu.sh            # on one H200 (or any CUDA GPU): about 8 minutes at most
#   OUT=/tmp/dry bash benchmarks/gpu.sh --dry-run      # tiny shapes on the CPU, the same parts (CI runs this)
#
# Runs from the repository root with the machine's python3 (override with PYTHON=...), installs nothing.
# Parts, each under its own timeout so that one failure or hang does not lose the others:
#   env        GPU, driver, torch / triton versions
#   compile    benchmarks/compile_check.py for this GPU's triton (sm_90, bf16, D 128; 16 workers): its figures
#              under the machine's own triton (incl. whether the TMA configs use TMA and the warp-specialised
#              ones are split), and a warm Triton cache for the FLUX / Wan shapes that follow
#   tests      tests/test_kernels.py compiled on the GPU: every config the autotuner may choose forced once
#              (bf16 and fp16; on sm_90 that includes the TMA and warp-specialised configs, never run on a GPU
#              before), a FLUX-size case (B1 H24 L4608 D128) and large score magnitudes vs SDPA, the rest of the
#              file (ragged shapes, prologues, tiny FLUX / Wan) with one forced config
#   kernels    benchmarks/kernels.py: attention fwd and fwd+bwd, prompted two-context cross-attention,
#              prologues, vs SDPA default / flash / cuDNN / mem-efficient and the two-call form; TFLOP/s, ratios,
#              and the config the autotuner chose per kernel and key (did the TMA / warp-specialised ones win?)
#   flux       benchmarks/method.py, FLUX.1-dev with random bf16 weights: s per training step at 512^2,
#              s per restored 1024^2 image (20 steps), peak memory, fused vs released (eager + SDPA)
#   wan        the same for Wan 2.1 1.3B: training clips 480x832 x 33 frames, restore 480x832
#   pretrain   the tiny pre-training's throughput (images/s) for planning
# Files in $OUT (at most 8): summary.txt (one line a part: status, seconds), log.txt (all output),
# tests.txt, kernels.md, method.md, pretrain.txt. Exit status: the number of parts that failed.
set -u
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET  # an inherited interpreter flag would run CUDA tensors on the CPU (the dispatch refuses it)
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=  # the CPU path on any machine: interpreter, tiny shapes
fi
FAILED=0
: > "$OUT/summary.txt"

# part NAME SECONDS COMMAND...: run under a timeout, output to log.txt (and the screen), status to summary.txt
part() {
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/log.txt"
  if declare -F "$1" > /dev/null; then  # a function of this script: timeout runs it in a child bash
    timeout -k 10 "$limit" bash -c "$1" 2>&1 | tee -a "$OUT/log.txt"
  else
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/log.txt"
  fi
  rc=${PIPESTATUS[0]}
  local status=ok
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && status="TIMEOUT after ${limit}s"
  [ "$rc" != 0 ] && [ "$status" = ok ] && status="FAILED rc=$rc"
  [ "$rc" != 0 ] && FAILED=$((FAILED + 1))
  printf '%-9s %-22s %4ss\n' "$name" "$status" "$(($(date +%s) - start))" | tee -a "$OUT/summary.txt"
}

env_info() {
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
}

kernel_tests() {
  local n=8 sel="" every="every_config or flux_size or large_score"
  [ "$DRY" = 1 ] && n=0 && sel="test_attention and not strided"  # the GPU cases skip on the CPU
  local xdist=()
  "$PY" -c "import xdist" 2>/dev/null && [ "$n" -gt 0 ] && xdist=(-n "$n")
  # every config forced once (a test parameter), the real-size cases, then the rest with config 0
  "$PY" -m pytest -q -rfs "${xdist[@]}" tests/test_kernels.py -k "$every" || return 1
  MINIRESTORE_KERNELS_CONFIG=0 "$PY" -m pytest -q -rfs "${xdist[@]}" tests/test_kernels.py \
    -k "${sel:-not ($every)}" || return 1
}

export -f env_info kernel_tests
export DRY PY OUT

if [ "$DRY" = 1 ]; then
  T=(30 300 300 120 120 120 120)
  COMPILE=(--arch 80 --dtype fp32 --head-dim 64 --no-prologues)  # 6 pinned configs: a quick compile
  KMODE=triton  # the benchmark's Triton rows through the interpreter
  KERNELS=(--cpu-smoke --write)
  FLUX=(--model tiny --repeats 1 --warmup 0 --sample-steps 2)
  WAN=(--model tiny-wan --frames 5 --repeats 1 --warmup 0 --sample-steps 2)
  PRETRAIN=(--steps 3 --batch-size 2 --sizes 32 --width 32 --double 1 --single 1 --eval-n 2 --device cpu)
else
  T=(10 30 120 130 100 60 30)  # 480 s; tests: 2 x 9 forced configs (kernels.tuning.CONFIGS' longest list)
  COMPILE=(--arch 90 --dtype bf16 --head-dim 128 --workers 16)
  KMODE=auto
  KERNELS=()
  FLUX=(--model flux-dev --train-res 512 --sample-res 1024 --sample-steps 20 --repeats 2 --warmup 1)
  WAN=(--model wan2.1-t2v-1.3b --train-res 480x832 --frames 33 --sample-res 480x832 --sample-steps 20 --repeats 2 --warmup 1)
  PRETRAIN=(--steps 300 --batch-size 32 --eval-n 8 --device cuda)
fi

part env "${T[0]}" env_info
part compile "${T[1]}" "$PY" benchmarks/compile_check.py "${COMPILE[@]}"
part tests "${T[2]}" kernel_tests
cp "$OUT/log.txt" "$OUT/tests.txt"
part kernels "${T[3]}" env MINIRESTORE_KERNELS=$KMODE "$PY" benchmarks/kernels.py "${KERNELS[@]}" --results "$OUT/kernels.md"
part flux "${T[4]}" "$PY" benchmarks/method.py "${FLUX[@]}" --write --results "$OUT/method.md"
part wan "${T[5]}" "$PY" benchmarks/method.py "${WAN[@]}" --write --results "$OUT/method.md"
RUN=$(mktemp -d)
part pretrain "${T[6]}" bash -c "\"$PY\" -m minirestore.pretrain ${PRETRAIN[*]} --data leaves --sample-every 100000 \
  --checkpoint-every 100000 --sample-steps 2 --out $RUN/tiny --run-dir $RUN/run 2>&1 | tr '\r' '\n' | tee $OUT/pretrain.txt \
  | grep -E 'img_s|error|Error' | tail -n 3; exit \${PIPESTATUS[0]}"
rm -rf "$RUN"
grep -o 'img_s=[0-9.]*' "$OUT/pretrain.txt" 2>/dev/null | tail -n 1 | sed 's/^/pretrain  throughput (images\/s, from the start): /' \
  | tee -a "$OUT/summary.txt"
echo "$FAILED part(s) failed; files in $OUT:" | tee -a "$OUT/summary.txt"
ls -la "$OUT"
exit "$FAILED"
