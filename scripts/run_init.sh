#!/usr/bin/env bash
# Step 0 of a task, in the shape of BARM's run_init.sh. Edit the variables or set them in the environment:
#   DATA_ROOT=/data/VOC2012 GPUS=0 bash scripts/run_init.sh
# BARM's step 0 uses hard-coded learning rates (backbone 0.001, classifier 0.01); LR is passed for
# completeness and used only from step 1 on. As BARM, step 1 starts from step 0's best-validated weights
# (EXTRA="--select_last": the last).
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS=${GPUS-0}                          # GPU ids, comma-separated; several -> torchrun; empty -> CPU
MODEL=${MODEL:-deeplabv3bga_resnet101}
DATA_ROOT=${DATA_ROOT:-data/VOC2012}
DATASET=${DATASET:-voc}
TASK=${TASK:-15-1}
EPOCH=${EPOCH:-50}
BATCH=${BATCH:-16}                      # per process
LOSS=${LOSS:-bce_loss}
LR=${LR:-0.001}
THRESH=${THRESH:-0.7}
SUBPATH=${SUBPATH:-BARM}
CKPT_DIR=${CKPT_DIR:-checkpoints}
SETTING=${SETTING:---overlap}           # --overlap, or empty for disjoint
EXTRA=${EXTRA:-}                        # more flags, e.g. "--backbone resnet18 --no_pretrained"

source scripts/launch.sh
# shellcheck disable=SC2086
launch --data_root "$DATA_ROOT" --model "$MODEL" --dataset "$DATASET" --task "$TASK" --train_epoch "$EPOCH" \
    --batch_size "$BATCH" --loss_type "$LOSS" --lr "$LR" --crop_val --lr_policy poly --pseudo \
    --pseudo_thresh "$THRESH" --bn_freeze --amp --curr_step 0 --subpath "$SUBPATH" --ckpt_dir "$CKPT_DIR" --initial $SETTING $EXTRA
