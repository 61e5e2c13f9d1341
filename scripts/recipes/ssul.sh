#!/usr/bin/env bash
# SSUL and SSUL-M as published (SSUL README and run.sh; SSUL main.py's parser for the values they leave at their
# defaults), every step of one task in one run, as SSUL's main.py:
#   bash scripts/recipes/ssul.sh voc 15-1            SSUL    (VOC: 15-1, 10-1, 15-5, 19-1, 5-3, 5-1, 2-1)
#   bash scripts/recipes/ssul.sh voc 15-1 ssul-m     SSUL-M  (memory: 100 images on VOC, 300 on ADE)
#   bash scripts/recipes/ssul.sh ade 100-5           SSUL    (ADE: 100-5, 100-10, 100-50, 50-50)
# VOC needs SSUL's saliency maps in $DATA_ROOT/saliency_map/ (docs/data.md). SSUL's batch (VOC 32, ADE 24) ran under
# DataParallel on 2 GPUs: BatchNorm statistics per half batch, which the method's default reproduces on any number
# of processes (GPUS, default 0,1; empty: the CPU). DATA_ROOT, CKPT_DIR, SUBPATH and EXTRA pass through.
set -euo pipefail
cd "$(dirname "$0")/../.."
USAGE="usage: ssul.sh voc|ade TASK [ssul|ssul-m]"
DATASET=${1:?$USAGE}
TASK=${2:?$USAGE}
VARIANT=${3:-ssul}
case "$VARIANT" in
    ssul|ssul-m) ;;
    *) echo "error: unknown variant '$VARIANT': expected ssul or ssul-m" >&2; exit 2 ;;
esac
source scripts/recipes/lib.sh
source scripts/launch.sh
recipe_lookup "$VARIANT" "$DATASET" "$TASK" overlap
recipe_announce

case "$DATASET" in
    voc) VALUES=(--train_epoch 50 --global_batch 32 --lr 0.01 --lr_policy poly) MEMORY=100
         DATA_ROOT=${DATA_ROOT:-data/VOC2012} ;;
    ade) VALUES=(--train_epoch 100 --global_batch 24 --lr 0.05 --lr_policy warm_poly) MEMORY=300
         DATA_ROOT=${DATA_ROOT:-data/ADEChallengeData2016} ;;
esac
[ "$VARIANT" = ssul ] && MEMORY=0
CKPT_DIR=${CKPT_DIR:-checkpoints}
[ "$VARIANT" = ssul ] && SUBPATH=${SUBPATH:-SSUL} || SUBPATH=${SUBPATH:-SSUL-M}
GPUS=${GPUS-0,1} recipe_step --method ssul --data_root "$DATA_ROOT" --dataset "$DATASET" --task "$TASK" --overlap \
    --model deeplabv3_resnet101 --loss_type bce_loss --crop_size 513 --crop_val --weight_decay 1e-4 \
    --random_seed 1 --output_stride 16 --amp --pseudo_thresh 0.7 --mem_size "$MEMORY" "${VALUES[@]}" \
    --curr_step 0 --ckpt_dir "$CKPT_DIR" --subpath "$SUBPATH"
recipe_report
