#!/usr/bin/env bash
# Incremental steps CURR..last of a task, in the shape of BARM's run.sh (run run_init.sh first):
#   DATA_ROOT=/data/VOC2012 GPUS=0,1 bash scripts/run.sh
# Several GPUs run under torchrun; BATCH is per GPU, as in BARM's run.sh. BARM's published steps ran 2 GPUs that
# never averaged their gradients, and so does this script by default: the model trained is rank 0's, batch BATCH,
# on its half of the images, whatever the number of GPUs here. EXTRA="--clean" (or "--sync_gradients") trains on
# every image with the global batch BATCH x GPUs instead (README, "Reproducing a published number").
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS=${GPUS-0,1}                        # GPU ids, comma-separated; several -> torchrun; empty -> CPU
MODEL=${MODEL:-deeplabv3bga_resnet101}
DATA_ROOT=${DATA_ROOT:-data/VOC2012}
DATASET=${DATASET:-voc}
TASK=${TASK:-15-1}
EPOCH=${EPOCH:-20}
BATCH=${BATCH:-8}                       # per process
LOSS=${LOSS:-bce_loss}
LR=${LR:-0.001}                         # new head and ear; the other groups use BARM's fixed rates
THRESH=${THRESH:-0.7}
SUBPATH=${SUBPATH:-BARM}
CKPT_DIR=${CKPT_DIR:-checkpoints}
CURR=${CURR:-1}
SETTING=${SETTING:---overlap}           # --overlap, or empty for disjoint
EXTRA=${EXTRA:-}                        # more flags, e.g. "--resume" or "--end_step 3"

source scripts/launch.sh
# shellcheck disable=SC2086
launch --data_root "$DATA_ROOT" --model "$MODEL" --dataset "$DATASET" --task "$TASK" --train_epoch "$EPOCH" \
    --batch_size "$BATCH" --loss_type "$LOSS" --lr "$LR" --crop_val --lr_policy poly --pseudo \
    --pseudo_thresh "$THRESH" --bn_freeze --amp --curr_step "$CURR" --subpath "$SUBPATH" --ckpt_dir "$CKPT_DIR" $SETTING $EXTRA
