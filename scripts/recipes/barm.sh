#!/usr/bin/env bash
# BARM's published runs (BARM README; scripts/run_init.sh, run.sh, runade.sh; utils/parser.py for the values the
# scripts leave at their defaults), every step of one task:
#   bash scripts/recipes/barm.sh voc 15-1      (VOC: 10-1, 15-1, 5-3, 19-1, overlap)
#   bash scripts/recipes/barm.sh ade 100-10    (ADE: 100-5, 100-10, 100-50, 50-50, overlap)
# Step 0 on one GPU (GPUS_INIT, default 0), the incremental steps on GPUS (default 0,1). The published steps t > 0
# ran 2 GPUs whose gradients were never averaged; the method's default reproduces that run (rank 0 alone, on its
# half of the images) on any number of processes; EXTRA="--clean" runs the corrected protocol instead.
# DATA_ROOT, CKPT_DIR, SUBPATH and EXTRA (more flags, e.g. "--resume") pass through.
set -euo pipefail
cd "$(dirname "$0")/../.."
USAGE="usage: barm.sh voc|ade TASK"
DATASET=${1:?$USAGE}
TASK=${2:?$USAGE}
source scripts/recipes/lib.sh
source scripts/launch.sh
recipe_lookup barm "$DATASET" "$TASK" overlap
recipe_announce

case "$DATASET" in
    voc) INIT=(--train_epoch 50 --global_batch 16 --lr 0.001) STEPS=(--train_epoch 20 --global_batch 16 --lr 0.001)
         DATA_ROOT=${DATA_ROOT:-data/VOC2012} ;;
    ade) INIT=(--train_epoch 60 --global_batch 8 --lr 0.001) STEPS=(--train_epoch 100 --global_batch 8 --lr 0.01)
         DATA_ROOT=${DATA_ROOT:-data/ADEChallengeData2016} ;;
esac
CKPT_DIR=${CKPT_DIR:-checkpoints}
SUBPATH=${SUBPATH:-BARM}
COMMON=(--method barm --data_root "$DATA_ROOT" --dataset "$DATASET" --task "$TASK" --overlap
        --model deeplabv3bga_resnet101 --loss_type bce_loss --crop_size 513 --crop_val --lr_policy poly
        --weight_decay 1e-4 --random_seed 1 --output_stride 16 --amp --pseudo --pseudo_thresh 0.7 --bn_freeze
        --ckpt_dir "$CKPT_DIR" --subpath "$SUBPATH")
GPUS=${GPUS_INIT-0} recipe_step "${COMMON[@]}" "${INIT[@]}" --curr_step 0 --initial
GPUS=${GPUS-0,1} recipe_step "${COMMON[@]}" "${STEPS[@]}" --curr_step 1
recipe_report
