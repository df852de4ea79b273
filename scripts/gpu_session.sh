#!/usr/bin/env bash
# One device session (the `device` tool's `run`, about 8 minutes): the one-shot check `mmspec bench gpu`, then the
# image sweep (`mmspec bench image --sweep`, 256 held-out captions in one batch) on the GPU. Results land in $OUT
# (8 files at most come back). Usage there: bash scripts/gpu_session.sh [CHECK_BUDGET_S] [SWEEP_TIMEOUT_S]
# Needs diffusers (absent from the device image): carry `.whl` with its wheel (see ../.library/device/README.md).
set -u
OUT=${OUT:-outputs/gpu_session}
SITE=outputs/device_site SWEEP=outputs/sweep  # inside the repository copy (ignored by git)
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
  echo "=== mmspec bench gpu ==="
  timeout $(( ${1:-170} + 120 )) python3 -m mmspec.bench.gpu --sections verify forward zoo --compile \
    --budget-s "${1:-170}" --out "$OUT"
  echo "=== mmspec bench image --sweep (rc of the check: $?) ==="
  timeout "${2:-270}" python3 -m mmspec.cli bench image --sweep --prompts 256 --batch-size 256 --device cuda \
    --threads 8 --out "$SWEEP"
  echo "sweep rc $?"
  cp "$SWEEP"/image_sweep.json "$SWEEP"/image_sweep.md "$SWEEP"/image_sweep.png "$OUT"/ 2>/dev/null
  tar czf "$OUT/sweep_points.tgz" -C "$SWEEP" sweep_points 2>/dev/null
  date -u
} 2>&1 | tee "$OUT/log.txt"
