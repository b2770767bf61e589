#!/usr/bin/env bash
# One prepared GPU run for the tiny default (issue 14): pre-train a larger tiny backbone on the photographs.
#
#   here, once:  python -m minirestore.photos --pack .gpu-pack     # train + val photographs as JPEG, ~16 MiB,
#                                                                  # git-ignored; the device machine reaches no registry
#   there:       device run, carry [".gpu-pack"], command "bash benchmarks/gpu_pretrain.sh"
#                (BUDGET=180 when benchmarks/gpu.sh ran first in the same 15-minute lease)
#   CI:          OUT=/tmp/dry bash benchmarks/gpu_pretrain.sh --dry-run   # the CPU, tiny sizes, every step
#
# What it runs: minirestore.pretrain from scratch on the training photographs, the README's recipe scaled to
# a GPU: width $WIDTH (192: 4.5 M parameters, 1.8x the CPU cost of today's 128 at sampling, so the main job
# and sample.py stay inside their CPU limits), batch 256, lr 1e-3, bf16 autocast, the photographs cut into
# crops on the GPU, and --time-budget $BUDGET seconds of training (the resolved --steps is printed and stored
# in the weights' metadata: rerun with it to repeat the schedule). Then it evaluates the new backbone and,
# on the same JPEG'd val crops, the shipped weights/tiny (their denoise_psnr lines in log.txt are the
# comparison that decides which one ships). Attention runs through PyTorch's SDPA (MINIRESTORE_KERNELS=torch):
# the Triton kernels are benchmark/gpu.sh's subject, not a risk this run should take.
#
# Files in $OUT (at most 8, each under 16 MiB): log.txt, eval.json, samples.png, and the backbone folder
# tiny/ (flux shards + index, text.safetensors, context.safetensors), loadable as `--model path/to/tiny`.
# Runs from the repository root with the machine's python3 (override with PYTHON=...), installs nothing.
set -u
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$PWD/gpu-pretrain-out}
PY=${PYTHON:-python3}
PACK=${PACK:-.gpu-pack}
WIDTH=${WIDTH:-192}
BUDGET=${BUDGET:-300}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MINIRESTORE_KERNELS=torch
SOURCE_PHOTOS=${MINIRESTORE_PHOTOS:-}  # the dry run packs the caller's photo cache
export MINIRESTORE_PHOTOS="$WORK/photos"  # the pack is decoded here; nothing is fetched
say() { echo "$*" | tee -a "$LOG"; }
step() { say "=== $1"; shift; "$@" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tee -a "$LOG"; return "${PIPESTATUS[0]}"; }

if [ "$DRY" = 1 ]; then  # the CPU: a pack made here from the photo cache, a few seconds of a small model
  export CUDA_VISIBLE_DEVICES=
  [ -d "$PACK" ] || PACK="$WORK/pack"
  [ -d "$PACK" ] || MINIRESTORE_PHOTOS=$SOURCE_PHOTOS "$PY" -m minirestore.photos --pack "$PACK" > /dev/null || exit 1
  WIDTH=32
  RUN=(--device cpu --precision bf16 --width "$WIDTH" --double 1 --single 1 --batch-size 4 --sizes 32 --lr 1e-3
       --warmup 6 --time-budget 4 --threads 2 --eval-n 4 --sample-steps 2 --checkpoint-every 1000000)
  SHIPPED=(--device cpu --eval-n 4 --sample-steps 2)
else
  RUN=(--device cuda --precision bf16 --width "$WIDTH" --batch-size 256 --lr 1e-3 --warmup 200
       --time-budget "$BUDGET" --threads 8 --eval-n 128 --sample-steps 25 --checkpoint-every 4000)
  SHIPPED=(--device cuda --eval-n 128 --sample-steps 25)
fi
[ -d "$PACK" ] || { say "no photo pack in $PACK: make one here with python -m minirestore.photos --pack $PACK, carry it"; exit 1; }

step "env" bash -c "date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null \
  || echo 'no nvidia-smi'; \"$PY\" -c \"import torch, sys; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')\""
step "photos: unpack $PACK" "$PY" -m minirestore.photos --unpack "$PACK" || exit 1
start=$(date +%s)
step "pretrain: ${RUN[*]}" "$PY" -m minirestore.pretrain "${RUN[@]}" --sample-every 1000000 \
  --out "$OUT/tiny" --run-dir "$WORK/run"
rc=$?
say "pretrain: rc $rc, $(($(date +%s) - start)) s wall"
cp "$WORK/run/eval.json" "$OUT/eval.json" 2>/dev/null
last=$(ls "$WORK"/run/samples_*.png 2>/dev/null | tail -n 1)
[ -n "$last" ] && cp "$last" "$OUT/samples.png"
# The shipped backbone on the same crops: zero steps from weights/tiny writes it unchanged and evaluates it.
step "shipped weights/tiny, evaluated alike" "$PY" -m minirestore.pretrain "${SHIPPED[@]}" --steps 0 \
  --init weights/tiny --out "$WORK/shipped" --run-dir "$WORK/shipped-run" --sample-every 1000000
step "summary" "$PY" -c "
import json, sys
rows = [('new (width $WIDTH)', '$WORK/run/eval.json'), ('shipped weights/tiny', '$WORK/shipped-run/eval.json')]
print('frozen model as a one-step denoiser on val crops, PSNR (dB) at sigma 0.05 / 0.1 / 0.2; steps')
for name, path in rows:
    try:
        e = json.load(open(path))
    except OSError:
        print(f'{name:22s} missing'); continue
    print(f'{name:22s}', ' / '.join(f'{e[f\"denoise_psnr_{s}\"]:.2f}' for s in (0.05, 0.1, 0.2)), ';', e['step'], 'steps this run')
"
ls -la "$OUT" "$OUT/tiny" | tee -a "$LOG"
exit "$rc"
