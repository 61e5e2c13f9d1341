#!/usr/bin/env bash
# RCIL as published (RCIL README; scripts/voc/RCIL_*.sh, scripts/ade/RCIL_ade_*.sh; argparser.py for the values they
# leave at their defaults), every step of one task:
#   bash scripts/recipes/rcil.sh voc 15-1              (VOC: 15-5, 15-1, 10-1 overlap|disjoint; 5-3 overlap)
#   bash scripts/recipes/rcil.sh voc 15-1 disjoint
#   bash scripts/recipes/rcil.sh ade 100-50            (ADE: 100-50, 100-10, 100-5, 50-50; overlap)
#   bash scripts/recipes/rcil.sh cityscapes_domain 11-5  (Cityscapes domains: 11-5, 11-1, 1-1; setting domains)
# Global batch 24 (VOC and ADE 100-50: 4 GPUs x 6; ADE 100-10 and 100-5: 2 x 12), crop 512, centre-crop evaluation,
# poly, mixed precision (apex O1), seed 42; lr 0.02 at step 0 on VOC (0.01 on ADE), then 0.001; 30 epochs per step
# on VOC, 60 on ADE; Cityscapes (RCIL scripts/cityscapesDomain/RCIL_cityscapes_*.sh): 4 GPUs x 6, lr 0.02 then 0.002
# (11-1: 0.004), 50 epochs. VOC 5-3 and ADE 50-50 have a published number but no script: the recipe uses the dataset's
# script values. Step 0 needs the InPlace-ABN ImageNet ResNet-101 (docs/data.md). GPUS (default: the published
# count; one id: one GPU with the whole batch; empty: the CPU), DATA_ROOT, CKPT_DIR, SUBPATH and EXTRA pass through.
set -euo pipefail
cd "$(dirname "$0")/../.."
USAGE="usage: rcil.sh voc|ade|cityscapes_domain TASK [overlap|disjoint|domains]"
DATASET=${1:?$USAGE}
TASK=${2:?$USAGE}
DEFAULT_SETTING=overlap
[ "$DATASET" = cityscapes_domain ] && DEFAULT_SETTING=domains
SETTING=${3:-$DEFAULT_SETTING}
source scripts/recipes/lib.sh
source scripts/launch.sh
recipe_lookup rcil "$DATASET" "$TASK" "$SETTING"
recipe_announce

LR1=0.001
case "$DATASET:$TASK" in
    voc:*) EPOCH=30 LR0=0.02 PUBLISHED_GPUS=4 DATA_ROOT=${DATA_ROOT:-data/VOC2012} ;;
    ade:100-10|ade:100-5) EPOCH=60 LR0=0.01 PUBLISHED_GPUS=2 DATA_ROOT=${DATA_ROOT:-data/ADEChallengeData2016} ;;
    ade:*) EPOCH=60 LR0=0.01 PUBLISHED_GPUS=4 DATA_ROOT=${DATA_ROOT:-data/ADEChallengeData2016} ;;
    cityscapes_domain:11-1) EPOCH=50 LR0=0.02 LR1=0.004 PUBLISHED_GPUS=4 DATA_ROOT=${DATA_ROOT:-data/cityscapes} ;;
    cityscapes_domain:*) EPOCH=50 LR0=0.02 LR1=0.002 PUBLISHED_GPUS=4 DATA_ROOT=${DATA_ROOT:-data/cityscapes} ;;
esac
[ "$SETTING" = overlap ] && SETTING_FLAG=(--overlap) || SETTING_FLAG=()
CKPT_DIR=${CKPT_DIR:-checkpoints}
SUBPATH=${SUBPATH:-RCIL}
COMMON=(--method rcil --data_root "$DATA_ROOT" --dataset "$DATASET" --task "$TASK" ${SETTING_FLAG[@]+"${SETTING_FLAG[@]}"}
        --model rcil_resnet101 --crop_size 512 --crop_val --global_batch 24 --train_epoch "$EPOCH" --lr_policy poly
        --weight_decay 1e-4 --random_seed 42 --output_stride 16 --amp --ckpt_dir "$CKPT_DIR" --subpath "$SUBPATH")
export GPUS=${GPUS-$(gpu_ids "$PUBLISHED_GPUS")}
recipe_step "${COMMON[@]}" --lr "$LR0" --curr_step 0 --initial
recipe_step "${COMMON[@]}" --lr "$LR1" --curr_step 1
recipe_report
