#!/usr/bin/env bash
# RCIL with RCIL's published settings (RCIL scripts/voc/RCIL_*.sh, scripts/ade/RCIL_ade_*.sh, argparser.py),
# every step of one task:
#   bash scripts/recipes/rcil.sh voc 15-1              overlap   (VOC: 15-5, 15-1, 10-1)
#   bash scripts/recipes/rcil.sh voc 15-1 disjoint     disjoint
#   bash scripts/recipes/rcil.sh ade 100-50            (ADE: 100-50, 100-10, 100-5; overlap only)
# Global batch 24 (VOC and ADE 100-50: 4 GPUs x 6; ADE 100-10 and 100-5: 2 x 12), split over GPUS (one id -> one GPU
# with the whole batch; empty -> the CPU); crop 512, poly schedule without floor, mixed precision (the reference's
# apex O1). Step 0: lr 0.02 on VOC (0.01 on ADE), then 0.001; 30 epochs per step on VOC, 60 on ADE. The loss
# weights (UNKD 100, pooled-cube KD 0.01/0.0005 on VOC, 5e-6/5e-7 on ADE), the weight-only classifier init and the
# branch merge are the method's defaults. Step 0 needs the InPlace-ABN ImageNet ResNet-101
# ($TORCH_HOME/hub/checkpoints/resnet101_iabn_sync.pth.tar, see the README), or EXTRA="--pretrained PATH".
# DATA_ROOT, GPUS, CKPT_DIR, SUBPATH and EXTRA (more flags, e.g. "--resume") pass through.
set -euo pipefail
cd "$(dirname "$0")/../.."
USAGE="usage: rcil.sh voc|ade TASK [overlap|disjoint]"
DATASET=${1:?$USAGE}
TASK=${2:?$USAGE}
SETTING=${3:-overlap}

# published mIoU of all classes at the last step (RCIL README; old / new from the paper)
case "$DATASET:$TASK:$SETTING" in
    voc:15-5:overlap) ;;    # 72.4 (old 78.8 / new 52.0)
    voc:15-5:disjoint) ;;   # 67.3 (75.0 / 42.8)
    voc:15-1:overlap) ;;    # 59.4 (70.6 / 23.7)
    voc:15-1:disjoint) ;;   # 54.7 (66.1 / 18.2)
    voc:10-1:overlap) ;;    # 34.3
    voc:10-1:disjoint) ;;   # 18.2 (30.6 / 4.7)
    ade:100-50:overlap) ;;  # 34.5 (42.3 / 18.8)
    ade:100-10:overlap) ;;  # 32.1 (39.3 / 17.6)
    ade:100-5:overlap) ;;   # 29.6 (38.5 / 11.5)
    *)
        echo "error: no RCIL recipe for $DATASET $TASK $SETTING: expected voc 15-5|15-1|10-1 overlap|disjoint or" \
             "ade 100-50|100-10|100-5 overlap" >&2
        exit 2 ;;
esac
case "$DATASET:$TASK" in
    voc:*) EPOCH=30 LR0=0.02 LR=0.001 DEFAULT_GPUS=0,1,2,3 DATA_ROOT=${DATA_ROOT:-data/VOC2012} ;;
    ade:100-50) EPOCH=60 LR0=0.01 LR=0.001 DEFAULT_GPUS=0,1,2,3 DATA_ROOT=${DATA_ROOT:-data/ADEChallengeData2016} ;;
    ade:*) EPOCH=60 LR0=0.01 LR=0.001 DEFAULT_GPUS=0,1 DATA_ROOT=${DATA_ROOT:-data/ADEChallengeData2016} ;;
esac
GLOBAL_BATCH=24
[ "$SETTING" = overlap ] && SETTING_FLAG=--overlap || SETTING_FLAG=

GPUS=${GPUS-$DEFAULT_GPUS}
CKPT_DIR=${CKPT_DIR:-checkpoints}
SUBPATH=${SUBPATH:-RCIL}
EXTRA=${EXTRA:-}
N_GPUS=$(echo "$GPUS" | tr ',' '\n' | grep -c . || true)
BATCH=$(( GLOBAL_BATCH / (N_GPUS > 0 ? N_GPUS : 1) ))   # per process
COMMON=(--method rcil --data_root "$DATA_ROOT" --dataset "$DATASET" --task "$TASK" --model rcil_resnet101
        --crop_size 512 --crop_val --train_epoch "$EPOCH" --batch_size "$BATCH" --lr_policy poly --amp
        --ckpt_dir "$CKPT_DIR" --subpath "$SUBPATH" $SETTING_FLAG)

source scripts/launch.sh
# shellcheck disable=SC2086
launch "${COMMON[@]}" --lr "$LR0" --initial $EXTRA
# shellcheck disable=SC2086
launch "${COMMON[@]}" --lr "$LR" --curr_step 1 $EXTRA
