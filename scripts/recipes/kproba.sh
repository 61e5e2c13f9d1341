#!/usr/bin/env bash
# KProBA as its scripts run it (KProBA scripts/run_init.sh, run.sh, runade.sh, README; BARM's parser for the values
# they leave at their defaults), every step of one task. KProBA publishes no numbers.
#   bash scripts/recipes/kproba.sh voc 10-1      (one GPU, 5 epochs, batch 16, lr 0.001 at every step)
#   bash scripts/recipes/kproba.sh ade 100-10    (BARM's ADE values: step 0 on one GPU, then 2 GPUs x 4, lr 0.01)
# GPUS_INIT (default 0) runs step 0, GPUS (VOC 0, ADE 0,1) the others; DATA_ROOT, CKPT_DIR, SUBPATH and EXTRA pass
# through. There is no --pseudo_thresh (dead in KProBA).
set -euo pipefail
cd "$(dirname "$0")/../.."
USAGE="usage: kproba.sh voc|ade TASK"
DATASET=${1:?$USAGE}
TASK=${2:?$USAGE}
source scripts/recipes/lib.sh
source scripts/launch.sh
recipe_lookup kproba "$DATASET" "$TASK" overlap
recipe_announce

case "$DATASET" in
    voc) INIT=(--train_epoch 5 --global_batch 16 --lr 0.001) STEPS=(--train_epoch 5 --global_batch 16 --lr 0.001)
         STEP_GPUS=${GPUS-0} DATA_ROOT=${DATA_ROOT:-data/VOC2012} ;;
    ade) INIT=(--train_epoch 60 --global_batch 8 --lr 0.001) STEPS=(--train_epoch 100 --global_batch 8 --lr 0.01)
         STEP_GPUS=${GPUS-0,1} DATA_ROOT=${DATA_ROOT:-data/ADEChallengeData2016} ;;
esac
CKPT_DIR=${CKPT_DIR:-checkpoints}
SUBPATH=${SUBPATH:-KProBA}
COMMON=(--method kproba --data_root "$DATA_ROOT" --dataset "$DATASET" --task "$TASK" --overlap
        --model deeplabv3bga_resnet101 --loss_type bce_loss --crop_size 513 --crop_val --lr_policy poly
        --weight_decay 1e-4 --random_seed 1 --output_stride 16 --amp --pseudo --bn_freeze
        --ckpt_dir "$CKPT_DIR" --subpath "$SUBPATH")
GPUS=${GPUS_INIT-0} recipe_step "${COMMON[@]}" "${INIT[@]}" --curr_step 0 --initial
GPUS=$STEP_GPUS recipe_step "${COMMON[@]}" "${STEPS[@]}" --curr_step 1
recipe_report
