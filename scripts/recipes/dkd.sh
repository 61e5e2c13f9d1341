#!/usr/bin/env bash
# DKD and DKD-M as published (DKD README; scripts/voc/overlapped/*.sh, scripts/voc/disjoint/*.sh,
# scripts/ade/overlapped/*.sh; configs/config_voc.json, config_ade.json), every step of one task:
#   bash scripts/recipes/dkd.sh voc 15-1                   DKD, overlap (VOC: 19-1, 15-5, 15-1, 10-1, 5-3)
#   bash scripts/recipes/dkd.sh voc 15-1 disjoint          DKD, disjoint (VOC: 19-1, 15-5, 15-1)
#   bash scripts/recipes/dkd.sh voc 10-1 overlap dkd-m     DKD-M: 100 memory images (ADE: 300)
#   bash scripts/recipes/dkd.sh ade 100-50                 ADE: 100-50, 100-10, 50-50
# Global batch: VOC 32 (4 GPUs x 8), ADE 24 (4 x 6); `--lr` is the backbone's (ASPP and classifiers at 10x): 1e-3
# then 1e-4 on VOC, 2.5e-3 then 2.5e-4 with a 20% warm-up on ADE; 60 epochs per step on VOC, 100 on ADE; crop 512,
# centre-crop evaluation, AMP, seed 1. A DKD-M run starts from the DKD run's step 0 when it exists (the two are the
# same at step 0). GPUS (default 0,1,2,3; one id: one GPU with the whole batch; empty: the CPU), DATA_ROOT,
# CKPT_DIR, SUBPATH and EXTRA pass through.
set -euo pipefail
cd "$(dirname "$0")/../.."
USAGE="usage: dkd.sh voc|ade TASK [overlap|disjoint] [dkd|dkd-m]"
DATASET=${1:?$USAGE}
TASK=${2:?$USAGE}
SETTING=${3:-overlap}
VARIANT=${4:-dkd}
case "$VARIANT" in
    dkd|dkd-m) ;;
    *) echo "error: unknown variant '$VARIANT': expected dkd or dkd-m" >&2; exit 2 ;;
esac
source scripts/recipes/lib.sh
source scripts/launch.sh
recipe_lookup "$VARIANT" "$DATASET" "$TASK" "$SETTING"
recipe_announce

case "$DATASET" in
    voc) VALUES=(--train_epoch 60 --global_batch 32 --lr_policy poly) LR0=0.001 LR=0.0001 MEMORY=100
         DATA_ROOT=${DATA_ROOT:-data/VOC2012} ;;
    ade) VALUES=(--train_epoch 100 --global_batch 24 --lr_policy warm_poly) LR0=0.0025 LR=0.00025 MEMORY=300
         DATA_ROOT=${DATA_ROOT:-data/ADEChallengeData2016} ;;
esac
[ "$VARIANT" = dkd ] && MEMORY=0
[ "$SETTING" = overlap ] && SETTING_FLAG=(--overlap) || SETTING_FLAG=()
CKPT_DIR=${CKPT_DIR:-checkpoints}
DKD_SUBPATH=DKD
[ "$VARIANT" = dkd ] && SUBPATH=${SUBPATH:-$DKD_SUBPATH} || SUBPATH=${SUBPATH:-DKD-M}
COMMON=(--method dkd --data_root "$DATA_ROOT" --dataset "$DATASET" --task "$TASK" ${SETTING_FLAG[@]+"${SETTING_FLAG[@]}"}
        --model dkd_resnet101 --crop_size 512 --crop_val "${VALUES[@]}" --weight_decay 1e-4 --random_seed 1
        --output_stride 16 --amp --ckpt_dir "$CKPT_DIR" --subpath "$SUBPATH")
export GPUS=${GPUS-0,1,2,3}
STEP0="$CKPT_DIR/$DKD_SUBPATH/$TASK/$SETTING/step0/final.pth"
FROM=()
if [ "$VARIANT" = dkd-m ] && [ "$SUBPATH" != "$DKD_SUBPATH" ] && [ -f "$STEP0" ] && [ -z "${SEEDS:-}${ORDERS:-}" ]; then
    FROM=(--prev_ckpt "$STEP0")   # DKD-M's step 0 is DKD's (with SEEDS or ORDERS, each run trains its own)
else
    recipe_step "${COMMON[@]}" --lr "$LR0" --curr_step 0 --initial
fi
recipe_step "${COMMON[@]}" --lr "$LR" --mem_size "$MEMORY" --curr_step 1 ${FROM[@]+"${FROM[@]}"}
recipe_report
