#!/usr/bin/env bash
# One device session (the `device` tool's `run`: one command of at most 10 minutes): the one-shot check
# `mmspec bench gpu`, then, each if its variable asks for it, the image sweep on the GPU and a tokenizer training on
# the GPU, then a t2i target on the GPU. Every step has its own timeout, so a slow step cannot eat the next one's time. Results land in $OUT
# (at most 8 files come back): log.txt, gpu.json, gpu.md, the sweep's report and points, the tokenizer as vq_gpu.tgz,
# the t2i target as t2i_gpu.tgz, the video model as video_gpu.tgz.
#
# Usage there (the defaults are session 16's run):
#   CHECK="--sections zoo --zoo-parts image" CHECK_BUDGET_S=140 CHECK_TIMEOUT_S=240 SWEEP_TIMEOUT_S=0 \
#   VQ_MINUTES=3.5 VQ_ARGS="--num-codes 4096" bash scripts/gpu_session.sh
# A t2i target on vq4096 (the GPU path of `t2i.train`, written in session 16 and dry-run on the CPU only):
#   CHECK_TIMEOUT_S=0 VQ_MINUTES=0 T2I_MINUTES=7 bash scripts/gpu_session.sh
# An 8-frame, 64-pixel video model from the t2i target (the video recipe's GPU path, written in session 22 and
# dry-run on the CPU only; its training state comes back too, to resume on the CPU or the next GPU):
#   CHECK_TIMEOUT_S=0 VQ_MINUTES=0 VIDEO_MINUTES=7 bash scripts/gpu_session.sh
# Session 13 ran CHECK="--sections verify forward zoo --compile" CHECK_BUDGET_S=170 SWEEP_TIMEOUT_S=270 VQ_MINUTES=0.
# Needs diffusers (absent from the device image): carry `.whl` with its wheel (see ../.library/device/README.md).
set -u
OUT=${OUT:-outputs/gpu_session}
SITE=outputs/device_site SWEEP=outputs/sweep  # inside the repository copy (ignored by git)
CHECK=${CHECK:---sections zoo --zoo-parts image} CHECK_BUDGET_S=${CHECK_BUDGET_S:-140}
CHECK_TIMEOUT_S=${CHECK_TIMEOUT_S:-240} SWEEP_TIMEOUT_S=${SWEEP_TIMEOUT_S:-0}
T2I_MINUTES=${T2I_MINUTES:-0} T2I_ARGS=${T2I_ARGS:---noise-free --vq mmspec/zoo/weights/vq4096}
VIDEO_MINUTES=${VIDEO_MINUTES:-0} VIDEO_BATCH=${VIDEO_BATCH:-32}
VIDEO_ARGS=${VIDEO_ARGS:---frames 8 --frame-size 64 --lr 1e-3 --init-from mmspec/zoo/weights/t2i_target}
VQ_MINUTES=${VQ_MINUTES:-3.5} VQ_ARGS=${VQ_ARGS:---num-codes 4096} VQ_BATCH=${VQ_BATCH:-256} VQ_WORKERS=${VQ_WORKERS:-14}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || exit 1
  export PYTHONPATH=$PWD/$SITE:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, diffusers, triton; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'diffusers', diffusers.__version__, 'triton', triton.__version__)"
  if [ "$CHECK_TIMEOUT_S" -gt 0 ]; then
    echo "=== mmspec bench gpu $CHECK ==="
    # shellcheck disable=SC2086
    timeout "$CHECK_TIMEOUT_S" python3 -m mmspec.bench.gpu $CHECK --budget-s "$CHECK_BUDGET_S" --out "$OUT"
    echo "check rc $?"
  fi
  if [ "$SWEEP_TIMEOUT_S" -gt 0 ]; then
    echo "=== mmspec bench image --sweep ==="
    timeout "$SWEEP_TIMEOUT_S" python3 -m mmspec.cli bench image --sweep --prompts 256 --batch-size 256 \
      --device cuda --threads 8 --out "$SWEEP"
    echo "sweep rc $?"
    cp "$SWEEP"/image_sweep.json "$SWEEP"/image_sweep.md "$SWEEP"/image_sweep.png "$OUT"/ 2>/dev/null
    tar czf "$OUT/sweep_points.tgz" -C "$SWEEP" sweep_points 2>/dev/null
  fi
  if [ "$(python3 -c "print(int(float('$VQ_MINUTES') > 0))")" = 1 ]; then
    echo "=== tokenizer on the GPU: $VQ_MINUTES min, batch $VQ_BATCH, $VQ_WORKERS loader workers, $VQ_ARGS ==="
    # training budget + model start, k-means, saving and the CPU evaluation (8 threads)
    # shellcheck disable=SC2086
    timeout "$(python3 -c "print(int(float('$VQ_MINUTES') * 60 + 100))")" python3 -m mmspec.zoo.train vq \
      --device "${VQ_DEVICE:-cuda}" --workers "$VQ_WORKERS" --batch-size "$VQ_BATCH" --minutes "$VQ_MINUTES" --threads 8 --seed 0 \
      --out outputs/vq_gpu $VQ_ARGS 2>&1 | grep -v "it/s]"
    echo "vq rc ${PIPESTATUS[0]}"
    tar czf "$OUT/vq_gpu.tgz" -C outputs vq_gpu 2>/dev/null
  fi
  if [ "$(python3 -c "print(int(float('$T2I_MINUTES') > 0))")" = 1 ]; then
    echo "=== t2i target on the GPU: $T2I_MINUTES min, batch $VQ_BATCH, $VQ_WORKERS loader workers, $T2I_ARGS ==="
    # shellcheck disable=SC2086
    timeout "$(python3 -c "print(int(float('$T2I_MINUTES') * 60 + 120))")" python3 -m mmspec.zoo.train t2i_target \
      --device "${VQ_DEVICE:-cuda}" --workers "$VQ_WORKERS" --batch-size "$VQ_BATCH" --minutes "$T2I_MINUTES" \
      --threads 8 --seed 0 --out outputs/t2i_gpu $T2I_ARGS 2>&1 | grep -v "it/s]"
    echo "t2i rc ${PIPESTATUS[0]}"
    tar czf "$OUT/t2i_gpu.tgz" -C outputs t2i_gpu 2>/dev/null
  fi
  if [ "$(python3 -c "print(int(float('$VIDEO_MINUTES') > 0))")" = 1 ]; then
    echo "=== video on the GPU: $VIDEO_MINUTES min, batch $VIDEO_BATCH, $VQ_WORKERS loader workers, $VIDEO_ARGS ==="
    # shellcheck disable=SC2086
    timeout "$(python3 -c "print(int(float('$VIDEO_MINUTES') * 60 + 150))")" python3 -m mmspec.zoo.train video \
      --device "${VQ_DEVICE:-cuda}" --workers "$VQ_WORKERS" --batch-size "$VIDEO_BATCH" --minutes "$VIDEO_MINUTES" \
      --threads 8 --seed 7 --out outputs/video_gpu --ckpt outputs/video_gpu.pt $VIDEO_ARGS 2>&1 | grep -v "it/s]"
    echo "video rc ${PIPESTATUS[0]}"
    tar czf "$OUT/video_gpu.tgz" -C outputs video_gpu video_gpu.pt 2>/dev/null
  fi
  date -u
} 2>&1 | tee "$OUT/log.txt"
