#!/usr/bin/env bash
# One machine, several GPUs: MirroredStrategy over every visible GPU (NCCL all-reduce), precision chosen from the
# GPUs (mixed_float16 on NVIDIA compute capability >= 7.0, else float32). Run from the repository root:
#
#     launch/multi_gpu.sh [extra trainer flags]
#     CUDA_VISIBLE_DEVICES=0,1 GLOBAL_BATCH=128 launch/multi_gpu.sh --epochs=10
#
# GLOBAL_BATCH is split evenly over the GPUs, so keep it a multiple of their number. Flags given on the command line
# come last and win over the ones set here.
set -euo pipefail

exec python -m trainer.main \
  --strategy=mirrored \
  --precision=auto \
  --batch_size="${GLOBAL_BATCH:-256}" \
  --dataset="${DATASET:-chest_xray_pneumonia/224}" \
  --model_dir="${MODEL_DIR:-runs/multi_gpu}" \
  "$@"
